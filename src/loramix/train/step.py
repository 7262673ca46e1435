"""One training step's loss: the one place where auxiliary losses are weighted and added."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from loramix.context import RoutingState, routing
from loramix.train.aux_losses import AuxLoss
from loramix.train.model import route_of, unwrapped


@dataclass
class StepResult:
    loss: Tensor  # the weighted total, for backward
    parts: dict[str, Tensor]  # raw (unweighted) parts, for logging
    logits: Tensor
    state: RoutingState  # what the routers decided: `state.records` holds every gate of the step


@contextmanager
def routed(
    model: torch.nn.Module, batch: dict[str, Tensor], host_ids: Tensor | None = None
) -> Iterator[RoutingState]:
    """A routing block for this batch on the model's backbone (the model wrapped by DDP or not): `route_ids` (or
    the task ids), the mask a sample router pools (`prompt_mask` when the batch has one, so that a generation
    task routes by its prompt alone, as it will when generating; else the attention mask), and `keep_base` when
    the batch carries one, and `task_weights` (experts mixed by weights over the tasks) likewise. `host_ids`: the
    same route ids as collated, on the CPU, so that a batch of one task is known as one without reading the
    device (its layers then run that task's expert as one LoRA)."""
    backbone = unwrapped(model).backbone
    with routing(
        backbone,
        task_ids=route_of(batch) if host_ids is None else host_ids,
        attention_mask=batch.get("prompt_mask", batch.get("attention_mask")),
        keep_base=batch.get("keep_base"),
        task_weights=batch.get("task_weights"),
    ) as state:
        yield state


def forward_routed(
    model: torch.nn.Module, batch: dict[str, Tensor], host_ids: Tensor | None = None
) -> tuple[Tensor, RoutingState]:
    """Run the model (a :class:`MultiTaskModel`, wrapped or not) with the batch routed to every adapted layer
    (`host_ids`: see :func:`routed`)."""
    with routed(model, batch, host_ids) as state:
        logits = model(batch)
    return logits, state


def compute_loss(
    model: torch.nn.Module,
    batch: dict[str, Tensor],
    aux_losses: Sequence[AuxLoss] = (),
    host_ids: Tensor | None = None,
) -> StepResult:
    """The head's task loss plus `sum(term.weight * term(state, batch))` over the method's auxiliary terms
    (`host_ids`: the batch's route ids as collated, on the CPU; see :func:`routed`)."""
    logits, state = forward_routed(model, batch, host_ids)
    total, parts = with_aux_losses(unwrapped(model).heads.loss(logits, batch), aux_losses, state, batch)
    return StepResult(loss=total, parts=parts, logits=logits, state=state)


def with_aux_losses(
    task_loss: Tensor, aux_losses: Sequence[AuxLoss], state: RoutingState, batch: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """`task_loss + sum(term.weight * term(state, batch))` over the terms with a positive weight and a value on
    this batch, and the raw parts (`task` and each term's name) for logging. Every trainer, `loramix train`'s and
    :class:`loramix.LoramixTrainer`, adds the terms here."""
    parts = {"task": task_loss}
    total = task_loss
    for term in aux_losses:
        if term.weight <= 0:
            continue
        value = term(state, batch)
        if value is not None:
            parts[term.name] = value
            total = total + term.weight * value
    return total, parts
