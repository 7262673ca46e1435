"""Auxiliary loss terms: small objects a method hands the trainer, weighted in the step and nowhere else.

A term has a `name`, a `weight`, and `__call__(state, batch) -> Tensor | None` computing its raw (unweighted) value
from what the routers recorded in the routing state (None: nothing to compute on this batch). A term that owns
parameters is an `nn.Module` with role "method" (MoLA's TwD projection); the trainer optimizes and checkpoints it.
Load balance and the router z-loss live here because any learned router may use them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from loramix.context import RoutingState
from loramix.losses import load_balance_loss, router_z_loss
from loramix.routers import Gate


class AuxLoss(Protocol):
    name: str
    weight: float

    def __call__(self, state: RoutingState, batch: dict[str, Any]) -> Tensor | None: ...


def learned_gates(state: RoutingState) -> list[Gate]:
    """The recorded gates of learned routers (those with logits that are not a task's hard choice)."""
    return [gate for gate in state.gates() if gate.logits is not None and not gate.hard]


class GateMean:
    """A term computed on each recorded learned gate and averaged over them; `term(gate, mask)` is the one gate's
    value, `mask` the attention mask for per-token gates and None for per-sample ones."""

    name = ""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def term(self, gate: Gate, mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, state: RoutingState, batch: dict[str, Any]) -> Tensor | None:
        gates = learned_gates(state)
        if not gates:
            return None
        mask = batch.get("attention_mask")
        return torch.stack([self.term(g, mask if g.per_token else None) for g in gates]).mean()


class LoadBalance(GateMean):
    """Switch-style load balance averaged over every recorded learned gate (Fedus et al. 2022)."""

    name = "balance"

    def term(self, gate: Gate, mask: Tensor | None) -> Tensor:
        probs = torch.softmax(gate.logits.float(), -1)  # type: ignore[union-attr]
        return load_balance_loss(probs, gate.indices, num_experts=gate.weights.shape[-1], mask=mask)


class ZLoss(GateMean):
    """The router z-loss (Zoph et al. 2022) averaged over every recorded learned gate."""

    name = "z"

    def term(self, gate: Gate, mask: Tensor | None) -> Tensor:
        return router_z_loss(gate.logits, mask=mask)  # type: ignore[arg-type]
