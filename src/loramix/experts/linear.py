"""Experts on `nn.Linear` and Hugging Face `Conv1D` (GPT-2 style, weight stored as `(in, out)`).

Legend: n samples, t tokens, e experts, r rank, i / o in / out features.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _global_hooks

import loramix.experts.grouped as grouped
import loramix.experts.ops as ops
from loramix.experts.layer import AdaptedLayer
from loramix.experts.lora import LoraExperts, gate_weights, one_expert, pair_gate, topk_gate

if TYPE_CHECKING:
    from loramix.routers.state import RoutingState


class LinearExperts(AdaptedLayer):
    """Experts around a linear map whose input is `(n, ..., i)`."""

    @staticmethod
    def features_of(layer: nn.Module) -> tuple[int, int, int]:
        """`(in, out, expert in)` features of the base layer."""
        return layer.in_features, layer.out_features, layer.in_features

    def forward(self, x: Tensor, *args, routing: RoutingState | None = None, **kwargs) -> Tensor:
        """The base output plus the mixture. LoRA experts on a plain `nn.Linear` or `Conv1D` base run fused with
        it (`ops.linear`: one GEMM accumulates the mixture into the base output); anything else runs as
        `base_layer(x) + delta(x)`."""
        if (
            args
            or kwargs
            or self.merged_gate is not None
            or self.disabled
            or not isinstance(self.experts, LoraExperts)
            or not self._fusable(x)
            or x.shape[0] == 0
        ):
            return super().forward(x, *args, routing=routing, **kwargs)
        gate = self.gate(x, routing)
        A, B = self.experts.weights()
        A, B = A.to(x.dtype), B.to(x.dtype)
        base = self.base_layer
        input_major = not isinstance(base, nn.Linear)
        expert = None if gate is None else gate.single_expert()
        if expert is not None:  # every sample on one expert: that expert as one LoRA, no per-sample gathers
            self._check_batch(gate, x.shape[0])  # type: ignore[arg-type]
            A, B, gate = *one_expert(A, B, expert), None
        if gate is None:
            return ops.linear(
                x,
                base.weight,
                base.bias,
                A,
                B,
                self.scaling,
                dropout=self.adapter_dropout,
                input_major=input_major,
            )
        batch = x.shape[0]
        self._check_batch(gate, batch)
        x3 = x.reshape(batch, -1, x.shape[-1])  # (n, t, i)
        fused = partial(
            ops.linear,
            x3,
            base.weight,
            base.bias,
            A,
            B,
            self.scaling,
            dropout=self.adapter_dropout,
            input_major=input_major,
        )
        top = None if gate.pairs is not None else topk_gate(x3, A, B, gate)
        if gate.pairs is not None:  # each sample's first expert fused with the base, then the further pairs
            first, first_weight, pairs, pair_weight = pair_gate(gate)
            out = fused(gate=first, sample_weight=first_weight)
            out = ops.add_pairs(out, x3, A, B, pairs, pair_weight, self.scaling, self.adapter_dropout)
        elif top is not None and top[0].dim() == 3:  # per-token top-k: base, plus the grouped-GEMM op
            out = base(x3) + ops.topk(x3, A, B, *top, self.scaling, self.adapter_dropout)
        elif top is not None:
            out = fused(gate=top[1], indices=top[0])
        else:
            out = fused(
                gate=gate.indices if gate.hard else gate_weights(gate, batch),
                keep=gate.keep if gate.hard else None,
            )
        return out.reshape(*x.shape[:-1], out.shape[-1])  # (n, ..., o)

    def _fusable(self, x: Tensor) -> bool:
        """Whether the base is a plain linear map whose forward `ops.linear` reproduces exactly: an exact
        `nn.Linear` or `Conv1D` (not a subclass, which may compute something else), no hooks that its call would
        run, the input's dtype, no autocast (whose casts a custom autograd node would not replay in backward), no
        `torch.func` transform (the fused nodes write in place, which those transforms do not support)."""
        base = self.base_layer
        weight = getattr(base, "weight", None)
        return (
            type(base) in _FUSABLE_BASES
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not (_global_hooks._global_forward_hooks or _global_hooks._global_forward_pre_hooks)
            and isinstance(weight, Tensor)
            and weight.dtype == x.dtype
            and x.dim() >= 2
            and x.is_contiguous()
            and not torch.is_autocast_enabled(x.device.type)
            and not grouped.transforms_active()
        )

    def _add_to_base_weight(self, delta: Tensor) -> None:
        weight = self.base_layer.weight
        weight.add_(delta.to(weight.dtype))


class Conv1DExperts(LinearExperts):
    """Hugging Face `Conv1D`: a linear map with its weight stored transposed, `(in, out)`."""

    @staticmethod
    def features_of(layer: nn.Module) -> tuple[int, int, int]:
        in_features, out_features = layer.weight.shape
        return in_features, out_features, in_features

    def _add_to_base_weight(self, delta: Tensor) -> None:
        weight = self.base_layer.weight
        weight.add_(delta.t().to(weight.dtype))


def _fusable_bases() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


_FUSABLE_BASES = _fusable_bases()


def is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(
        module, nn.modules.linear.NonDynamicallyQuantizableLinear
    )
