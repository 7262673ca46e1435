"""`RoutingLog`: each learned router's top choices on the training batches, counted per task and expert, agree with
a plain per-sample record of the same gates; `route_purity` is the routing summary's purity of each logged
interval; a resumed run logs and writes what an uninterrupted one does; runs whose routing is given log nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loramix.methods import run_training
from loramix.report.routing_stats import routing_summary
from loramix.train.config import RunConfig
from loramix.train.eval_log import _token_mean
from loramix.train.loop import Callback
from loramix.train.routing_log import ROUTING_TRAIN_FILE, RoutingLog, experts_summary, purity
from tests.train import toys


class EveryChoice(Callback):
    """The slow reference: every learned gate's top expert and the sample's task, one sample at a time."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[str, int, int]]] = []  # per step: (router, task, expert)
        self.current: list[tuple[str, int, int]] = []

    def on_batch_end(self, trainer, batch, result) -> None:
        mask = batch["attention_mask"]
        for name, gate in result.state.records:
            if gate.hard:
                continue
            for i, task in enumerate(batch["task_ids"].tolist()):
                weights = gate.weights[i : i + 1]
                if gate.per_token:
                    weights = _token_mean(weights, mask[i : i + 1])
                self.current.append((name, task, int(weights[0].argmax())))

    def on_step_end(self, trainer, logs) -> None:
        self.steps.append(self.current)
        self.current = []


def train_watched(settings: dict, output_dir: Path, monkeypatch: pytest.MonkeyPatch) -> EveryChoice:
    """`run_training` with the reference callback first among the run's own."""
    import loramix.train.run as run_module

    reference = EveryChoice()
    made = run_module.callbacks_for
    monkeypatch.setattr(run_module, "callbacks_for", lambda *a, **k: [reference, *made(*a, **k)])
    run_training(RunConfig.from_dict(settings), output_dir)
    return reference


def interval_purity(choices: list[tuple[str, int, int]], names: list[str]) -> float:
    """The mean over routers of `routing_summary`'s purity of these choices (one-hot gates)."""
    scores = []
    for router in sorted({name for name, _, _ in choices}):
        tasks = np.array([task for name, task, _ in choices if name == router])
        experts = np.array([expert for name, _, expert in choices if name == router])
        gates = np.eye(experts.max() + 1)[experts]
        scores.append(routing_summary(gates, tasks, names, probe=False)["purity"])
    return float(np.mean(scores))


@pytest.mark.parametrize("method, extra", [("mola-router", {"top_k": 1}), ("token-router", {})])
def test_the_counts_and_each_intervals_purity_agree_with_a_plain_record(
    method: str,
    extra: dict,
    model_dir: Path,
    tasks_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    settings = toys.settings(model_dir, tasks_dir, method=method, steps=7, log_every=3, **extra)
    reference = train_watched(settings, tmp_path, monkeypatch)
    written = json.loads((tmp_path / ROUTING_TRAIN_FILE).read_text())
    names = written["task_names"]
    assert names == toys.TASK_NAMES
    every = [choice for step in reference.steps for choice in step]
    assert sorted(written["routers"]) == sorted({name for name, _, _ in every})
    if method == "mola-router":
        assert list(written["routers"]) == ["model"]
    else:
        assert len(written["routers"]) > 1  # a router per adapted layer
    for router, summary in written["routers"].items():
        counts = np.zeros_like(np.array(summary["counts"]))
        for name, task, expert in every:
            counts[task, expert] += name == router
        assert summary["counts"] == counts.tolist()
        assert counts.sum() == 7 * settings["batch_size"]
        assert summary["purity"] == pytest.approx(
            interval_purity([c for c in every if c[0] == router], names)
        )
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [3, 6, 7]
    for entry, (start, end) in zip(logged, [(0, 3), (3, 6), (6, 7)]):
        choices = [choice for step in reference.steps[start:end] for choice in step]
        assert entry["route_purity"] == pytest.approx(interval_purity(choices, names))


def test_a_resumed_run_logs_and_counts_as_an_uninterrupted_one(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # the checkpoint at step 4 falls between the logged steps 3 and 6: the counts since step 3 must come back too
    settings = toys.settings(model_dir, tasks_dir, method="mola-router", steps=7, log_every=3, dropout=0.2)
    straight = run_training(RunConfig.from_dict(settings), tmp_path / "straight")
    run = RunConfig.from_dict({**settings, "checkpoint_every": 4})
    toys.crash_at(monkeypatch, 6, run_training, run, tmp_path / "resumed")
    resumed = run_training(run, tmp_path / "resumed", resume=True)

    def logged(history: list[dict]) -> list[tuple[int, float]]:
        return [(entry["step"], entry["route_purity"]) for entry in history]

    assert logged(resumed["history"]) == logged(straight["history"])
    files = [json.loads((tmp_path / run / ROUTING_TRAIN_FILE).read_text()) for run in ("straight", "resumed")]
    assert files[0] == files[1]


def test_routing_given_by_the_task_logs_nothing(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    result = run_training(
        RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="mola-grad", steps=2)), tmp_path
    )
    assert not (tmp_path / ROUTING_TRAIN_FILE).exists()
    assert all("route_purity" not in entry for entry in result["history"])


def test_purity_and_the_experts_summary_of_a_count_table():
    counts = torch.tensor([[3, 0, 0], [1, 2, 0], [0, 1, 0]])  # (tasks, experts); expert 2 never chosen
    assert purity(counts) == 5 / 7  # expert 0 serves a (3 of 4), expert 1 serves b (2 of 3)
    assert purity(torch.zeros(2, 3, dtype=torch.long)) is None
    assert experts_summary(counts, ["a", "b", "c"]) == [
        {"samples": 4, "task": "a", "other_tasks": 0.25},
        {"samples": 3, "task": "b", "other_tasks": pytest.approx(1 / 3)},
        {"samples": 0, "task": None, "other_tasks": None},
    ]


def test_nothing_is_written_by_a_log_that_saw_no_learned_router(tmp_path: Path):
    log = RoutingLog(tmp_path)
    assert log.state_dict() is None
    logs = {"step": 1, "loss": 1.0}
    log.on_step_end(None, logs)  # type: ignore[arg-type]
    assert logs == {"step": 1, "loss": 1.0}
    log.on_train_end(None)  # type: ignore[arg-type]
    assert not (tmp_path / ROUTING_TRAIN_FILE).exists()


def test_a_continued_continual_run_names_each_task_by_its_id_in_the_model(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    from tests.methods.test_continual import continued_after_two

    later = continued_after_two(model_dir, tasks_dir, tmp_path, "moe-adapters-task-id", steps_per_task=4)
    run_training(later, tmp_path / "later")
    written = json.loads((tmp_path / "later" / "task-0" / ROUTING_TRAIN_FILE).read_text())
    assert written["task_names"] == toys.TASK_NAMES[:3]  # the earlier run's two tasks, then this run's
    for summary in written["routers"].values():
        rows = [sum(row) for row in summary["counts"]]
        assert rows[:2] == [0, 0] and rows[2] == 4 * toys.BASE_SETTINGS["batch_size"]
