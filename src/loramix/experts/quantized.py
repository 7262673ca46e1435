"""Experts around a quantized linear layer: bitsandbytes' `Linear8bitLt` (LLM.int8) and `Linear4bit` (NF4, FP4),
on CUDA or on bitsandbytes' CPU backend, or any `nn.Linear` whose weight is stored as integers.

The base runs its own quantized kernel; the experts are ordinary float parameters (float32 unless the caller casts
them), so the input is cast to their dtype for the mixture and the mixture back to the base output's dtype (under
autocast, autocast decides). A fixed mixture cannot be added to integer weights without re-quantizing them, which
would make unmerging inexact: merging is refused, while PEFT export (which reads only A and B) works.

Legend: n samples, t tokens, i / o in / out features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from loramix.errors import InjectionError
from loramix.experts.linear import LinearExperts

if TYPE_CHECKING:
    from loramix.routers.state import RoutingState

BITSANDBYTES_KINDS = {"Linear8bitLt": "8-bit", "Linear4bit": "4-bit"}


def quantized_kind(module: nn.Module) -> str | None:
    """How a linear layer is quantized ("bitsandbytes 8-bit", "bitsandbytes 4-bit", "torch.int8 weights"), or None
    for a float one. bitsandbytes is recognised by its classes without importing it."""
    if not isinstance(module, nn.Linear):
        return None
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in BITSANDBYTES_KINDS:
            return f"bitsandbytes {BITSANDBYTES_KINDS[cls.__name__]}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and not (weight.is_floating_point() or weight.is_complex()):
        return f"{weight.dtype} weights"
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    return quantized_kind(module) is not None


class QuantizedLinearExperts(LinearExperts):
    """Experts beside a quantized linear base: `y = base(x) + s * sum_e g_e B_e A_e x`, the mixture computed in the
    experts' own float dtype."""

    def forward(self, x: Tensor, *args: Any, routing: RoutingState | None = None, **kwargs: Any) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)  # (n, ..., o), the quantized kernel's dtype
        if self.disabled:
            return out
        gate = self.gate(x, routing)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.expert_dtype)  # (n, ..., i)
        return out + self.delta(x, gate).to(out.dtype)

    @property
    def expert_dtype(self) -> torch.dtype:
        return next(self.experts.parameters()).dtype

    def merge(self, gate: Tensor) -> None:
        raise InjectionError(
            f"layer '{self.layer_name}' wraps a quantized layer ({quantized_kind(self.base_layer)}): a mixture "
            "cannot be merged into quantized weights. Load the base model unquantized to merge, or export the "
            "experts as PEFT LoRA adapters (loramix.io.export.export_peft), which apply on a quantized base too"
        )

    def _add_to_base_weight(self, delta: Tensor) -> None:
        self.merge(delta)
