"""Routed acceptance (`ddas_accept_state: route`): the auto-selector chooses a task from the state entering block
`ddas_layer` of the base model, the pass goes on along that task's route, and the chosen task accepts or rejects
the input by the state entering block `ddas_accept_layer` *of that pass*, compared with its own training inputs
taken through its own experts (:class:`~loramix.routers.selector.AutoSelector` with `accept_state="route"`). The
inputs it rejects are answered again on the untouched base model, in a second pass over them alone.

With experts in every block, the selector of the base state (`ddas_accept_state: base`) reads the base model's
state entering its acceptance block, so a base pass through the blocks before it runs ahead of the routed one;
choosing at block 0 (the embeddings' output, the same on every route) and accepting inside the routed pass needs
none. In the continual speed benchmark (experts in every block) it costs 1.06x the inference by task id against
1.37x, and on the continual benchmark's three runs (`benchmarks/routed_acceptance.py`) 0.9 points of Last routed
hard and 1.2 mixed (`benchmarks/results/continual.md`).

Legend: n samples, t tokens, d the model's width, c + a the selector's choice and acceptance columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loramix.methods.continual.features import base_hidden_states, hidden_features
from loramix.routers.selector import AutoSelector
from loramix.train.model import MODEL_INPUTS


def model_inputs(batch: dict[str, Tensor], rows: Tensor | None = None) -> dict[str, Tensor]:
    """The backbone's inputs of the batch (at `rows`, a bool mask or row indices)."""
    return {k: batch[k] if rows is None else batch[k][rows] for k in MODEL_INPUTS if k in batch}


@torch.no_grad()
def acceptance_features(
    backbone: torch.nn.Module, batch: dict[str, Tensor], layer: int, route: Tensor
) -> Tensor:
    """`(n, a)`: the acceptance columns of each input along `route` `(n,)`: the state entering block `layer` of the
    pass along those experts, pooled, with the token statistics (what a routed selector fits each task's on, along
    the task's own route); the pass stops there."""
    return hidden_features(batch, base_hidden_states(backbone, model_inputs(batch), [layer], route))


@torch.no_grad()
def routed_hidden(
    backbone: torch.nn.Module,
    batch: dict[str, Tensor],
    selector: AutoSelector,
    choice: Tensor,
    layer: int,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(route (n,), keep (n,), last hidden state (n, t, d), features (n, c + a))` of one batch, given each input's
    choice feature `choice` `(n, c)`: the pass along the route chosen on it reads its own state entering block
    `layer`, and the inputs the chosen task rejects are passed again on the base model alone (their rows the base
    model's, bit for bit). With no task learned, one pass on the base (and the features are `choice` alone).
    `weights` `(n, T)`: the pass mixes the tasks' experts by them instead (`ddas_mix: blend`); the chosen task
    still accepts by the state that pass reaches."""
    n, device = choice.shape[0], batch["attention_mask"].device
    if not selector.num_tasks:
        hidden = on_base(backbone, batch)
        keep = torch.ones(n, dtype=torch.bool, device=device)
        return torch.zeros(n, dtype=torch.long, device=device), keep, hidden, choice
    route = selector.choice_scores(choice).argmin(-1).to(device)
    state, hidden = base_hidden_states(backbone, model_inputs(batch), [layer, None], route, weights)
    features = torch.cat([choice, hidden_features(batch, [state])], -1)
    route, keep = selector(features)
    if keep.any():
        hidden[keep] = on_base(backbone, batch, keep).to(hidden)
    return route, keep, hidden, features


def on_base(backbone: torch.nn.Module, batch: dict[str, Tensor], rows: Tensor | None = None) -> Tensor:
    """The base model's last hidden state `(k, t, d)` of the batch's inputs (at `rows`), in a pass of their own."""
    return base_hidden_states(backbone, model_inputs(batch, rows), [None])[0]
