"""Bottleneck adapter experts (AdaptFormer, Chen et al. 2022; MoE-Adapters4CL, Yu et al. 2024): expert e computes
`E_e(x) = W_up_e Dropout(ReLU(W_down_e x + b_down_e)) + b_up_e`, and the bank returns `s * sum_e g_e E_e(x)`.

Legend: n samples, t tokens, e experts, w bottleneck width (`config.rank`), i / o in / out features.

The ReLU sits between the two projections, so a mixture does not fold into one weight (no merge, no PEFT export),
and each expert's hidden must be computed on its own. Every gate still runs as a few batched ops with no Python
loop over experts and no host synchronisation:
- no gate: expert 0 as two `F.linear`; a hard gate whose samples all take one expert known on the host
  (`Gate.single_expert`): that expert, likewise;
- hard gate: each sample's expert gathered, then two `bmm` (`baddbmm`, the biases as their addends);
- per-sample top-k gate (k at most half the experts): each sample's k experts gathered into one `k*w`-wide
  adapter, two `bmm`;
- hard and per-sample top-k gates on CPU, with no more tokens per sample than the width (training too): each
  (sample, expert) pair's rows sorted by expert and run as grouped GEMMs, no weights copied (`prefers_grouped`);
- soft gate (or per-token top-k): one stacked matmul into `e*w` hidden features, ReLU, dropout, each expert's hidden scaled
  by its gate, one stacked matmul back. The gate multiplies the whole expert output, up bias included:
  `sum_e g_e (W_up_e h_e + b_up_e) = sum_e W_up_e (g_e h_e) + g @ b_up`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loramix.experts.grouped as grouped
import loramix.experts.ops as ops
from loramix.errors import ConfigError
from loramix.experts.base import StackedExperts, register_expert_kind
from loramix.experts.lora import gate_weights

if TYPE_CHECKING:
    from loramix.config import AdapterConfig
    from loramix.routers.gate import Gate


def prefers_grouped(x: Tensor, down: Tensor, up: Tensor) -> bool:
    """Whether the hard and per-sample top-k gates run as grouped GEMMs (`AdapterExperts._grouped`) instead of the
    gathers: on CPU, with no more tokens per sample than the adapter is wide (t <= w), in training as in inference.

    The gathers copy each (sample, expert) pair's `w*(i+o)` weights whatever t, and their backward scatters the
    copies' gradients back; the grouped form moves the pair's `t*(i+o)` rows and reads each used expert's weights
    once, in both directions. Measured on one CPU thread (i 1536, o 384, 22 experts, top-2): inference of one bank
    (64 samples) 3.5x faster at w = 128 and 48 tokens, 1.5x at w = 64, 0.74x at w = 64 and 128 tokens; a training
    step of MoE-Adapters' MiniLM (32 inputs of 48 tokens, forward and backward) 0.70x the time at w = 128, 0.88x
    at w = 64 (`python benchmarks/continual.py --grouped`). So, unlike LoRA's hard gate
    (:func:`loramix.experts.grouped.prefers_hard_grouped`, inference only), it runs with autograd on too.
    """
    return (
        x.dim() == 3
        and x.shape[1] <= down.shape[1]
        and down.shape[0] > 1
        and grouped.grouped_mm_ok(x, down, up)
        and not grouped.transforms_active()
    )


def pair_weights(gate: Gate, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`(indices, weights)`, each `(n, k)`, of a hard (k = 1) or per-sample top-k gate: its experts, and the gate
    at them times the scale, zero for the samples it keeps on the base."""
    assert gate.indices is not None
    if not gate.hard:
        return gate.indices, gate.weights.gather(-1, gate.indices).to(dtype) * scaling
    weights = torch.full((gate.indices.shape[0], 1), scaling, dtype=dtype, device=gate.indices.device)
    if gate.keep is not None:
        weights = weights * (~gate.keep).to(dtype)[:, None]
    return gate.indices[:, None], weights


def _dropped(h: Tensor, dropout: grouped.Dropout, order: Tensor, n: int, k: int) -> Tensor:
    """Dropout on the grouped form's hidden `h` `(n*k, t, w)` (pairs in `order`) with the mask the gathers would
    draw: drawn over each sample's `(t, k*w)` hidden, as theirs, then laid out as the pairs' rows. The same random
    numbers give the same mask, so a run trains alike through either form (the floats differ only by rounding)."""
    if isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and not dropout.training):
        return h
    _, t, width = h.shape
    mask = dropout(h.new_ones(n, t, k * width))  # the gathers' layout: (n, t, k*w)
    mask = mask.view(n, t, k, width).transpose(1, 2).reshape(n * k, t, width).index_select(0, order)
    return h * mask


@register_expert_kind
class AdapterExperts(StackedExperts):
    """E bottleneck adapters of width w for one layer with `in_features` inputs and `out_features` outputs.

    Parameters, experts along dim 0: `down (E, w, i)`, `down_bias (E, w)`, `up (E, o, w)`, `up_bias (E, o)`.
    A new expert starts with `up` and `up_bias` zero, so it adds exactly nothing (the adapted model is the base at
    init) while `down` already gives `up` a gradient. Frozen experts are substituted by `effective()` and stay
    bit-identical whatever the optimizer does.

    Example:
        >>> bank = AdapterExperts(16, 16, num_experts=4, width=64)
        >>> delta = bank(x, gate, 0.1, nn.Identity())  # x (n, t, 16) -> (n, t, 16)
    """

    kind = "adapter"
    mergeable = False
    unread = ("alpha", "rslora", "share", "shared_dropout")  # its scale is `adapter_scale`, its width `rank`
    stacked = ("down", "down_bias", "up", "up_bias")

    def __init__(self, in_features: int, out_features: int, *, num_experts: int, width: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.width = num_experts, width
        self.share = "none"  # growth reads it: every parameter holds one row per expert
        self.down = nn.Parameter(torch.empty(num_experts, width, in_features))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, width))
        self.up = nn.Parameter(torch.zeros(num_experts, out_features, width))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, out_features))
        self._init_frozen()
        self.reset_rows(slice(0, num_experts))

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int, out_features: int) -> AdapterExperts:
        if config.share != "none":
            raise ConfigError(
                f"share={config.share!r}: 'adapter' experts share no matrix, share must be 'none'"
            )
        return cls(in_features, out_features, num_experts=config.num_experts, width=config.rank)

    @staticmethod
    def scaling_of(config: AdapterConfig) -> float:
        """An adapter's scale is set directly (AdaptFormer's 0.1 by default), not derived from the width."""
        return config.adapter_scale

    @torch.no_grad()
    def reset_rows(self, rows: slice) -> None:
        """`down` kaiming-uniform (as nn.Linear initialises weights); `down_bias` zero, as the adapters this kind
        follows initialise it (an nn.Linear-style uniform bias would only shift which units start active);
        `up` and `up_bias` zero, so a new expert adds nothing."""
        for d in self.down[rows]:
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))
        for name in ("down_bias", "up", "up_bias"):
            nn.init.zeros_(getattr(self, name)[rows])

    def weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The effective `(down, down_bias, up, up_bias)`, frozen experts substituted, cast to `dtype`."""
        effective = self.effective()
        values = [effective[name] if dtype is None else effective[name].to(dtype) for name in self.stacked]
        return tuple(values)  # type: ignore[return-value]

    def forward(self, x: Tensor, gate: Gate | None, scaling: float, dropout: grouped.Dropout) -> Tensor:
        """`s * sum_e g_e E_e(x)` by the op that fits the gate: x `(..., i)` without a gate, else `(n, t, i)`."""
        down, down_bias, up, up_bias = self.weights(x.dtype)
        expert = 0 if gate is None else gate.single_expert()
        if expert is not None:  # one expert for every sample, gate of ones
            h = dropout(F.relu(F.linear(x, down[expert], down_bias[expert])))  # (..., w)
            return F.linear(h * scaling, up[expert], up_bias[expert] * scaling)  # (..., o)
        assert gate is not None
        top = (
            gate.indices is not None
            and gate.indices.dim() == 2
            and 2 * gate.indices.shape[-1] <= self.num_experts
        )
        if (gate.hard or top) and prefers_grouped(x, down, up):
            indices, weights = pair_weights(gate, scaling, x.dtype)
            return self._grouped(x, down, down_bias, up, up_bias, indices, weights, dropout)
        if gate.hard:
            return self._hard(x, down, down_bias, up, up_bias, gate, scaling, dropout)
        if top:
            return self._topk(x, down, down_bias, up, up_bias, gate, scaling, dropout)
        return self._dense(x, down, down_bias, up, up_bias, gate_weights(gate, x.shape[0]), scaling, dropout)

    @staticmethod
    def _hard(
        x: Tensor,
        down: Tensor,
        down_bias: Tensor,
        up: Tensor,
        up_bias: Tensor,
        gate: Gate,
        scaling: float,
        dropout: grouped.Dropout,
    ) -> Tensor:
        """Each sample through its own expert, gathered by `gate.indices` `(n,)`: an expert gets gradient only from
        the samples routed to it. Samples in `gate.keep` are multiplied by zero (hidden and bias), so their output
        is exactly zero in the same batched op."""
        index = gate.indices
        assert index is not None
        scale = pair_weights(gate, scaling, x.dtype)[1][:, :, None]  # (n, 1, 1), zero where kept
        h = torch.baddbmm(down_bias[index][:, None, :], x, down[index].transpose(1, 2))  # (n, t, w)
        h = dropout(F.relu(h)) * scale
        bias = up_bias[index][:, None, :] * scale  # (n, 1, o)
        return torch.baddbmm(bias, h, up[index].transpose(1, 2))  # (n, t, o)

    @staticmethod
    def _topk(
        x: Tensor,
        down: Tensor,
        down_bias: Tensor,
        up: Tensor,
        up_bias: Tensor,
        gate: Gate,
        scaling: float,
        dropout: grouped.Dropout,
    ) -> Tensor:
        """A per-sample top-k gate: each sample's k experts gathered into one `k*w`-wide adapter, two `bmm`; the
        other experts cost nothing (the dense op computes all e). Kept samples have zero weights: exactly zero."""
        indices = gate.indices
        assert indices is not None
        n, k = indices.shape
        width = down.shape[1]
        g = gate.weights.gather(-1, indices).to(x.dtype) * scaling  # (n, k)
        down_k = down[indices].reshape(n, k * width, -1)  # (n, k*w, i)
        h = torch.baddbmm(
            down_bias[indices].reshape(n, 1, k * width), x, down_k.transpose(1, 2)
        )  # (n, t, k*w)
        h = (dropout(F.relu(h)).unflatten(-1, (k, width)) * g[:, None, :, None]).flatten(-2)  # (n, t, k*w)
        up_k = up[indices].transpose(2, 3).reshape(n, k * width, -1)  # (n, k*w, o)
        bias = torch.bmm(g[:, None, :], up_bias[indices])  # (n, 1, o)
        return torch.baddbmm(bias, h, up_k)  # (n, t, o)

    @staticmethod
    def _grouped(
        x: Tensor,
        down: Tensor,
        down_bias: Tensor,
        up: Tensor,
        up_bias: Tensor,
        indices: Tensor,
        weights: Tensor,
        dropout: grouped.Dropout,
    ) -> Tensor:
        """The hard and per-sample top-k gates without copying any weights: each (sample, expert) pair's token rows
        sorted by expert, both projections as grouped GEMMs over the experts' segments (`torch._grouped_mm`, no
        host synchronisation), each used expert's weights read once, in place, and the rows `index_add`-ed back.
        `indices` `(n, k)` long, `weights` `(n, k)` in x's dtype: the gate there with the scale in it (zero for
        kept samples, whose output is then exactly zero). Autograd runs through it: the gate's weights get their
        gradient through `weights`, and dropout draws the gathers' mask (:func:`_dropped`)."""
        n, t, i = x.shape
        k, width, out = indices.shape[1], down.shape[1], up.shape[1]
        experts = indices.reshape(-1)  # (n*k,): pair p is sample p // k
        order, rows, ends = grouped.grouped_rows(experts, t, down.shape[0], k)  # pairs grouped by expert
        expert = experts.index_select(0, order)  # (n*k,)
        weight = weights.reshape(-1).index_select(0, order)  # (n*k,)
        h = torch._grouped_mm(x.reshape(n * t, i).index_select(0, rows), down.transpose(1, 2), offs=ends)
        h = F.relu(h.view(n * k, t, width) + down_bias.index_select(0, expert)[:, None, :])  # (n*k, t, w)
        h = _dropped(h, dropout, order, n, k) * weight[:, None, None]
        y = torch._grouped_mm(h.view(-1, width), up.transpose(1, 2), offs=ends).view(n * k, t, out)
        y = y + (up_bias.index_select(0, expert) * weight[:, None])[:, None, :]  # (n*k, t, o)
        return x.new_zeros(n * t, out).index_add_(0, rows, y.view(-1, out)).view(n, t, out)

    @staticmethod
    def _dense(
        x: Tensor,
        down: Tensor,
        down_bias: Tensor,
        up: Tensor,
        up_bias: Tensor,
        weights: Tensor,
        scaling: float,
        dropout: grouped.Dropout,
    ) -> Tensor:
        """A gate over all experts, per sample `(n, e)` or per token `(n, t, e)` (a top-k gate is one with zeros):
        one matmul into the `e*w` stacked hidden, one back. Rows of zero weight (kept samples) give exactly
        zero."""
        num_experts, width = down.shape[0], down.shape[1]
        g = weights.to(x.dtype) * scaling
        g = g[:, None, :] if g.dim() == 2 else g  # (n, 1 or t, e)
        h = F.relu(F.linear(x, down.reshape(num_experts * width, -1), down_bias.reshape(-1)))  # (n, t, e*w)
        h = dropout(h).unflatten(-1, (num_experts, width)) * g[..., None]  # (n, t, e, w)
        up_t = up.transpose(1, 2).reshape(num_experts * width, -1)  # (e*w, o)
        return torch.matmul(h.flatten(-2), up_t) + g @ up_bias  # (n, t, o)

    def loop_reference(self, x: Tensor, gate: Tensor, scaling: float) -> Tensor:
        """The obvious form, one expert at a time (tests only). gate `(n, e)`, `(n, t, e)` or long `(n,)`."""
        down, down_bias, up, up_bias = self.weights(x.dtype)
        gate = ops.as_dense_gate(gate, self.num_experts).to(x.dtype)
        gate = gate[:, None, :] if gate.dim() == 2 else gate  # (n, 1 or t, e)
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for e in range(self.num_experts):
            h = torch.relu(x @ down[e].t() + down_bias[e])  # (n, t, w)
            out = out + gate[..., e : e + 1] * (scaling * (h @ up[e].t() + up_bias[e]))
        return out

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, width={self.width}"
        )
