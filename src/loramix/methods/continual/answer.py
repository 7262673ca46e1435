"""How a continual method answers an evaluation batch: each input's route (the auto-selector's choice of task, the
base model, or the true task id), the inference pass, and the label it decides on.

Four ways, by the selector's settings:
- **routing first** (`base_pass_first`): the selector reads a base pass of its own (or the method routes by task
  id), then the pass runs along the routes;
- **inside the pass** (`in_pass`): where the selector's blocks come before every adapted one, hooks read the states
  entering them in the inference pass itself and route the adapted blocks after them
  (:func:`~loramix.methods.continual.features.routed_by_selector`);
- **along the route** (`along_route`, `ddas_accept_state: route`): the pass follows the task chosen on the choice
  block and accepts by its own state at the acceptance block; the inputs it rejects are passed again on the base;
- **mixed along the route** (`ddas_mix: posterior` with routed acceptance): one pass over the mixture's rows
  (:func:`~loramix.methods.continual.mixing.routed_mixture`).

`ddas_mix: posterior` answers by every likely route's answer, weighed by the selector's posterior; `ddas_mix: blend`
mixes the tasks' experts by it inside each pass instead (`routing`'s `task_weights`). A sample of no known task
(task id UNKNOWN_TASK: a `loramix predict` row that names none) takes the task the selector chose for it; one the
selector keeps on the base is answered by the base among every task's classes, and takes the task of the class
that wins.

Legend: n samples, t tokens, d hidden width.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from loramix.methods.continual.decided import Decided, fill, from_logits, unanswered
from loramix.methods.continual.features import routed_by_selector
from loramix.methods.continual.learner import Learner
from loramix.methods.continual.mixing import (
    InPassMixture,
    batch_rows,
    choice_weights,
    mixed_inputs,
    posterior_answer,
    route_weights,
    routed_mixture,
)
from loramix.train.model import MODEL_INPUTS
from loramix.train.predict import UNKNOWN_TASK

# each (n,): route ids, keep-base mask, task ids; then the label indices within the tasks and their probabilities
Answer = tuple[Tensor, Tensor, Tensor, Decided]


class Answering(Protocol):
    """What answering needs of a continual method (`Continual` has it)."""

    uses_selector: bool

    def route(self, learner: Learner, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]: ...

    def predict(self, learner: Learner, batch: dict[str, Tensor], route: Tensor, keep: Tensor) -> Decided: ...


def answer(method: Answering, learner: Learner, batch: dict[str, Tensor]) -> Answer:
    """`(route ids, keep-base mask, task ids, (label indices within them, their probabilities))` of an evaluation
    batch, by the way the run's settings call for (see the module's text)."""
    mode = learner.run.ddas_mix if method.uses_selector else "none"
    if learner.routed_acceptance:
        if mode == "posterior" and learner.selector.num_tasks:  # type: ignore[union-attr]
            route, keep, predicted = routed_mixture(learner, batch)
            result = route, keep, chosen_tasks(batch["task_ids"], route, keep), predicted
        else:
            result = along_route(learner, batch, mode == "blend")
    elif method.uses_selector and (layers := learner.in_pass_layers()) is not None:
        result = in_pass(learner, batch, layers, mode)
    else:
        result = base_pass_first(method, learner, batch, mode)
    route, keep, tasks, predicted = result
    unknown = (batch["task_ids"] == UNKNOWN_TASK) & keep
    if unknown.any():
        inputs = {k: v[unknown] for k, v in batch.items() if k in MODEL_INPUTS}
        tasks[unknown], predicted.labels[unknown], predicted.scores[unknown] = (
            learner.model.heads.base_decision(learner.model, inputs)
        )
    return route, keep, tasks, predicted


def along_route(learner: Learner, batch: dict[str, Tensor], blend: bool) -> Answer:
    """One pass along the route chosen on the choice block, the inputs rejected at the acceptance block again on
    the base (:meth:`Learner.routed_pass`); blended, each layer mixes the tasks' experts by the choice's
    posterior."""
    model = learner.model
    choice = learner.base_features(batch)
    weights = choice_weights(learner, batch, choice) if blend and learner.selector.num_tasks else None  # type: ignore[union-attr]
    route, keep, output, _ = learner.routed_pass(batch, choice, weights)
    tasks = chosen_tasks(batch["task_ids"], route, keep)
    routed = {**batch, "task_ids": tasks, "route_ids": route, "keep_base": keep}
    return route, keep, tasks, from_logits(model.heads, model.heads(output, routed, model), tasks)


def in_pass(learner: Learner, batch: dict[str, Tensor], layers: list[int], mode: str) -> Answer:
    """The selector routes inside the inference pass (the same routes as a base pass of its own, without that
    pass); mixed, the pass goes on with the mixture's rows from the selector's blocks."""
    model = learner.model
    selector = learner.selector.to(learner.device)  # type: ignore[union-attr]
    mixture = InPassMixture(learner, batch) if mode == "posterior" else None

    def weigh(route: Tensor, keep: Tensor, features: Tensor) -> Tensor:
        return route_weights(learner, batch, keep, features)

    with routed_by_selector(
        learner.backbone, batch, selector, layers, mixture, weigh if mode == "blend" else None
    ) as chosen:
        output = model.pooled(batch) if mixture is None else model.hidden(batch)  # (n, d) or (m, t, d)
    route, keep = chosen["route"], chosen["keep"]
    tasks = chosen_tasks(batch["task_ids"], route, keep)
    if mixture is not None:
        return route, keep, tasks, mixture.answer(output, tasks)
    routed = {**batch, "task_ids": tasks, "route_ids": route, "keep_base": keep}
    return route, keep, tasks, from_logits(model.heads, model.heads(output, routed, model), tasks)


def base_pass_first(method: Answering, learner: Learner, batch: dict[str, Tensor], mode: str) -> Answer:
    """Routing first (the selector on a base pass of its own, or the method's rule), then the pass along the
    routes; mixed, the inputs the mixture answers skip it and get the posterior's answer."""
    task_ids = batch["task_ids"]
    features = None  # what the selector read, for `ddas_mix` to weigh the routes by
    if method.uses_selector:
        features = learner.base_features(batch)
        route, keep = learner.selector.to(learner.device)(features)  # type: ignore[union-attr]
    else:
        route, keep = method.route(learner, batch)
    tasks = chosen_tasks(task_ids, route, keep)
    # the inputs the mixture answers, and those of no given task kept on the base, skip the routed pass
    skip = (task_ids == UNKNOWN_TASK) & keep
    if mode == "posterior":
        skip |= mixed_inputs(learner, batch, keep, features)
    weighed = {"task_weights": route_weights(learner, batch, keep, features)} if mode == "blend" else {}
    predicted = unanswered(len(keep), keep.device)
    if not skip.all():
        part = batch_rows({**batch, "task_ids": tasks, **weighed}, ~skip)
        fill(predicted, ~skip, method.predict(learner, part, route[~skip], keep[~skip]))
    if mode == "posterior":
        predicted = posterior_answer(learner, batch, keep, predicted, features)
    return route, keep, tasks, predicted


def chosen_tasks(task_ids: Tensor, route: Tensor, keep: Tensor) -> Tensor:
    """Each sample's task: its own, or for a sample of no known task (UNKNOWN_TASK) the learned task the selector
    routed it to (0 where it kept it on the base, until the base answers it among every task's classes)."""
    unknown = task_ids == UNKNOWN_TASK
    return torch.where(unknown, torch.where(keep, torch.zeros_like(route), route), task_ids)
