"""Answers mixed by the auto-selector's posterior (`ddas_mix: posterior`): an input of a given task that some learned
task accepts is answered through every learned task's route, and its class probabilities are the mixture of those
answers weighted by the selector's posterior over the tasks. Where the selector is sure, one route carries all the
weight and the answer is the hard route's; where two tasks' inputs look alike (sst2 and subj), both answer. On the
continual benchmark, at the posterior's calibrated temperature, it wins back 1.20 of the 3.40 points continual
MoLA-Grad's hard choice loses against the true task ids (three seeds; `benchmarks/continual_routing.py` tells where
they go).

Routes whose weight is below `MIN_WEIGHT` (5%) are dropped and the rest renormalised, so an input costs one row of
the batch per route that matters: on the continual benchmark's three seeds of continual MoLA-Grad, at the calibrated
temperature, 1.41 rows per accepted input against 2.67 with a floor of 0.1%, at the same mean accuracy. The
batch is expanded to those `(input, route)` rows and run as one pass. The posterior reads the features the selector
read to route the batch. Where the selector routes from a base pass of its own, the inputs to mix skip the routed
pass (:func:`mixed_inputs`); where it routes inside the pass (experts only in the blocks after the ones it reads),
the pass itself expands to the rows at the selector's block (:class:`InPassMixture`): the blocks before it run once
per input. With routed acceptance (`ddas_accept_state: route`) the rows are made before the pass, from the choice
block's posterior, and the pass over them also reads the acceptance state of each input's chosen route
(:func:`routed_mixture`).

Legend: n samples, T learned tasks, L classes of every task, m expanded rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loramix.heads.base import pool
from loramix.methods.continual.decided import Decided, either, fill, from_logits, from_probabilities
from loramix.methods.continual.features import base_hidden_states, hidden_features
from loramix.methods.continual.learner import Learner
from loramix.methods.continual.routed import model_inputs, on_base
from loramix.train.predict import UNKNOWN_TASK
from loramix.train.step import routed as routing_block

MIN_WEIGHT = 0.05  # lighter routes cost a row each and barely move the answer (module docstring)


def route_weights(
    learner: Learner, batch: dict[str, Tensor], keep: Tensor, features: Tensor | None = None
) -> Tensor:
    """`(n, T)`: the posterior of each input to mix (given task, not kept on the base), weights under `MIN_WEIGHT`
    dropped and the rest renormalised; rows of zeros for the inputs answered as routed. `features`: what the
    selector read for this batch (by default read again from the base model)."""
    assert learner.selector is not None
    selector = learner.selector.to(learner.device)
    mixed = ~keep & (batch["task_ids"] != UNKNOWN_TASK)
    if not mixed.any():  # before any task is learned every input is kept on the base
        return torch.zeros(len(mixed), selector.num_tasks, device=learner.device)
    if features is None:
        features = learner.base_features(batch)
    return floored(selector.posterior(features).to(learner.device)) * mixed[:, None]


def choice_weights(learner: Learner, batch: dict[str, Tensor], choice: Tensor) -> Tensor:
    """`(n, T)`: with routed acceptance, the posterior of each input of a given task from its choice feature
    `choice` `(n, c)`, weights under `MIN_WEIGHT` dropped and the rest renormalised; rows of zeros for the inputs
    of no given task (before the pass, acceptance is not known yet)."""
    assert learner.selector is not None
    given = batch["task_ids"] != UNKNOWN_TASK
    return floored(learner.selector.to(learner.device).posterior(choice).to(learner.device)) * given[:, None]


def floored(weights: Tensor) -> Tensor:
    """`(n, T)` posterior weights under `MIN_WEIGHT` dropped and the rest renormalised."""
    weights = torch.where(weights >= MIN_WEIGHT, weights, torch.zeros_like(weights))
    return weights / weights.sum(-1, keepdim=True)


def batch_rows(batch: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """The batch's per-input tensors at `index` (a bool mask or row indices, repeats allowed)."""
    n = batch["task_ids"].shape[0]
    return {k: v[index] for k, v in batch.items() if isinstance(v, Tensor) and v.dim() and v.shape[0] == n}


def mixed_inputs(learner: Learner, batch: dict[str, Tensor], keep: Tensor, features: Tensor | None) -> Tensor:
    """`(n,)` bool: the inputs :func:`posterior_answer` answers (given task, not kept on the base)."""
    return route_weights(learner, batch, keep, features).sum(-1) > 0


def probabilities(
    learner: Learner, batch: dict[str, Tensor], routes: Tensor, keep: Tensor | None = None
) -> Tensor:
    """`(n, L)`: each input's class probabilities within its task (zero elsewhere), through route `routes` `(n,)`
    (on the base where `keep` `(n,)` is set)."""
    model = learner.model
    keep = torch.zeros_like(routes, dtype=torch.bool) if keep is None else keep
    routed = {**batch, "route_ids": routes, "keep_base": keep}
    with routing_block(model, routed):
        logits = model.heads(model.pooled(routed), routed, model)
    return torch.softmax(logits.float(), -1)  # other tasks' columns are -inf: probability 0


@torch.no_grad()
def posterior_answer(
    learner: Learner,
    batch: dict[str, Tensor],
    keep: Tensor,
    predicted: Decided,
    features: Tensor | None = None,
) -> Decided:
    """Label indices and their probabilities, each `(n,)`: `predicted` (the hard route's answers; any value for
    the inputs to mix), with each input to mix answered by the posterior mixture of its answers through every
    learned task's route, in one pass over the expanded rows; `features` as :func:`route_weights` takes them."""
    weights = route_weights(learner, batch, keep, features)
    sample, route = weights.nonzero(as_tuple=True)  # (m,), (m,)
    if not len(sample):
        return predicted
    answers = probabilities(learner, batch_rows(batch, sample), route)  # (m, L)
    mixed = mixed_decision(learner, answers, sample, weights[sample, route], batch["task_ids"])
    return either(weights.sum(-1) > 0, mixed, predicted)


def mixed_decision(
    learner: Learner, answers: Tensor, sample: Tensor, weight: Tensor, task_ids: Tensor
) -> Decided:
    """Label indices and their probabilities `(n,)`: each input's class probabilities, the rows' `answers`
    `(m, L)` summed into the input `sample` `(m,)` of each row by its `weight` `(m,)`, decided within the input's
    task `task_ids` `(n,)`."""
    mixture = answers.new_zeros(len(task_ids), answers.shape[1])
    mixture.index_add_(0, sample, answers * weight[:, None])
    return from_probabilities(learner.model.heads, mixture, task_ids)


def expanded_rows(weights: Tensor, route: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows of a batch where the inputs to mix (`weights` `(n, T)` from :func:`route_weights`) take every
    route they weigh and every other input its own `route` (on the base where `keep`): `(input, route, kept on
    the base, weight)` of each row, each `(m,)`, in input order."""
    n = len(route)
    mixed = weights.sum(-1) > 0
    width = max(weights.shape[1], int(route.max()) + 1 if n else 1)
    rows = torch.zeros(n, width, device=weights.device)
    rows[:, : weights.shape[1]] = weights
    hard = (~mixed).nonzero().squeeze(1)
    rows[hard, route[hard].to(rows.device)] = 1.0
    sample, routes = rows.nonzero(as_tuple=True)
    return sample, routes, keep[sample], rows[sample, routes]  # an input to mix is never kept


class InPassMixture:
    """`ddas_mix: posterior` where the selector routes inside the pass (experts only in blocks after the ones it
    reads): the pass itself goes on with the expanded rows from the selector's block
    (:func:`~loramix.methods.continual.features.routed_by_selector`'s `expand`), so the blocks before it run once
    per input and only the adapted ones once per row, instead of a second whole pass over the rows as
    :func:`posterior_answer` takes. Call it as the expansion, run the backbone, then :meth:`answer`."""

    def __init__(self, learner: Learner, batch: dict[str, Tensor]) -> None:
        self.learner, self.batch = learner, batch

    def __call__(self, route: Tensor, keep: Tensor, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        weights = route_weights(self.learner, self.batch, keep, features)
        self.sample, self.route, self.keep, self.weight = expanded_rows(weights, route, keep)
        return self.sample, self.route, self.keep

    def answer(self, hidden: Tensor, tasks: Tensor) -> Decided:
        """Label indices and their probabilities `(n,)` from the backbone's output over the rows `(m, t, d)` and
        each input's task: each input's class probabilities mixed over its rows by their weights (one row of weight
        1: its answer)."""
        model = self.learner.model
        rows = batch_rows({**self.batch, "task_ids": tasks}, self.sample)
        rows |= {"route_ids": self.route, "keep_base": self.keep}
        logits = model.heads(pool(hidden, rows.get("attention_mask"), model.pooling), rows, model)  # (m, L)
        answers = torch.softmax(logits.float(), -1)
        return mixed_decision(self.learner, answers, self.sample, self.weight, tasks)


@torch.no_grad()
def routed_mixture(learner: Learner, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Decided]:
    """`ddas_mix: posterior` with routed acceptance, in one pass over the rows: `(route, keep, (label indices,
    their probabilities))`, each `(n,)`. Every input of a given task takes a row for each route its choice
    feature's posterior weighs (and always one for the route chosen, the argmax); the pass over the rows reads
    each row's state entering `ddas_accept_layer`, and the chosen route's row decides acceptance as
    :meth:`Learner.routed_pass` does. An accepted input is answered by the mixture of its rows' answers; a rejected
    one again on the base; an input of no given task by its chosen route's row. Equal to the hard routed pass
    followed by :func:`posterior_answer` (the tests' reference: `posterior_answer_loop`) without the hard pass over
    the inputs to mix."""
    assert learner.selector is not None and learner.selector.num_tasks > 0
    model, selector = learner.model, learner.selector.to(learner.device)
    choice = learner.base_features(batch)  # (n, c)
    route = selector.choice_scores(choice).argmin(-1).to(learner.device)
    n = len(route)
    given = batch["task_ids"] != UNKNOWN_TASK
    weights = choice_weights(learner, batch, choice)  # (n, T)
    present = weights > 0
    present[torch.arange(n), route] = True
    sample, routes = present.nonzero(as_tuple=True)  # (m,), in input order
    rows = batch_rows(batch, sample)
    layers = [learner.run.ddas_accept_layer, None]
    state, hidden = base_hidden_states(learner.backbone, model_inputs(rows), layers, routes)
    chosen = (routes == route[sample]).nonzero().squeeze(1)  # (n,): each input's row of its chosen route
    _, keep = selector(torch.cat([choice, hidden_features(batch, [state[chosen]])], -1))
    tasks = batch["task_ids"].clone()
    tasks[~given] = route[~given]
    rows |= {
        "task_ids": tasks[sample],
        "route_ids": routes,
        "keep_base": torch.zeros_like(routes, dtype=torch.bool),
    }
    logits = model.heads(pool(hidden, rows.get("attention_mask"), model.pooling), rows, model)  # (m, L)
    answers = torch.softmax(logits.float(), -1)
    mixed = weights.sum(-1) > 0
    predicted = either(
        mixed,
        mixed_decision(learner, answers, sample, weights[sample, routes], tasks),
        from_probabilities(model.heads, answers[chosen], tasks),
    )
    if keep.any():
        based = {
            **batch_rows(batch, keep),
            "task_ids": tasks[keep],
            "route_ids": route[keep],
            "keep_base": keep[keep],
        }
        output = pool(on_base(learner.backbone, batch, keep), based.get("attention_mask"), model.pooling)
        logits = model.heads(output, based, model)
        fill(predicted, keep, from_logits(model.heads, logits, tasks[keep]))
    return route, keep, predicted


@torch.no_grad()
def posterior_answer_loop(
    learner: Learner, batch: dict[str, Tensor], keep: Tensor, predicted: Decided
) -> Decided:
    """The same, one input and one route at a time (the tests' reference)."""
    weights = route_weights(learner, batch, keep)
    answer, score = (column.clone() for column in predicted)
    n = batch["task_ids"].shape[0]
    for i in range(n):
        if weights[i].sum() == 0:
            continue
        one = batch_rows(batch, torch.tensor([i], device=keep.device))
        mixture = sum(
            weights[i, t] * probabilities(learner, one, torch.tensor([t], device=learner.device))[0]
            for t in range(weights.shape[1])
            if weights[i, t] > 0
        )
        task = int(batch["task_ids"][i])
        start = int(learner.model.heads.offsets[task])
        width = int(learner.model.heads.num_labels[task])
        answer[i] = float(torch.argmax(mixture[start : start + width]))
        score[i] = mixture[start : start + width].max()
    return Decided(answer, score)
