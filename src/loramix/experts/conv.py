"""Experts on `nn.Conv2d` in the conv-LoRA form MoLA applies to ResNets: `delta W = s * (B A).view(o, i, k, k)`.

A is a `k x k` convolution into r channels per expert, B a `1 x 1` convolution back. Legend: n samples, e experts,
r rank, c / o in / out channels, h w spatial size.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from loramix.config import AdapterConfig
from loramix.errors import InjectionError
from loramix.experts.layer import AdaptedLayer
from loramix.experts.ops import stacked_B
from loramix.routers import Gate


class Conv2dExperts(AdaptedLayer):
    """Experts around an `nn.Conv2d` (groups 1, zero padding). Gates are per sample; a hard gate runs densely."""

    def __init__(self, base_layer: nn.Conv2d, *, config: AdapterConfig, name: str) -> None:
        if base_layer.groups != 1 or base_layer.padding_mode != "zeros":
            raise InjectionError(
                f"'{name}': only Conv2d with groups=1 and zero padding can be adapted "
                f"(got groups={base_layer.groups}, padding_mode={base_layer.padding_mode!r})"
            )
        if config.router == "token":
            raise InjectionError(
                f"'{name}': a per-token router cannot route a Conv2d; use 'sample', 'task' or 'poly'"
            )
        kh, kw = base_layer.kernel_size
        super().__init__(
            base_layer,
            config=config,
            name=name,
            in_features=base_layer.in_channels,
            out_features=base_layer.out_channels,
            expert_in_features=base_layer.in_channels * kh * kw,
        )

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
        self._check_batch(gate, x.shape[0])
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
