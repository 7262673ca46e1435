"""`ddas_mix: blend`: continual MoLA-Grad answers in one pass whose adapted layers mix the tasks' experts by the
auto-selector's posterior. The pass equals the model with each input's mixture of LoRA deltas merged into the base
weights; the answer equals one input at a time, wherever the selector reads (a base pass of its own, inside the
pass, along the route); a posterior all on one task gives the hard answer; other methods refuse it by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramix.context import routing
from loramix.errors import ConfigError
from loramix.inject import get_info
from loramix.methods import get_method
from loramix.methods.continual.decided import Decided
from loramix.methods.continual.features import base_hidden_states, hidden_features
from loramix.methods.continual.learner import Learner, new_selector
from loramix.methods.continual.mixing import batch_rows, choice_weights, route_weights
from loramix.methods.continual.routed import model_inputs
from loramix.train.config import RunConfig
from loramix.train.predict import UNKNOWN_TASK
from tests.methods.test_continual import continual_run, experts_far_apart, same_answers, trained_learner
from tests.methods.test_continual_routed import ROUTED
from tests.train import toys

SETTINGS = {  # where the selector reads: a base pass of its own, inside the pass, along the route
    "base-pass": {"ddas_accept_layer": 1},
    "in-pass": {"ddas_accept_layer": 1, "layers_to_transform": [1]},
    "routed": ROUTED,
}


def blended(name: str, model_dir: Path, tasks_dir: Path, tmp_path: Path) -> tuple[Learner, dict]:
    """A trained continual MoLA-Grad learner set to blend, experts far apart, and a batch of every task."""
    run = continual_run(
        model_dir,
        tasks_dir,
        "continual-mola-grad",
        **{"steps_per_task": 4, "ddas_choice": "shared", **SETTINGS[name], "ddas_mix": "blend"},
    )
    learner, _ = trained_learner(run, tmp_path / "run")
    learner.model.eval()
    experts_far_apart(learner.backbone)
    method = get_method("continual-mola-grad")
    learner.selector = new_selector(
        learner.run, learner.backbone
    )  # along the route: through the changed experts
    for task in range(len(toys.TASK_NAMES)):
        learner.selector.add_task(method.task_features(learner, task), seed=learner.run.seed)
    learner.selector.temperature = torch.tensor(30.0)  # a flat posterior: every input mixes several experts
    examples = [e for t in range(len(toys.TASK_NAMES)) for e in learner.data.eval_examples("test", t, 6)]
    return learner, next(learner.batches(examples, 18))


@torch.no_grad()
def merged_pass(learner: Learner, batch: dict, weights: torch.Tensor) -> torch.Tensor:
    """`(n, d)`: each input alone through the base model whose every adapted weight holds its mixture of the
    experts' deltas, `W + s sum_t w_t B_t A_t` (the reference the blended pass is held to)."""
    layers = get_info(learner.backbone).layers
    pooled = []
    for i in range(len(weights)):
        saved = [layer.base_layer.weight.clone() for layer in layers]
        for layer in layers:
            layer.base_layer.weight += layer.experts.delta_weight(weights[i], layer.scaling).to(
                layer.base_layer.weight
            )
        one = model_inputs(batch, torch.tensor([i]))
        with routing(
            learner.backbone,
            task_ids=torch.zeros(1, dtype=torch.long),
            keep_base=torch.ones(1, dtype=torch.bool),
        ):
            pooled.append(learner.model.pooled(one))
        for layer, weight in zip(layers, saved):
            layer.base_layer.weight.copy_(weight)
    return torch.cat(pooled)


def test_the_blended_pass_equals_each_input_with_its_mixture_of_deltas_merged(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    learner, batch = blended("base-pass", model_dir, tasks_dir, tmp_path)
    n, tasks = batch["task_ids"].shape[0], learner.selector.num_tasks
    weights = torch.softmax(torch.randn(n, tasks, generator=torch.Generator().manual_seed(1)) * 2, -1)
    route = weights.argmax(-1)
    inputs = model_inputs(batch)
    with torch.no_grad(), routing(learner.backbone, task_ids=route, task_weights=weights):
        mixed = learner.model.pooled(inputs)
    torch.testing.assert_close(mixed, merged_pass(learner, batch, weights), atol=1e-4, rtol=1e-4)
    with torch.no_grad(), routing(learner.backbone, task_ids=route):
        hard = learner.model.pooled(inputs)
    assert not torch.allclose(mixed, hard, atol=1e-3)


def reference_answer(learner: Learner, method, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Decided]:
    """`(route, keep, (label indices, their probabilities))`, one input at a time: the selector's decision and
    posterior weights on it alone, its answer through the predicting pass with those weights (on the base where it
    is kept). Along the route, the chosen task accepts by the state the blended pass reaches."""
    routes, keeps, answers = [], [], []
    for i in range(batch["task_ids"].shape[0]):
        one = batch_rows(batch, torch.tensor([i]))
        if learner.routed_acceptance:
            choice = learner.base_features(one)
            weights = choice_weights(learner, one, choice)
            route = learner.selector.choice_scores(choice).argmin(-1)
            layers = [learner.run.ddas_accept_layer]
            state = base_hidden_states(learner.backbone, model_inputs(one), layers, route, weights)
            route, keep = learner.selector(torch.cat([choice, hidden_features(one, state)], -1))
        else:
            route, keep = learner.select(one)
            weights = route_weights(learner, one, keep)
        task = torch.where(one["task_ids"] == UNKNOWN_TASK, route, one["task_ids"])
        answers.append(
            method.predict(learner, {**one, "task_ids": task, "task_weights": weights}, route, keep)
        )
        routes.append(route)
        keeps.append(keep)
    return torch.cat(routes), torch.cat(keeps), Decided(*(torch.cat(column) for column in zip(*answers)))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_blending_answers_as_one_input_at_a_time_and_a_sure_posterior_as_the_hard_route(
    name: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    method = get_method("continual-mola-grad")
    learner, batch = blended(name, model_dir, tasks_dir, tmp_path)
    assert (learner.in_pass_layers() is not None) == (name == "in-pass")
    assert learner.routed_acceptance == (name == "routed")
    with torch.no_grad():
        route, keep, _, predicted = method.answer(learner, batch)
        reference_route, reference_keep, reference = reference_answer(learner, method, batch)
        learner.selector.temperature = torch.tensor(1e-6)  # all the weight on the chosen task
        sure = method.answer(learner, batch)
        learner.run = learner.run.model_copy(update={"ddas_mix": "none"})
        hard = method.answer(learner, batch)
    assert torch.equal(route, reference_route) and torch.equal(keep, reference_keep)
    assert not keep.all()
    same_answers(predicted, reference)
    assert not torch.equal(predicted.labels[~keep], hard[3].labels[~keep])  # the mixture changes some answers
    for got, want in zip(sure[:3], hard[:3]):
        assert torch.equal(got, want)
    same_answers(sure[3], hard[3])


def test_blending_needs_one_expert_per_task():
    run = continual_run(Path("model"), Path("tasks"), "moe-adapters")
    with pytest.raises(ConfigError, match="ddas_mix: blend .*moe-adapters"):
        get_method("moe-adapters").validate(RunConfig.from_dict({**run.to_dict(), "ddas_mix": "blend"}))
    whiten = {
        **run.to_dict(),
        "method": "continual-mola-grad",
        "ddas_normalize": "whiten",
        "ddas_mix": "blend",
    }
    with pytest.raises(ConfigError, match="ddas_mix: blend .*needs ddas_normalize: gaussian"):
        get_method("continual-mola-grad").validate(RunConfig.from_dict(whiten))
