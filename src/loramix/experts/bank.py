"""Stacked expert parameters: `A[E, r, in]` and `B[E, out, r]`, with optional sharing and per-expert freezing.

Experts are one tensor, not a list of layers, so every op applies all of them at once and parameter names stay
stable whatever the number of experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import ConfigError


class ExpertBank(nn.Module):
    """E low-rank experts of rank r for one layer with `in_features` inputs and `out_features` outputs.

    `share="A"` keeps one A for every expert (MoSLD, HydraLoRA): `A` has shape `[1, r, in]`. `share="B"` keeps one
    B: `B` has shape `[1, out, r]`. `shared_dropout` drops entries of the shared matrix in training (MoSLD, Zhao et
    al. 2025, Sec. 3.2), so the experts cannot lean on single shared directions.

    A frozen expert is held in a buffer and substituted into the effective weights with `torch.where`, so it gets
    no gradient and stays bit-identical whatever the optimizer does to the parameter (weight decay, momentum).

    Example:
        >>> bank = ExpertBank(16, 32, num_experts=4, rank=8)
        >>> A, B = bank.weights()  # (4, 8, 16), (4, 32, 8)
    """

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
        self.register_buffer("frozen_mask", torch.zeros(num_experts, dtype=torch.bool), persistent=False)
        self.register_buffer("frozen_A", torch.zeros(0), persistent=False)
        self.register_buffer("frozen_B", torch.zeros(0), persistent=False)
        self._any_frozen = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A kaiming-uniform (as nn.Linear initialises weights), B zero: the adapted layer starts equal to its base."""
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def weights(self) -> tuple[Tensor, Tensor]:
        """The effective `(A, B)`: frozen experts substituted, shared dropout applied in training."""
        A, B = self.A, self.B
        if self._any_frozen:
            if self.share != "A":
                A = torch.where(self.frozen_mask[:, None, None], self.frozen_A, A)
            if self.share != "B":
                B = torch.where(self.frozen_mask[:, None, None], self.frozen_B, B)
        if self.training and self.shared_dropout > 0:
            if self.share == "A":
                A = F.dropout(A, self.shared_dropout, training=True)
            elif self.share == "B":
                B = F.dropout(B, self.shared_dropout, training=True)
        return A, B

    @torch.no_grad()
    def freeze_experts(self, experts: list[int] | Tensor) -> None:
        """Freeze the given experts: they keep their current values and receive no gradient from now on.

        A shared matrix belongs to every expert and stays trainable; freeze it with `requires_grad_(False)`.
        """
        idx = torch.as_tensor(experts, dtype=torch.long).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_experts):
            raise ConfigError(f"expert index out of range 0..{self.num_experts - 1}: {idx.tolist()}")
        if not self._any_frozen:
            self.frozen_A = self.A.detach().clone()
            self.frozen_B = self.B.detach().clone()
        mask = torch.zeros_like(self.frozen_mask)
        mask[idx] = True
        newly = mask & ~self.frozen_mask
        if self.share != "A":
            self.frozen_A[newly] = self.A[newly]
        if self.share != "B":
            self.frozen_B[newly] = self.B[newly]
        self.frozen_mask |= mask
        self._any_frozen = bool(self.frozen_mask.any())

    @torch.no_grad()
    def unfreeze_experts(self, experts: list[int] | Tensor | None = None) -> None:
        """Make experts trainable again, writing their frozen values back into the parameters."""
        if not self._any_frozen:
            return
        mask = torch.ones_like(self.frozen_mask) if experts is None else torch.zeros_like(self.frozen_mask)
        if experts is not None:
            mask[torch.as_tensor(experts, dtype=torch.long)] = True
        mask &= self.frozen_mask
        if self.share != "A":
            self.A[mask] = self.frozen_A[mask]
        if self.share != "B":
            self.B[mask] = self.frozen_B[mask]
        self.frozen_mask &= ~mask
        self._any_frozen = bool(self.frozen_mask.any())

    @property
    def frozen_experts(self) -> list[int]:
        return [int(i) for i in torch.arange(self.num_experts)[self.frozen_mask.cpu()]]

    @torch.no_grad()
    def sync_frozen_into_parameters(self) -> None:
        """Copy frozen values into the parameters so `state_dict()` holds the effective weights."""
        if self._any_frozen:
            if self.share != "A":
                self.A[self.frozen_mask] = self.frozen_A[self.frozen_mask]
            if self.share != "B":
                self.B[self.frozen_mask] = self.frozen_B[self.frozen_mask]

    @torch.no_grad()
    def delta_weight(self, gate: Tensor, scaling: float) -> Tensor:
        """`s * sum_e g_e B_e A_e` as an `(out, in)` matrix, for a fixed gate `(e,)`."""
        A, B = self.weights()
        gate = gate.to(A.dtype)
        A_full = A.expand(self.num_experts, -1, -1)
        B_full = B.expand(self.num_experts, -1, -1)
        return scaling * torch.einsum("e,eor,eri->oi", gate, B_full, A_full)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
            f"share={self.share}"
        )
