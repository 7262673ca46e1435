"""`JsonlLogger` keeps `metrics.jsonl` one line per step when a run resumes from a checkpoint; callbacks see the
gates of every step; evaluations during training (`eval_every`) log each task's scores and change no weight, also
across a resume, and methods that cannot evaluate on the way, or data without the split, are refused first."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loramix.data import MultiTaskData, TextCollator
from loramix.errors import ConfigError, DataError
from loramix.methods import get_method, run_training
from loramix.train.callbacks import (
    Callback,
    JsonlLogger,
    PeriodicEvaluation,
    ProgressBar,
    eval_scalars,
)
from loramix.train.config import RunConfig
from loramix.train.loop import Trainer
from loramix.train.run import build_model, task_specs
from tests.train import toys


def fake_trainer(step: int) -> SimpleNamespace:
    return SimpleNamespace(step=step, accelerator=SimpleNamespace(is_main_process=True))


def test_resuming_drops_the_lines_of_later_steps_and_a_half_written_line(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    )
    logger = JsonlLogger(path)
    logger.on_train_start(fake_trainer(2))
    logger.on_step_end(fake_trainer(3), {"step": 3, "loss": 0.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 1.0},
        {"step": 3, "loss": 0.5},
    ]


def test_a_log_without_later_steps_is_left_alone(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    text = json.dumps({"step": 1, "loss": 1.0}) + "\n"
    path.write_text(text)
    JsonlLogger(path).on_train_start(fake_trainer(5))
    assert path.read_text() == text
    JsonlLogger(tmp_path / "new.jsonl").on_train_start(fake_trainer(0))
    assert not (tmp_path / "new.jsonl").exists()


@pytest.mark.parametrize(
    "metric, shown",
    [("accuracy", {"eval_accuracy": "0.700"}), ("macro_f1", {"eval_macro_f1": "0.300"}), ("mse", {})],
)
def test_the_progress_bar_shows_the_mean_of_the_runs_eval_metric(metric: str, shown: dict[str, str]):
    bar = ProgressBar()
    trainer = SimpleNamespace(
        step=0,
        run=SimpleNamespace(steps=4, method="lora", eval_metric=metric),
        accelerator=SimpleNamespace(is_main_process=False),  # no bar drawn
    )
    bar.on_train_start(trainer)
    entry = {
        "mean_accuracy": 0.7,
        "tasks": {"a": {"accuracy": 0.6, "macro_f1": 0.2}, "b": {"accuracy": 0.8, "macro_f1": 0.4}},
    }
    bar.on_step_end(trainer, {"step": 1, "loss": 1.0, "lr": 1e-3, "samples_per_s": 10.0, "eval": entry})
    assert {k: v for k, v in bar.postfix.items() if k.startswith("eval")} == shown  # no task has mse
    bar.on_train_end(trainer)


def test_the_progress_bar_shows_a_learned_routers_purity_on_the_training_batches():
    bar = ProgressBar()
    trainer = SimpleNamespace(
        step=0,
        run=SimpleNamespace(steps=4, method="mola-router", eval_metric="accuracy"),
        accelerator=SimpleNamespace(is_main_process=False),
    )
    bar.on_train_start(trainer)
    bar.on_step_end(trainer, {"step": 1, "loss": 1.0, "lr": 1e-3, "samples_per_s": 10.0})
    assert "purity" not in bar.postfix
    bar.on_step_end(
        trainer, {"step": 2, "loss": 1.0, "lr": 1e-3, "samples_per_s": 10.0, "route_purity": 0.8125}
    )
    assert bar.postfix["purity"] == "0.81"
    bar.on_train_end(trainer)


class ExpertUse(Callback):
    """Counts how often each expert is chosen, from the gates each step's result carries."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None

    def on_batch_end(self, trainer, batch, result) -> None:
        for name, gate in result.state.records:
            if name == "model":
                chosen = torch.bincount(gate.indices, minlength=gate.weights.shape[-1])
                self.counts = chosen if self.counts is None else self.counts + chosen


def test_callbacks_see_every_steps_gates(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="mola-grad", steps=3, batch_size=8))
    data = MultiTaskData(task_specs(run))
    model, tokenizer = build_model(run, data, get_method("mola-grad").adapter_config(run, data.num_tasks))
    counter = ExpertUse()
    trainer = Trainer(run, model, data, TextCollator(tokenizer), output_dir=tmp_path, callbacks=[counter])
    trainer.train()
    assert counter.counts is not None and int(counter.counts.sum()) == 3 * 8  # one expert per sample per step


def adapters(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapters.safetensors")


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "samples_per_s"} for entry in history]


def test_evaluating_during_training_logs_every_tasks_scores_and_changes_no_weight(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    # dropout draws from the random state an evaluation must leave as it found it
    settings = toys.settings(
        model_dir, tasks_dir, method="mola-router", steps=7, log_every=2, dropout=0.2, eval_split="test"
    )
    plain = run_training(RunConfig.from_dict(settings), tmp_path / "plain")
    watched = run_training(RunConfig.from_dict({**settings, "eval_every": 3}), tmp_path / "watched")

    a, b = adapters(tmp_path / "plain"), adapters(tmp_path / "watched")
    assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)
    assert watched["tasks"] == plain["tasks"]
    logged = [json.loads(line) for line in (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [2, 3, 4, 6, 7]  # the losses' steps and the evaluations'
    evaluated = [entry for entry in logged if "eval" in entry]
    assert [entry["step"] for entry in evaluated] == [3, 6, 7]  # every third step and the last
    assert "loss" not in evaluated[0]  # step 3 logs no loss, only its evaluation
    assert without_timings(watched["history"]) == without_timings(logged)
    last = evaluated[-1]["eval"]
    assert last["split"] == "test" and set(last["tasks"]) == set(toys.TASK_NAMES)
    # the last step's evaluation scores the model the run ends with, on the same inputs as the final one
    for name, scores in watched["tasks"].items():
        assert last["tasks"][name] == {k: v for k, v in scores.items() if k != "n"}
    assert last["mean_accuracy"] == watched["mean_accuracy"]
    assert 0 <= last["purity"] <= 1
    assert eval_scalars(last)["eval/animals/accuracy"] == last["tasks"]["animals"]["accuracy"]
    assert "evaluation.png" in (tmp_path / "watched" / "report.md").read_text()
    assert (tmp_path / "watched" / "plots" / "evaluation.png").is_file()
    assert not (tmp_path / "plain" / "plots" / "evaluation.png").exists()


def test_a_run_that_evaluates_on_the_way_resumes_exactly(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    settings = toys.settings(
        model_dir, tasks_dir, method="mola-grad", steps=8, dropout=0.2, eval_every=3, eval_split="test"
    )
    straight = run_training(RunConfig.from_dict(settings), tmp_path / "straight")
    run = RunConfig.from_dict({**settings, "checkpoint_every": 4})
    toys.crash_at(monkeypatch, 5, run_training, run, tmp_path / "resumed")
    resumed = run_training(run, tmp_path / "resumed", resume=True)

    a, b = adapters(tmp_path / "straight"), adapters(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert without_timings(resumed["history"]) == without_timings(straight["history"])
    logged = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged if "eval" in line] == [3, 6, 8]


def test_evaluating_during_training_is_refused_where_it_cannot_run(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    continual = toys.settings(model_dir, tasks_dir, method="moe-adapters", steps_per_task=2, eval_every=2)
    with pytest.raises(ConfigError, match="eval_every: method moe-adapters is scored only"):
        get_method("moe-adapters").validate(RunConfig.from_dict(continual))
    # the tiny tasks have no validation split, the default eval_split: refused before anything is trained
    run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="lora", eval_every=2))
    with pytest.raises(DataError, match="eval_every: no task has a 'validation' split"):
        run_training(run, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def scripted_scores(
    monkeypatch: pytest.MonkeyPatch, scores: dict[int, float], metric: str = "accuracy"
) -> None:
    """Evaluations during training score `scores[step]` (one task's `metric`, and the mean accuracy where that is
    the metric), whatever the weights; the final one is real."""
    real = PeriodicEvaluation.on_step_end

    def scored(step: int) -> dict:
        mean = {"mean_accuracy": scores[step]} if metric == "accuracy" else {}
        return {**mean, "tasks": {"t": {metric: scores[step], "n": 4}}}

    def on_step_end(self, trainer, logs):  # type: ignore[no-untyped-def]
        self.evaluate = lambda model: scored(trainer.step)  # called on the evaluated steps only
        real(self, trainer, logs)

    monkeypatch.setattr(PeriodicEvaluation, "on_step_end", on_step_end)


def checkpoint_weights(folder: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(folder / "checkpoints" / f"step-{step:06d}" / "weights.safetensors")


def test_keep_best_ends_the_run_with_the_best_evaluations_weights(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    scripted_scores(monkeypatch, {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.9})  # a tie later does not replace the best
    settings = toys.settings(
        model_dir,
        tasks_dir,
        method="mola-router",
        steps=8,
        checkpoint_every=4,
        eval_every=2,
        eval_split="test",
    )
    metrics = run_training(RunConfig.from_dict({**settings, "keep_best": True}), tmp_path / "best")
    best = {
        "step": 4,
        "metric": "accuracy",
        "score": 0.9,
        "mean_accuracy": 0.9,
        "split": "test",
        "kept": True,
    }
    assert metrics["best_eval"] == best
    # the checkpoint at step 4 holds that step's weights; the one written when training ends, those it ends with
    at_4, at_end = checkpoint_weights(tmp_path / "best", 4), checkpoint_weights(tmp_path / "best", 8)
    assert all(torch.equal(at_4[name], at_end[name]) for name in at_4)
    assert [p.name for p in (tmp_path / "best" / "best").iterdir()] == ["step-000004.safetensors"]

    last = run_training(RunConfig.from_dict(settings), tmp_path / "last")
    assert last["best_eval"]["kept"] is False
    at_4, at_end = checkpoint_weights(tmp_path / "last", 4), checkpoint_weights(tmp_path / "last", 8)
    assert not all(torch.equal(at_4[name], at_end[name]) for name in at_4)


def test_keep_best_resumes_to_the_same_weights_when_a_later_best_replaced_the_checkpoints(
    model_dir: Path,
    tasks_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    scripted_scores(monkeypatch, {2: 0.5, 4: 0.6, 6: 0.9, 8: 0.1})
    settings = toys.settings(
        model_dir,
        tasks_dir,
        method="mola-grad",
        steps=8,
        dropout=0.2,
        checkpoint_every=4,
        eval_every=2,
        eval_split="test",
        keep_best=True,
    )
    run = RunConfig.from_dict(settings)
    straight = run_training(run, tmp_path / "straight")
    # stopped at step 7: the checkpoint at step 4 names step 4's weights, which step 6's have replaced
    toys.crash_at(monkeypatch, 7, run_training, run, tmp_path / "resumed")
    assert [p.name for p in (tmp_path / "resumed" / "best").iterdir()] == ["step-000006.safetensors"]
    resumed = run_training(run, tmp_path / "resumed", resume=True)
    assert "best evaluation before the checkpoint (step 4) are gone" in capsys.readouterr().err
    assert resumed["best_eval"]["step"] == straight["best_eval"]["step"] == 6
    a, b = adapters(tmp_path / "straight"), adapters(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert resumed["tasks"] == straight["tasks"]


def test_keep_best_without_eval_every_is_refused():
    with pytest.raises(ConfigError, match="keep_best reads the evaluations during training"):
        RunConfig.from_dict({"tasks_dir": "data", "tasks": ["a"], "keep_best": True})


def regression_settings(model_dir: Path, folder: Path, **overrides: Any) -> dict[str, Any]:
    """One regression task on the tiny model, scored on its training rows."""
    rows = "".join(json.dumps({"text": f"film {i}", "label": i / 4}) + "\n" for i in range(8))
    (folder / "score.jsonl").write_text(rows)
    spec = {"name": "score", "train": str(folder / "score.jsonl"), "test": str(folder / "score.jsonl")}
    settings = {**toys.settings(model_dir, folder, method="lora"), "tasks_dir": None}
    return {**settings, "tasks": [{**spec, "task_type": "regression"}], **overrides}


def test_a_regression_run_ranks_its_evaluations_by_squared_error_lowest_first(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    chosen = {"eval_every": 2, "keep_best": True, "eval_split": "test"}
    run = RunConfig.from_dict(regression_settings(model_dir, tmp_path, **chosen))
    with pytest.raises(ConfigError, match=r"eval_metric: accuracy is a score of .*\(mse for regression\)"):
        run_training(run, tmp_path / "refused")
    scripted_scores(
        monkeypatch, {2: 0.5, 4: 0.2, 6: 0.3, 8: 0.2}, metric="mse"
    )  # a later tie does not replace
    settings = regression_settings(model_dir, tmp_path, steps=8, eval_metric="mse", **chosen)
    metrics = run_training(RunConfig.from_dict(settings), tmp_path / "run")
    assert metrics["best_eval"] == {
        "step": 4,
        "metric": "mse",
        "score": 0.2,
        "mean_accuracy": None,
        "split": "test",
        "kept": True,
    }
    assert [p.name for p in (tmp_path / "run" / "best").iterdir()] == ["step-000004.safetensors"]


def test_eval_metric_ranks_by_macro_f1_and_reads_only_the_evaluations(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    scripted_scores(monkeypatch, {2: 0.4, 4: 0.3}, metric="macro_f1")
    settings = toys.settings(
        model_dir, tasks_dir, method="lora", steps=4, eval_every=2, eval_split="test", eval_metric="macro_f1"
    )
    metrics = run_training(RunConfig.from_dict(settings), tmp_path)
    assert (metrics["best_eval"]["step"], metrics["best_eval"]["metric"]) == (2, "macro_f1")
    with pytest.raises(ConfigError, match="eval_metric reads the evaluations during training"):
        RunConfig.from_dict({**settings, "eval_every": 0})


def test_eval_patience_stops_training_after_evaluations_that_do_not_beat_the_best(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # steps 6 and 8 do not beat step 4: with a patience of two, training stops at step 8 of 12
    scripted_scores(monkeypatch, {2: 0.5, 4: 0.6, 6: 0.6, 8: 0.55, 10: 0.9, 12: 0.9})
    settings = toys.settings(
        model_dir,
        tasks_dir,
        method="mola-grad",
        steps=12,
        checkpoint_every=4,
        eval_every=2,
        eval_split="test",
        eval_patience=2,
        keep_best=True,
    )
    run = RunConfig.from_dict(settings)
    metrics = run_training(run, tmp_path)
    assert metrics["best_eval"] == {
        "step": 4,
        "metric": "accuracy",
        "score": 0.6,
        "mean_accuracy": 0.6,
        "split": "test",
        "kept": True,
        "stopped_at": 8,
    }
    assert metrics["history"][-1]["step"] == 8
    at_4, at_end = checkpoint_weights(tmp_path, 4), checkpoint_weights(tmp_path, 8)
    assert all(torch.equal(at_4[name], at_end[name]) for name in at_4)  # the best evaluation's weights kept
    saved = adapters(tmp_path)
    # a resume of the stopped run trains no further: it scores and saves the same weights again
    again = run_training(run, tmp_path, resume=True)
    assert again["history"][-1]["step"] == 8 and again["best_eval"] == metrics["best_eval"]
    assert again["tasks"] == metrics["tasks"]
    assert all(torch.equal(saved[name], tensor) for name, tensor in adapters(tmp_path).items())
    with pytest.raises(ConfigError, match="eval_patience reads the evaluations during training"):
        RunConfig.from_dict({**settings, "eval_every": 0, "keep_best": False})


def test_a_best_saved_before_eval_metric_reads_as_ranked_by_accuracy():
    evaluation = PeriodicEvaluation(2, "test", lambda model: {})
    evaluation.load_state_dict(
        {"best": {"step": 4, "mean_accuracy": 0.7}, "since_best": 1, "stopped_at": None}
    )
    assert evaluation.best == {"step": 4, "mean_accuracy": 0.7, "metric": "accuracy", "score": 0.7}
