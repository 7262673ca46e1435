"""One training step's loss: the one place where auxiliary losses are weighted and added."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from loramix.context import RoutingState, routing
from loramix.losses import load_balance_loss, router_z_loss, twd_loss
from loramix.train.heads import MultiTaskModel


@dataclass
class StepResult:
    loss: Tensor  # the weighted total, for backward
    parts: dict[str, Tensor]  # raw (unweighted) parts, for logging
    logits: Tensor
    state: RoutingState


def unwrapped(model: torch.nn.Module) -> MultiTaskModel:
    """The :class:`MultiTaskModel` inside the wrapper that several processes put around it
    (`DistributedDataParallel`): routing hooks and heads live there, while the forward pass must go through the
    wrapper so that gradients are synchronised."""
    while not isinstance(model, MultiTaskModel) and isinstance(
        getattr(model, "module", None), torch.nn.Module
    ):
        model = model.module
    return model  # type: ignore[return-value]


def forward_routed(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, RoutingState]:
    """Run the model (a :class:`MultiTaskModel`, wrapped or not) with the batch's task ids and attention mask routed
    to every adapted layer.

    A batch with `route_ids` (ELREA's cluster experts) is routed by them; heads still read `task_ids`.
    """
    route = batch.get("route_ids", batch["task_ids"])
    backbone = unwrapped(model).backbone
    with routing(backbone, task_ids=route, attention_mask=batch.get("attention_mask")) as state:
        logits = model(batch)
    return logits, state


def compute_loss(
    model: torch.nn.Module,
    batch: dict[str, Tensor],
    weights: dict[str, float],
    *,
    twd_projection: torch.nn.Module | None = None,
) -> StepResult:
    """Task loss plus `weights['twd'] * TwD + weights['balance'] * load balance + weights['z'] * z-loss`.

    TwD uses the model-wide router's logits and the task ids (MoLA-Router); load balance and z-loss average over
    every recorded learned gate (one for a sample router, one per layer for token routers).
    """
    logits, state = forward_routed(model, batch)
    task_loss = unwrapped(model).heads.loss(logits, batch["labels"], batch["task_ids"])
    parts = {"task": task_loss}
    total = task_loss
    learned = [gate for gate in state.gates() if gate.logits is not None and not gate.hard]
    if weights.get("twd", 0.0) > 0 and learned:
        gate = learned[0] if state.model_gate is None else state.model_gate
        parts["twd"] = twd_loss(gate.logits, batch["task_ids"], projection=twd_projection)  # type: ignore[arg-type]
        total = total + weights["twd"] * parts["twd"]
    mask = batch.get("attention_mask")
    if weights.get("balance", 0.0) > 0 and learned:
        num_experts = learned[0].weights.shape[-1]
        terms = [
            load_balance_loss(
                torch.softmax(g.logits.float(), -1),  # type: ignore[union-attr]
                g.indices,
                num_experts=num_experts,
                mask=mask if g.per_token else None,
            )
            for g in learned
        ]
        parts["balance"] = torch.stack(terms).mean()
        total = total + weights["balance"] * parts["balance"]
    if weights.get("z", 0.0) > 0 and learned:
        parts["z"] = torch.stack(
            [router_z_loss(g.logits, mask=mask if g.per_token else None) for g in learned]  # type: ignore[arg-type]
        ).mean()
        total = total + weights["z"] * parts["z"]
    return StepResult(loss=total, parts=parts, logits=logits, state=state)
