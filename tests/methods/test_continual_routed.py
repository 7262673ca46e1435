"""Routed acceptance (`ddas_accept_state: route`) with experts in every block: each task's acceptance columns are
its inputs taken through its own experts; an input is answered along the route chosen on the base state entering
block `ddas_layer`, accepted or rejected by the state its own pass reaches, and a rejected input gets the base
model's output bit for bit; equal to a reference that runs every route in full; a saved run evaluates as it ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from loramix.cli import main
from loramix.context import routing
from loramix.errors import ConfigError
from loramix.methods import get_method
from loramix.methods.continual.features import hidden_features
from loramix.methods.continual.learner import Learner, check_continued_settings, new_selector
from loramix.methods.continual.mixing import floored, posterior_answer_loop
from loramix.train.config import RunConfig
from loramix.train.model import MODEL_INPUTS
from loramix.train.predict import UNKNOWN_TASK
from tests.methods.test_continual import continual_run, experts_far_apart, same_answers, trained_learner
from tests.train import toys

ROUTED = {
    "steps_per_task": 6,
    "ddas_accept_layer": 1,
    "ddas_accept_state": "route",
    "ddas_threshold": "pooled",
    "ddas_neighbours": 2,
    "ddas_choice": "shared",
}


def states(learner: Learner, batch: dict, route: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Every hidden state of one whole pass along `route` (None: the base model), from the backbone's own
    `output_hidden_states`: the reference the hooked passes are held to."""
    n = batch["input_ids"].shape[0]
    keep = torch.full((n,), route is None)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    with routing(
        learner.backbone,
        task_ids=torch.zeros(n, dtype=torch.long) if route is None else route,
        attention_mask=batch["attention_mask"],
        keep_base=keep,
        record=False,
    ):
        return learner.backbone(**inputs, output_hidden_states=True).hidden_states


def reference_features(learner: Learner, batch: dict, routes: torch.Tensor) -> torch.Tensor:
    """`(n, c + a)`: the base feature entering block 0, then each input's state entering block 1 along its own
    route in `routes`, every route run in full over the whole batch."""
    n = len(routes)
    along = [states(learner, batch, torch.full((n,), r))[1] for r in range(int(routes.max()) + 1)]
    mine = torch.stack(along)[routes, torch.arange(n)]  # (n, t, d)
    return torch.cat(
        [hidden_features(batch, [states(learner, batch, None)[0]]), hidden_features(batch, [mine])], -1
    )


def answering(learner: Learner, mix: str) -> Learner:
    learner.run = learner.run.model_copy(update={"ddas_mix": mix})
    return learner


@pytest.mark.parametrize("method_name", ["continual-mola-grad", "moe-adapters"])
def test_routed_acceptance_answers_along_the_chosen_route_and_on_the_base_where_that_route_rejects(
    method_name: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    method = get_method(method_name)
    run = continual_run(model_dir, tasks_dir, method_name, **ROUTED)
    learner, metrics = trained_learner(run, tmp_path / "run")
    assert learner.routed_acceptance and learner.in_pass_layers() is None
    assert main(["eval", str(tmp_path / "run")]) == 0  # the saved selector accepts as the run's did
    evaluated = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    assert [evaluated["tasks"][n]["accuracy"] for n in toys.TASK_NAMES] == metrics["accuracy_matrix"][-1]

    model = learner.model.eval()
    experts_far_apart(learner.backbone)
    learner.selector = new_selector(learner.run, learner.backbone)  # fitted again through the changed experts
    for task in range(3):
        fitted = method.task_features(learner, task)
        batch = next(learner.batches(method.task_examples(learner, task), 64))
        own = torch.full((len(batch["input_ids"]),), task)
        torch.testing.assert_close(fitted[: len(own)], reference_features(learner, batch, own))
        learner.selector.add_task(fitted, seed=learner.run.seed)
    learner.selector.pooled[1] = -1.0  # the second task accepts nothing: its inputs are answered on the base
    examples = [e for t in range(3) for e in learner.data.eval_examples("test", t, 8)]
    batch = next(learner.batches(examples, 24))
    with torch.no_grad():
        route, keep, _, predicted = method.answer(learner, batch)
        _, _, pooled, features = learner.routed_pass(batch)
        chosen = learner.selector.choice_scores(features).argmin(-1)
        reference = reference_features(learner, batch, chosen)
        reference_route, reference_keep = learner.selector(reference)
        expected = method.predict(learner, batch, reference_route, reference_keep)
        along = model.encode(batch, route_ids=route, keep_base=torch.zeros_like(keep), noise=False)
        base = model.encode(batch, route_ids=route, keep_base=torch.ones_like(keep), noise=False)
    torch.testing.assert_close(features, reference)
    assert torch.equal(route, reference_route) and torch.equal(keep, reference_keep)
    assert keep.any() and not keep.all() and (route == 1).any()
    assert torch.equal(pooled[keep], base[keep])  # the base model's output, bit for bit
    torch.testing.assert_close(pooled[~keep], along[~keep])
    assert not torch.isclose(pooled[~keep], base[~keep]).all(-1).any()
    same_answers(predicted, expected)

    # mixed by the posterior: the inputs their chosen route accepts are answered through every weighty route (a
    # flatter posterior, so that each input takes several)
    learner.selector.temperature = torch.tensor(30.0)
    assert (floored(learner.selector.posterior(features)) > 0).sum(-1).min() > 1
    with torch.no_grad():
        _, _, _, mixed = method.answer(answering(learner, "posterior"), batch)
        loop = posterior_answer_loop(learner, batch, reference_keep, expected)
    same_answers(mixed, loop)
    # inputs of no given task take their chosen route's answer, mixed or not (or the base's among every task's)
    unknown = torch.arange(len(route)) % 3 == 0
    asked = {**batch, "task_ids": torch.where(unknown, UNKNOWN_TASK, batch["task_ids"])}
    with torch.no_grad():
        answers = {mix: method.answer(answering(learner, mix), asked) for mix in ("none", "posterior")}
    for got, want in zip(answers["posterior"][:3], answers["none"][:3]):
        assert torch.equal(got[unknown], want[unknown])
    same_answers(answers["posterior"][3], answers["none"][3], unknown)
    same_answers(answers["posterior"][3], mixed, ~unknown)


def test_routed_acceptance_needs_an_acceptance_block_and_a_continued_or_evaluated_run_keeps_it(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    method = get_method("continual-mola-grad")
    for layer in (None, 0):
        with pytest.raises(ConfigError, match="ddas_accept_state: route .*ddas_accept_layer other than"):
            method.validate(
                continual_run(model_dir, tasks_dir, method.name, **{**ROUTED, "ddas_accept_layer": layer})
            )
    run = continual_run(model_dir, tasks_dir, method.name, **{**ROUTED, "steps_per_task": 2})
    first = RunConfig.from_dict({**run.to_dict(), "tasks": run.to_dict()["tasks"][:2]})
    trained_learner(first, tmp_path / "first")
    later = RunConfig.from_dict(
        {**first.to_dict(), "ddas_accept_state": "base", "continue_from": str(tmp_path / "first")}
    )
    with pytest.raises(ConfigError, match="ddas_accept_state: route"):
        check_continued_settings(later, tmp_path / "first", selector=True)
    # evaluated with a config that says otherwise: refused by name, as the saved selector decides how it answers
    (tmp_path / "otherwise.yaml").write_text(yaml.safe_dump({**first.to_dict(), "ddas_accept_state": "base"}))
    assert main(["eval", str(tmp_path / "first"), "--config", str(tmp_path / "otherwise.yaml")]) == 2
    assert "set ddas_accept_state: route" in capsys.readouterr().err
