"""LoRA experts, the default kind: `A[E, r, in]` and `B[E, out, r]`, with optional sharing and per-expert freezing.

Experts are one tensor, not a list of layers, so every op applies all of them at once and parameter names stay
stable whatever the number of experts.
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

if TYPE_CHECKING:
    from loramix.config import AdapterConfig
    from loramix.routers.gate import Gate


@register_expert_kind
class LoraExperts(StackedExperts):
    """E low-rank experts of rank r for one layer with `in_features` inputs and `out_features` outputs.

    `share="A"` keeps one A for every expert (MoSLD, HydraLoRA): `A` has shape `[1, r, in]`. `share="B"` keeps one
    B: `B` has shape `[1, out, r]`. `shared_dropout` drops entries of the shared matrix in training (MoSLD, Zhao et
    al. 2025, Sec. 3.2), so the experts cannot lean on single shared directions.

    A frozen expert is held in a buffer and substituted into the effective weights with `torch.where`, so it gets
    no gradient and stays bit-identical whatever the optimizer does to the parameter (weight decay, momentum).

    Example:
        >>> bank = LoraExperts(16, 32, num_experts=4, rank=8)
        >>> A, B = bank.weights()  # (4, 8, 16), (4, 32, 8)
    """

    kind = "lora"
    mergeable = True
    stacked = ("A", "B")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_experts: int,
        rank: int,
        share: str = "none",
        shared_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if share not in ("none", "A", "B"):
            raise ConfigError(f"share must be 'none', 'A' or 'B', got {share!r}")
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank, self.share = num_experts, rank, share
        self.shared_dropout = shared_dropout
        num_a = 1 if share == "A" else num_experts
        num_b = 1 if share == "B" else num_experts
        self.A = nn.Parameter(torch.empty(num_a, rank, in_features))
        self.B = nn.Parameter(torch.zeros(num_b, out_features, rank))
        self._init_frozen()
        self.reset_rows(slice(0, num_experts))

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int, out_features: int) -> LoraExperts:
        return cls(
            in_features,
            out_features,
            num_experts=config.num_experts,
            rank=config.rank,
            share=config.share,
            shared_dropout=config.shared_dropout,
        )

    def reset_rows(self, rows: slice) -> None:
        """A kaiming-uniform (as nn.Linear initialises weights), B zero: a new expert adds nothing. A shared
        matrix is initialised once, with the bank."""
        if self.share != "A" or rows.start == 0:
            for a in self.A[rows if self.share != "A" else slice(0, 1)]:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if self.share != "B":
            nn.init.zeros_(self.B[rows])
        elif rows.start == 0:
            nn.init.zeros_(self.B)

    def weights(self) -> tuple[Tensor, Tensor]:
        """The effective `(A, B)`: frozen experts substituted, shared dropout applied in training."""
        effective = self.effective()
        A, B = effective["A"], effective["B"]
        if self.training and self.shared_dropout > 0:
            if self.share == "A":
                A = F.dropout(A, self.shared_dropout, training=True)
            elif self.share == "B":
                B = F.dropout(B, self.shared_dropout, training=True)
        return A, B

    def forward(self, x: Tensor, gate: Gate | None, scaling: float, dropout: grouped.Dropout) -> Tensor:
        """`s * sum_e g_e B_e A_e x` by the op that fits the gate: x `(..., i)` without a gate, else `(n, t, i)`."""
        A, B = self.weights()
        A, B = A.to(x.dtype), B.to(x.dtype)
        expert = None if gate is None else gate.single_expert()
        if expert is not None:
            A, B, gate = *one_expert(A, B, expert), None
        if gate is None:
            return ops.single(x, A, B, scaling, dropout)
        if gate.pairs is not None:
            first, first_weight, pairs, pair_weight = pair_gate(gate)
            out = ops.hard(x, A, B, first, scaling, dropout, sample_weight=first_weight)
            return ops.add_pairs(out, x, A, B, pairs, pair_weight, scaling, dropout)
        top = topk_gate(x, A, B, gate)
        if top is not None:
            return ops.topk(x, A, B, *top, scaling, dropout)
        if gate.hard:
            return ops.hard(x, A, B, gate.indices, scaling, dropout, keep=gate.keep)  # type: ignore[arg-type]
        return ops.dense(x, A, B, gate_weights(gate, x.shape[0]), scaling, dropout)

    def loop_reference(self, x: Tensor, gate: Tensor, scaling: float) -> Tensor:
        A, B = self.weights()
        return ops.loop_reference(x, A, B, gate, scaling)

    @torch.no_grad()
    def delta_weight(self, gate: Tensor, scaling: float) -> Tensor:
        """`s * sum_e g_e B_e A_e` as an `(out, in)` matrix, for a fixed gate `(e,)`."""
        A, B = self.weights()
        gate = gate.to(A.device, A.dtype)
        A_full = A.expand(self.num_experts, -1, -1)
        B_full = B.expand(self.num_experts, -1, -1)
        return scaling * torch.einsum("e,eor,eri->oi", gate, B_full, A_full)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
            f"share={self.share}"
        )


def one_expert(A: Tensor, B: Tensor, expert: int) -> tuple[Tensor, Tensor]:
    """Expert `expert`'s `(A (1, r, i), B (1, o, r))`, views of the bank (a shared matrix as it is)."""
    return (A if A.shape[0] == 1 else A[expert : expert + 1]), (
        B if B.shape[0] == 1 else B[expert : expert + 1]
    )


def gate_weights(gate: Gate, batch: int) -> Tensor:
    """A soft gate's weights as the ops take them: `(n, e)` per sample or `(n, t, e)` per token."""
    weights = gate.weights
    if weights.dim() > 2:
        weights = weights.reshape(batch, -1, weights.shape[-1])  # (n, t, e)
    return weights


def pair_gate(gate: Gate) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A gate with `pairs` as the ops take it: each sample's first expert `(n,)` and its weight `(n,)`, the
    further pairs `(p, 2)` and theirs `(p,)`, read from the gate's weights (so that kept samples weigh zero)."""
    assert gate.indices is not None and gate.pairs is not None
    first = gate.indices[:, 0]
    first_weight = gate.weights.gather(-1, first[:, None])[:, 0]
    return first, first_weight, gate.pairs, gate.weights[gate.pairs[:, 0], gate.pairs[:, 1]]


def topk_gate(x3: Tensor, A: Tensor, B: Tensor, gate: Gate) -> tuple[Tensor, Tensor] | None:
    """A top-k gate's `(indices, weights at them)`, `(n, k)` or `(n, t, k)`, when `ops.topk` pays."""
    if gate.hard or gate.indices is None:
        return None
    batch, k = x3.shape[0], gate.indices.shape[-1]
    indices = gate.indices if gate.indices.dim() == 2 else gate.indices.reshape(batch, -1, k)
    if not ops.prefers_topk(x3, A, B, indices):
        return None
    return indices, gate_weights(gate, batch).gather(-1, indices)
