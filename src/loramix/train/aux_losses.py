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


class LoadBalance:
    """Switch-style load balance averaged over every recorded learned gate (Fedus et al. 2022)."""

    name = "balance"

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, state: RoutingState, batch: dict[str, Any]) -> Tensor | None:
        gates = learned_gates(state)
        if not gates:
            return None
        mask = batch.get("attention_mask")
        terms = [
            load_balance_loss(
                torch.softmax(g.logits.float(), -1),  # type: ignore[union-attr]
                g.indices,
                num_experts=g.weights.shape[-1],
                mask=mask if g.per_token else None,
            )
            for g in gates
        ]
        return torch.stack(terms).mean()


class ZLoss:
    """The router z-loss (Zoph et al. 2022) averaged over every recorded learned gate."""

    name = "z"

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, state: RoutingState, batch: dict[str, Any]) -> Tensor | None:
        gates = learned_gates(state)
        if not gates:
            return None
        mask = batch.get("attention_mask")
        return torch.stack(
            [router_z_loss(g.logits, mask=mask if g.per_token else None) for g in gates]  # type: ignore[arg-type]
        ).mean()
