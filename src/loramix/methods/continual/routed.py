"""Routed acceptance (`ddas_accept_state: route`): the auto-selector chooses a task from the state entering block
`ddas_layer` of the base model, the pass goes on along that task's route, and the chosen task accepts or rejects
the input by the state entering block `ddas_accept_layer` *of that pass*, compared with its own training inputs
taken through its own experts (:class:`~loramix.routers.selector.AutoSelector` with `accept_state="route"`). The
inputs it rejects are answered again on the untouched base model, in a second pass over them alone.

With experts in every block, the selector of the base state (`ddas_accept_state: base`) reads the base model's
state entering its acceptance block, so a base pass through the blocks before it runs ahead of the routed one;
choosing at block 0 (the embeddings' output, the same on every route) and accepting inside the routed pass needs
none. On the continual benchmark's three runs with experts in every block (`benchmarks/routed_acceptance.py`) it
costs 1.14x the inference by task id against 1.50x, for 0.9 points of Last routed hard (README.md, Continual).

Legend: n samples, t tokens, d the model's width, c + a the selector's choice and acceptance columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from loramix.heads.base import pool
from loramix.methods.continual.features import base_hidden_states, encoder_blocks, hidden_features
from loramix.train.model import MODEL_INPUTS
from loramix.train.step import routed as routing_block

if TYPE_CHECKING:
    from loramix.methods.continual.learner import Learner


@torch.no_grad()
def acceptance_features(learner: Learner, batch: dict[str, Tensor], route: Tensor) -> Tensor:
    """`(n, a)`: the acceptance columns of each input along `route` `(n,)`: the state entering block
    `ddas_accept_layer` of the pass along those experts, pooled, with the token statistics."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    states = base_hidden_states(learner.backbone, inputs, [learner.run.ddas_accept_layer], route)
    return hidden_features(batch, states)


def task_features(learner: Learner, batch: dict[str, Tensor], task: int) -> Tensor:
    """`(n, c + a)`: what a routed selector fits task `task` on: the choice block's base feature, then the
    acceptance columns along the task's own route."""
    route = torch.full((batch["attention_mask"].shape[0],), task, device=learner.device)
    return torch.cat([learner.base_features(batch), acceptance_features(learner, batch, route)], -1)


@torch.no_grad()
def routed_pass(learner: Learner, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(route (n,), keep (n,), pooled output (n, d), features (n, c + a))` of one batch: the route chosen on the
    base feature of block `ddas_layer`, the pass along it (reading its own state entering `ddas_accept_layer`),
    and, for the inputs the chosen task rejects, their output again on the base model (bit for bit the base
    model's: a pass of its own with every expert off)."""
    model, selector = learner.model, learner.selector.to(learner.device)  # type: ignore[union-attr]
    choice = learner.base_features(batch)  # (n, c)
    n = choice.shape[0]
    learned = selector.num_tasks > 0
    route = selector.choice_scores(choice).argmin(-1) if learned else torch.zeros(n, dtype=torch.long)
    route = route.to(learner.device)
    keep = torch.full((n,), not learned, dtype=torch.bool, device=learner.device)
    blocks, layer, reached = encoder_blocks(learner.backbone), learner.run.ddas_accept_layer, []

    def read(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        reached.append(args[0] if args else kwargs["hidden_states"])

    handle = blocks[layer].register_forward_pre_hook(read, with_kwargs=True) if layer < len(blocks) else None
    routed = {**batch, "route_ids": route, "keep_base": keep}
    try:
        with routing_block(model, routed):
            hidden = model.hidden(routed)  # (n, t, d)
    finally:
        if handle is not None:
            handle.remove()
    features = torch.cat([choice, hidden_features(batch, reached or [hidden])], -1)
    output = pool(hidden, batch.get("attention_mask"), model.pooling)
    if learned:
        route, keep = selector(features)
        if keep.any():
            rows: dict[str, Any] = {k: v[keep] for k, v in batch.items() if k in MODEL_INPUTS}
            on_base = {**rows, "task_ids": route[keep], "route_ids": route[keep], "keep_base": keep[keep]}
            with routing_block(model, on_base):
                output[keep] = model.pooled(on_base).to(output)
    return route, keep, output, features
