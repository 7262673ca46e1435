"""Experts on `nn.Conv2d` in the conv-LoRA form MoLA applies to ResNets: `delta W = s * (B A).view(o, i, k, k)`.

A is a `k x k` convolution into r channels per expert, B a `1 x 1` convolution back. Legend: n samples, e experts,
r rank, c / o in / out channels, h w spatial size.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import InjectionError
from loramix.experts.layer import AdaptedLayer
from loramix.experts.ops import stacked_B
from loramix.routers.gate import Gate


class Conv2dExperts(AdaptedLayer):
    """LoRA experts around an `nn.Conv2d` (groups 1, zero padding). Gates are per sample; a hard gate runs
    densely."""

    @staticmethod
    def features_of(layer: nn.Module) -> tuple[int, int, int]:
        kh, kw = layer.kernel_size
        return layer.in_channels, layer.out_channels, layer.in_channels * kh * kw

    @staticmethod
    def check(layer: nn.Module, name: str, *, per_token: bool, expert_kind: str) -> None:
        """Refuse what this wrapper cannot run, naming the module."""
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise InjectionError(
                f"'{name}': only Conv2d with groups=1 and zero padding can be adapted "
                f"(got groups={layer.groups}, padding_mode={layer.padding_mode!r})"
            )
        if per_token:
            raise InjectionError(f"'{name}': a per-token router cannot route a Conv2d; route per sample")
        if expert_kind != "lora":
            raise InjectionError(f"'{name}': a Conv2d takes LoRA experts in conv form, not '{expert_kind}'")

    def delta(self, x: Tensor, gate: Gate | None) -> Tensor:
        conv = self.base_layer
        A, B = self.experts.weights()
        A, B = A.to(x.dtype), B.to(x.dtype)
        num_a, r = A.shape[0], A.shape[1]
        kernel = A.reshape(num_a * r, conv.in_channels, *conv.kernel_size)
        h = F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation)  # (n, a*r, h, w)
        h = self.adapter_dropout(h) * self.scaling
        if gate is None:
            return F.conv2d(h, B[0][..., None, None])  # (n, o, h, w)
        self._check_batch(gate, x.shape[0])  # a hard gate (keep-base included) is its one-hot weights
        weights = gate.weights.to(x.dtype)[:, :, None, None, None]  # (n, e, 1, 1, 1)
        if num_a == 1:  # shared A: e gated copies of one projection
            h = (h[:, None] * weights).flatten(1, 2)  # (n, e*r, h, w)
        else:
            h = h.unflatten(1, (num_a, r)) * weights  # (n, e, r, h, w)
            if B.shape[0] == 1:
                return F.conv2d(h.sum(1), B[0][..., None, None])
            h = h.flatten(1, 2)  # (n, e*r, h, w)
        return F.conv2d(h, stacked_B(B)[..., None, None])  # (n, o, h, w)

    def _add_to_base_weight(self, delta: Tensor) -> None:
        weight = self.base_layer.weight
        weight.add_(delta.reshape(weight.shape).to(weight.dtype))


def is_conv2d(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d)
