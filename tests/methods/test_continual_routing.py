"""`benchmarks/continual_routing.py`: a continual run's test inputs answered through every route, to tell what its
auto-selector costs from what its experts learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loramix.methods import run_training
from tests.methods.test_continual import continual_run, experts_far_apart, same_answers, trained_learner
from tests.scripts import benchmark_script


@pytest.mark.parametrize("method", ["continual-mola-grad", "moe-adapters"])
def test_the_routing_diagnosis_scores_the_run_and_its_task_id_variant_as_they_scored(
    method: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """Its `selector` mode is the run's last row, `base` its row 0 (nothing learned: every input on the base), and
    `task-id` the last row of the method's `-task-id` variant trained separately: training never consults the
    selector, so the same experts serve both. `--speed` times its three ways of answering, with and without the head's cache."""
    settings = {"steps_per_task": 6, "ddas_choice": "shared"}
    metrics = run_training(continual_run(model_dir, tasks_dir, method, **settings), tmp_path / "run")
    by_task = run_training(
        continual_run(model_dir, tasks_dir, f"{method}-task-id", **settings), tmp_path / "id"
    )
    threads = str(torch.get_num_threads())  # main() sets the thread count: keep the suite's
    routing = benchmark_script("continual_routing")
    assert routing.main([str(tmp_path / "run"), "--threads", threads, "--speed", "1"]) == 0
    result = json.loads((tmp_path / "run" / "routing.json").read_text())
    modes = result["modes"]
    assert result["speed"]["inputs"] > 0 and result["speed"]["seconds_task_ids"] > 0
    assert all(result["speed"][f"{name}_vs_task_ids"]["ratio_median"] > 0 for name in ("selector", "mixed"))
    assert all(result["speed"][f"{name}_vs_uncached"]["ratio_median"] > 0 for name in ("task-ids", "mixed"))
    assert modes["selector"]["per_task"] == pytest.approx(metrics["accuracy_matrix"][-1])
    assert modes["base"]["per_task"] == pytest.approx(metrics["accuracy_matrix"][0])
    assert modes["task-id"]["per_task"] == pytest.approx(by_task["accuracy_matrix"][-1])
    away, kept = result["routed_to_another_task"], result["kept_on_base"]
    routed_home = result["inputs"] - away["inputs"] - kept["inputs"]
    assert routed_home >= 0 and max(away["right_as_routed"], away["right_by_own_task"]) <= away["inputs"]


def test_a_refit_at_another_percentile_gives_the_last_row_of_a_run_trained_with_it(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """`--refit --percentile P`: training never consults the selector, so the run's final model answered by its
    selector refitted at P scores each task as the last row of the same run trained with `ddas_percentile: P`."""
    settings = {"steps_per_task": 6, "ddas_choice": "shared", "ddas_threshold": "pooled"}
    run_training(continual_run(model_dir, tasks_dir, "moe-adapters", **settings), tmp_path / "run")
    lower = run_training(
        continual_run(model_dir, tasks_dir, "moe-adapters", **settings, ddas_percentile=40), tmp_path / "low"
    )
    threads = str(torch.get_num_threads())
    module = benchmark_script("continual_routing")
    assert module.main([str(tmp_path / "run"), "--threads", threads, "--refit", "--percentile", "40"]) == 0
    result = json.loads((tmp_path / "run" / "routing.json").read_text())
    assert result["percentile"] == 40.0 and result["run"].endswith(" percentile=40")
    assert result["modes"]["selector"]["per_task"] == pytest.approx(lower["accuracy_matrix"][-1])
    for alone in (["--percentile", "40"], ["--with", "ddas_percentile=40"]):
        with pytest.raises(SystemExit):  # these refit: without --refit they are refused
            module.main([str(tmp_path / "run"), *alone])


def test_a_refit_with_another_pass_of_its_own_gives_the_selector_and_last_row_of_a_run_trained_with_it(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """`--refit --with ddas_tokens=K ddas_precision=bfloat16` (and back): the selector fitted on the other pass is
    the one a run trained with it saved, tensor for tensor, and chooses on that pass; the experts are the run's."""
    from loramix.io import read_checkpoint

    settings = {"steps_per_task": 6, "ddas_choice": "shared", "ddas_layer": 1}
    full = run_training(continual_run(model_dir, tasks_dir, "moe-adapters", **settings), tmp_path / "full")
    cheap = {"ddas_tokens": 2, "ddas_precision": "bfloat16"}
    cut = run_training(
        continual_run(model_dir, tasks_dir, "moe-adapters", **settings, **cheap), tmp_path / "cut"
    )
    saved = {
        name: {
            k.removeprefix("extra.selector."): v
            for k, v in read_checkpoint(tmp_path / name / "adapter")[1].items()
            if k.startswith("extra.selector.")
        }
        for name in ("full", "cut")
    }
    assert not torch.allclose(saved["full"]["center"], saved["cut"]["center"], atol=1e-3)  # other features
    threads = str(torch.get_num_threads())
    module = benchmark_script("continual_routing")
    for run, other, metrics, changes in (
        ("full", "cut", cut, {"ddas_tokens": 2, "ddas_precision": "bfloat16"}),
        ("cut", "full", full, {"ddas_tokens": None, "ddas_precision": "float32"}),
    ):
        learner, method = module.finished_run(tmp_path / run)
        state = module.refit(learner, method, learner.selector, changes).state()
        for key, value in saved[other].items():
            assert value.numel() == 0 or torch.equal(state[key], value), key
        given = [f"{k}={'null' if v is None else v}" for k, v in changes.items()]
        assert module.main([str(tmp_path / run), "--threads", threads, "--refit", "--with", *given]) == 0
        result = json.loads((tmp_path / run / "routing.json").read_text())
        assert result["run"].endswith(
            f" tokens={changes['ddas_tokens']} precision={changes['ddas_precision']}"
        )
        assert result["modes"]["selector"]["per_task"] == pytest.approx(metrics["accuracy_matrix"][-1])
    with pytest.raises(SystemExit):  # not a selector setting
        module.main([str(tmp_path / "full"), "--refit", "--with", "lr=1"])


def test_posterior_mixing_answers_as_the_routing_diagnosis_mixes(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """`ddas_mix: posterior` at `loramix eval` (one batched pass over the expanded rows) scores each task as the
    diagnosis's `posterior` mode (each route's answers computed on their own, then mixed), its selector fitted
    again by `--refit` (which checks it equal to the saved one)."""
    from loramix.cli import main

    settings = {"steps_per_task": 6, "ddas_choice": "shared"}
    run_training(continual_run(model_dir, tasks_dir, "continual-mola-grad", **settings), tmp_path / "run")
    config = (tmp_path / "run" / "config.yaml").read_text().replace("ddas_mix: none", "ddas_mix: posterior")
    assert "ddas_mix: posterior" in config
    (tmp_path / "mix.yaml").write_text(config)
    assert main(["eval", str(tmp_path / "run"), "--config", str(tmp_path / "mix.yaml")]) == 0
    evaluated = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    threads = str(torch.get_num_threads())
    routing = benchmark_script("continual_routing")
    assert routing.main([str(tmp_path / "run"), "--threads", threads, "--refit"]) == 0
    result = json.loads((tmp_path / "run" / "routing.json").read_text())
    mixed = [evaluated["tasks"][name]["accuracy"] for name in result["tasks"]]
    assert mixed == pytest.approx(result["modes"]["posterior"]["per_task"])


def test_posterior_mixing_in_one_pass_equals_a_loop_over_inputs_and_routes(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """The expanded batch's mixture against one input and one route at a time, with experts far apart and weights
    spread over the tasks (some under MIN_WEIGHT); inputs kept on the base or of no given task keep the hard
    answer, and a weight all on the chosen route gives the hard answer."""
    from loramix.methods import get_method
    from loramix.methods.continual.mixing import MIN_WEIGHT, posterior_answer, posterior_answer_loop
    from loramix.train.predict import UNKNOWN_TASK
    from tests.train import toys

    method = get_method("continual-mola-grad")
    run = continual_run(model_dir, tasks_dir, "continual-mola-grad", steps_per_task=4, ddas_choice="shared")
    learner, _ = trained_learner(run, tmp_path / "run")
    learner.model.eval()
    generator = torch.Generator().manual_seed(0)
    experts_far_apart(learner.backbone, generator=generator)
    examples = [e for t in range(len(toys.TASK_NAMES)) for e in learner.data.eval_examples("test", t, 6)]
    batch = next(learner.batches(examples, 18))
    n, tasks = batch["task_ids"].shape[0], learner.selector.num_tasks
    spread = torch.softmax(torch.randn(n, tasks, generator=generator) * 3, -1)
    spread[0] = torch.tensor([1 - MIN_WEIGHT / 2, MIN_WEIGHT / 2] + [0.0] * (tasks - 2))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[1] = True
    batch["task_ids"][2] = UNKNOWN_TASK
    route = spread.argmax(-1)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        hard = method.predict(learner, batch, route, keep)
        patch.setattr(type(learner.selector), "posterior", lambda self, features: spread.clone())
        mixed = posterior_answer(learner, batch, keep, hard)
        reference = posterior_answer_loop(learner, batch, keep, hard)
        patch.setattr(type(learner.selector), "posterior", lambda self, f: torch.eye(tasks)[route])
        one_hot = posterior_answer(learner, batch, keep, hard)
    same_answers(mixed, reference)
    same_answers(mixed, hard, slice(0, 3))  # kept as the hard route answered them
    assert not torch.equal(mixed.labels, hard.labels)  # spread weights change some answers
    assert not torch.allclose(mixed.scores[3:], hard.scores[3:])  # and the probabilities of the others
    same_answers(one_hot, hard)


def test_a_run_that_mixes_scores_its_sequence_as_eval_scores_it(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """`ddas_mix: posterior` through the whole sequence (row 0 has no learned task to mix), its last row what
    `loramix eval` of the finished run gives."""
    from loramix.cli import main

    run = continual_run(model_dir, tasks_dir, "continual-mola-grad", steps_per_task=4, ddas_mix="posterior")
    metrics = run_training(run, tmp_path)
    assert main(["eval", str(tmp_path)]) == 0
    evaluated = json.loads((tmp_path / "eval-test.json").read_text())
    assert [evaluated["tasks"][name]["accuracy"] for name in metrics["tasks_in_order"]] == pytest.approx(
        metrics["accuracy_matrix"][-1]
    )


@pytest.mark.parametrize("method_name", ["continual-mola-grad", "moe-adapters"])
def test_mixing_inside_the_pass_equals_a_loop_over_inputs_and_routes_and_runs_the_base_blocks_once(
    method_name: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """With experts only after the selector's block, `ddas_mix: posterior` expands the batch inside the pass: the
    block before runs once per input, the adapted one once per (input, route) row, and the answers equal the
    reference (the selector's own base pass, then one input and one route at a time), inputs kept on the base and
    of no given task included."""
    from loramix.methods import get_method
    from loramix.methods.continual.features import encoder_blocks
    from loramix.methods.continual.mixing import posterior_answer_loop
    from loramix.train.predict import UNKNOWN_TASK
    from tests.train import toys

    method = get_method(method_name)
    run = continual_run(
        model_dir,
        tasks_dir,
        method_name,
        steps_per_task=4,
        layers_to_transform=[1],
        ddas_accept_layer=1,
        ddas_choice="shared",
        ddas_mix="posterior",
    )
    learner, _ = trained_learner(run, tmp_path / "run")
    assert learner.in_pass_layers() == [0, 1]
    learner.model.eval()
    generator = torch.Generator().manual_seed(0)
    far = 10 if method_name == "moe-adapters" else 1  # its adapters scale their output by 0.1
    experts_far_apart(learner.backbone, far, generator)
    examples = [e for t in range(len(toys.TASK_NAMES)) for e in learner.data.eval_examples("test", t, 6)]
    batch = next(learner.batches(examples, 18))
    batch["task_ids"][2] = UNKNOWN_TASK
    n, tasks = batch["task_ids"].shape[0], learner.selector.num_tasks
    spread = torch.softmax(torch.randn(n, tasks, generator=generator) * 3, -1)
    rows_out: dict[int, list[int]] = {0: [], 1: []}  # the rows each block's output has, call by call
    blocks = encoder_blocks(learner.backbone)
    handles = [
        blocks[i].register_forward_hook(
            lambda module, args, output, i=i: rows_out[i].append(
                (output[0] if isinstance(output, tuple) else output).shape[0]
            )
        )
        for i in (0, 1)
    ]
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            type(learner.selector), "posterior", lambda self, features: spread[: len(features)].clone()
        )
        route, keep, chosen, predicted = method.answer(learner, batch)
        for handle in handles:
            handle.remove()
        reference_route, reference_keep = learner.select(batch)
        hard = method.predict(learner, {**batch, "task_ids": chosen}, reference_route, reference_keep)
        reference = posterior_answer_loop(learner, batch, reference_keep, hard)
    assert torch.equal(route, reference_route) and torch.equal(keep, reference_keep)
    assert keep.any() and not keep.all()
    mixed = ~keep & (batch["task_ids"] != UNKNOWN_TASK)
    # the pass: the base block once per input, the adapted one once per row (later calls encode class texts)
    assert rows_out[0][0] == n and rows_out[1][0] > n
    decided = ~(keep & (batch["task_ids"] == UNKNOWN_TASK))  # those take the base's decision among every task
    same_answers(predicted, reference, decided)
    assert not torch.equal(predicted.labels[mixed], hard.labels[mixed])  # spread weights change some answers


def test_the_routed_acceptance_replay_scores_the_run_as_it_scored_and_the_library_s_answer_agrees(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """`benchmarks/routed_acceptance.py`: the run's own selector, rebuilt stage by stage on the final model, gives
    the run's accuracy matrix (mixed, as the run answered); the library's answer with routed acceptance gives the
    replay's routes, base decisions and answers, hard and mixed, on every test input; a replay at other acceptance
    percentiles reads the inputs the first one kept."""
    settings = {
        "steps_per_task": 4,
        "ddas_layer": 0,
        "ddas_accept_layer": 1,
        "ddas_threshold": "pooled",
        "ddas_neighbours": 3,
        "ddas_choice": "shared",
        "ddas_mix": "posterior",
    }
    run = continual_run(model_dir, tasks_dir, "continual-mola-grad", **settings)
    run_training(run, tmp_path / "run")
    module = benchmark_script("routed_acceptance")
    threads = str(torch.get_num_threads())
    assert module.main([str(tmp_path / "run"), "--threads", threads, "--speed", "1"]) == 0
    result = json.loads((tmp_path / "run" / "routed-acceptance.json").read_text())
    assert result["replay_vs_run_max_difference"] == 0.0
    assert result["library_agrees"] == {"route": 1.0, "keep": 1.0, "hard": 1.0, "mixed": 1.0}
    assert set(result["metrics"]) == {"current-hard", "current-mixed", "routed-hard", "routed-mixed"}
    assert all(0 <= rate <= 1 for rate in result["mean_own_rate"].values())
    assert all(
        result["speed"][f"{name}_vs_task_ids"]["ratio_median"] > 0
        for name in ("current", "routed-acceptance", "current-mixed", "routed-acceptance-mixed")
    )
    # timings alone, with the final selectors refitted: the replay's other results stay as they were
    assert module.main([str(tmp_path / "run"), "--threads", threads, "--speed-only", "1"]) == 0
    again = json.loads((tmp_path / "run" / "routed-acceptance.json").read_text())
    assert {k: v for k, v in again.items() if k != "speed"} == {
        k: v for k, v in result.items() if k != "speed"
    }
    assert set(again["speed"]) == set(result["speed"])
    # other percentiles, from the replay's inputs kept in the run's folder: the run's own gives the replay again
    own = run.ddas_percentile
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            module, "eval_inputs", lambda learner: pytest.fail("the kept replay inputs were not read")
        )
        assert (
            module.main([str(tmp_path / "run"), "--threads", threads, "--percentiles", str(own), "50"]) == 0
        )
    swept = json.loads((tmp_path / "run" / "routed-acceptance.json").read_text())
    assert swept["percentiles"][str(float(own))]["metrics"] == result["metrics"]
    assert swept["speed"] == again["speed"]  # kept: the same final model
    lower = swept["percentiles"]["50.0"]["mean_unseen_to_base_rate"]
    assert all(lower[rule] >= result["mean_unseen_to_base_rate"][rule] for rule in lower)
    assert any(lower[rule] > result["mean_unseen_to_base_rate"][rule] for rule in lower)
