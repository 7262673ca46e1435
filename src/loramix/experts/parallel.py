"""Experts in parallel to any module: `y = module(x) + s * sum_e g_e E_e(x)`, the experts reading the module's first
input (AdaptFormer, Chen et al. 2022; MoE-Adapters4CL, Yu et al. 2024, beside each transformer block's MLP).

Widths come from the module itself: the input width is its first Linear's, the output width its last Linear's
(a transformer MLP `d -> 4d -> d` gives `d -> d`). A module that returns a tuple gets the mixture added to the
first element. Legend: n samples, t tokens, i / o in / out features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from loramix.errors import InjectionError
from loramix.experts.layer import AdaptedLayer
from loramix.experts.linear import is_conv1d, is_linear

if TYPE_CHECKING:
    from loramix.routers.state import RoutingState


class ParallelExperts(AdaptedLayer):
    """Experts beside a whole module (placement 'parallel'); it never merges."""

    @staticmethod
    def features_of(layer: nn.Module) -> tuple[int, int, int]:
        linears = [m for m in layer.modules() if is_linear(m) or is_conv1d(m)]
        if not linears:
            raise InjectionError(
                f"a {type(layer).__name__} has no Linear inside: experts in parallel to it cannot tell its widths"
            )
        first, last = linears[0], linears[-1]
        in_features = first.in_features if is_linear(first) else first.weight.shape[0]
        out_features = last.out_features if is_linear(last) else last.weight.shape[1]
        return in_features, out_features, in_features

    def forward(self, x: Tensor, *args: Any, routing: RoutingState | None = None, **kwargs: Any) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        first = out[0] if isinstance(out, tuple) else out
        if first.shape[:-1] != x.shape[:-1] or first.shape[-1] != self.out_features:
            raise InjectionError(
                f"'{self.layer_name}' maps {tuple(x.shape)} to {tuple(first.shape)}: experts in parallel need an "
                f"output of the input's shape with {self.out_features} features"
            )
        mixed = first + self.delta(x, self.gate(x, routing)).to(first.dtype)
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed

    def merge(self, gate: Tensor) -> None:
        self._check_mergeable()
        raise InjectionError(f"'{self.layer_name}' holds experts in parallel to a module: they cannot merge")
