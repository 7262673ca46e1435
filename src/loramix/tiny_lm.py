"""Small causal language models built from a config, with a character tokenizer: no download, random weights.

They are what the generative examples, the tests and the benchmarks train from scratch on a CPU. They are not
pretrained: a user with internet points `model` at a hub name (a small Qwen or Llama) instead. The run configs
name them as `model: tiny-gpt2` or `model: tiny-llama`; the folder is written once into a cache folder
(`$LORAMIX_CACHE`, default `~/.cache/loramix`) and then loads like any `save_pretrained` folder.

Example:
    >>> tokenizer = char_tokenizer()
    >>> model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=2)
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = [PAD, UNK, BOS, EOS]
CHARS = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
# A plain chat template, so that `messages` rows render on these models as on an instruction-tuned hub model.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
KINDS = ("gpt2", "llama")
ALIASES = {f"tiny-{kind}": kind for kind in KINDS}
# The built-in sizes: about 0.4M parameters, trained from scratch in minutes on two cores.
DEFAULT_SIZES: dict[str, int] = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "max_positions": 256}


def char_tokenizer() -> Any:
    """A fast tokenizer with one token per printable ASCII character, `<pad>` `<unk>` `<s>` `</s>`, and a chat
    template; decoding joins the characters back without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    kind: str = "gpt2",
    *,
    vocab_size: int = len(SPECIALS) + len(CHARS),
    hidden_size: int = DEFAULT_SIZES["hidden_size"],
    num_layers: int = DEFAULT_SIZES["num_layers"],
    num_heads: int = DEFAULT_SIZES["num_heads"],
    max_positions: int = DEFAULT_SIZES["max_positions"],
    seed: int | None = 0,
    **config: Any,
) -> Any:
    """A randomly initialised GPT-2 or Llama causal LM of these sizes (pad 0, bos 2, eos 3, as the char
    tokenizer, unless given), in eval mode. Extra keywords go to the transformers config."""
    import torch
    import transformers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if seed is not None:
        torch.manual_seed(seed)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    ids.update({k: config.pop(k) for k in list(ids) if k in config})  # a keyword given replaces its default
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
            **config,
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        **ids,
        **config,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def write_tiny_lm(folder: str | os.PathLike[str], kind: str = "gpt2", *, seed: int = 0, **sizes: Any) -> Path:
    """Save a tiny causal LM and its char tokenizer into `folder` (as `save_pretrained` does); returns it."""
    folder = Path(folder)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=seed, **sizes)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cached_tiny_lm(alias: str) -> str:
    """The folder of a built-in tiny model (`tiny-gpt2`, `tiny-llama`), written on first use."""
    kind = ALIASES[alias]
    root = Path(os.environ.get("LORAMIX_CACHE") or Path.home() / ".cache" / "loramix")
    folder = root / f"{alias}-seed0"
    if not (folder / "config.json").is_file():  # written beside, then renamed: a crash leaves no half folder
        from loramix.io.files import make_temp_dir

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = write_tiny_lm(make_temp_dir(folder.parent, f".{alias}-"), kind)
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
