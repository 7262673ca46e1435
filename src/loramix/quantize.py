"""Loading a backbone quantized: bitsandbytes through transformers' `BitsAndBytesConfig`, on CUDA or on
bitsandbytes' CPU backend. Injection then wraps the quantized linears (`loramix.experts.quantized`); the experts
stay in float and train, the quantized base stays frozen.

Example:
    >>> model, tokenizer = loramix.models.load_backbone("Qwen/Qwen2.5-0.5B", causal_lm=True, quantize="4bit")
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from loramix.errors import ConfigError

QUANTIZE_CHOICES = ("8bit", "4bit")
INSTALL = "pip install 'loramix[quantize]'"
CPU_BACKEND_SINCE = (
    0,
    48,
)  # the first bitsandbytes release whose 8-bit and 4-bit layers we rely on for the CPU


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def quantization_config(quantize: str | None) -> Any:
    """transformers' `BitsAndBytesConfig` for `quantize` ("8bit": LLM.int8; "4bit": NF4 with double quantization,
    computing in bf16 on a GPU that has it, fp16 on one that does not, fp32 on the CPU), or None for no
    quantization. A ConfigError names the field and what to install when bitsandbytes cannot run here."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} or null, got {quantize!r}")
    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"quantize: {quantize!r} needs bitsandbytes (with CUDA, or its CPU backend): {INSTALL}"
        ) from None
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and _version(version) < CPU_BACKEND_SINCE:
        wanted = ".".join(map(str, CPU_BACKEND_SINCE))
        raise ConfigError(
            f"quantize: {quantize!r} without CUDA needs bitsandbytes >= {wanted} (its CPU backend), found {version}: "
            f"{INSTALL} --upgrade, or run on a CUDA GPU"
        )
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if not cuda:
        compute = torch.float32
    else:
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
