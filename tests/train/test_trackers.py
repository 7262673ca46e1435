"""Experiment trackers (`report_to`): a run's logged steps and evaluations reach the tracker, read back from the files
TensorBoard's writer leaves (through tensorboardX, the light writer accelerate takes where `tensorboard` is not
installed); a resumed run's repeated steps are dropped as TensorBoard drops them; a tracker named but not installed
stops the run before any work."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from loramix.cli import main
from loramix.errors import ConfigError
from loramix.methods import run_training
from loramix.train import trackers
from loramix.train.config import RunConfig
from loramix.train.trackers import chosen_trackers, hyperparameters
from tests.train import toys

pytest.importorskip("tensorboardX")  # in the dev extra


def records(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file: a little-endian 8-byte length, its 4-byte checksum, the data, its checksum."""
    data = path.read_bytes()
    at = 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        yield data[at + 12 : at + 12 + length]
        at += 12 + length + 4


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in `folder`'s event files, tag -> (step, value) in the order written, read as TensorBoard reads
    them: a session that starts at step s (a writer's `purge_step`) drops what earlier sessions logged from s on."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        for record in records(path):
            event = Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                found = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in found.items()}
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_the_tracker_gets_every_logged_step_and_evaluation(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    settings = toys.settings(
        model_dir, tasks_dir, method="mola-router", steps=6, log_every=2, eval_every=3, eval_split="test"
    )
    run_training(RunConfig.from_dict({**settings, "report_to": ["tensorboard"]}), tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    found = scalars(tmp_path / "run" / "tensorboard" / "run")
    assert dict(found["loss"]) == pytest.approx({e["step"]: e["loss"] for e in logged if "loss" in e})
    assert [step for step, _ in found["loss"]] == [2, 4, 6]
    evaluated = {e["step"]: e["eval"]["mean_accuracy"] for e in logged if "eval" in e}
    assert dict(found["eval/mean_accuracy"]) == pytest.approx(evaluated)
    assert [step for step, _ in found["eval/mean_accuracy"]] == [3, 6]
    assert set(found) >= {"lr", "samples_per_s", "twd_loss", "eval/purity", "eval/animals/accuracy"}
    stored = list((tmp_path / "run" / "tensorboard" / "run").glob("*/hparams.yml"))
    assert len(stored) == 1 and "method: mola-router" in stored[0].read_text()  # the run's settings


def test_a_resumed_run_logs_each_step_once(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run = RunConfig.from_dict(
        {
            **toys.settings(model_dir, tasks_dir, steps=8, log_every=1, checkpoint_every=4),
            "report_to": ["tensorboard"],
        }
    )
    from loramix.train import callbacks

    original = callbacks.Checkpointer.on_step_end

    def die_at_step_six(self, trainer, logs):
        original(self, trainer, logs)
        if trainer.step == 6:  # after steps 5 and 6 were logged; the last checkpoint is step 4's
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(callbacks.Checkpointer, "on_step_end", die_at_step_six)
        run_training(run, tmp_path / "run")
    run_training(run, tmp_path / "run", resume=True)
    run_training(run, tmp_path / "straight")
    resumed = scalars(tmp_path / "run" / "tensorboard" / "run")["loss"]
    straight = scalars(tmp_path / "straight" / "tensorboard" / "straight")["loss"]
    assert [step for step, _ in resumed] == list(range(1, 9))  # 5 and 6 once: as the resumed run logged them
    assert dict(resumed) == pytest.approx(dict(straight))


def test_a_phased_method_gives_each_phase_its_own_tracker_run(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    from tests.methods.test_continual import continual_run

    run = continual_run(model_dir, tasks_dir, "continual-mola-grad", steps_per_task=2, log_every=1)
    run_training(run.model_copy(update={"report_to": ["tensorboard"]}), tmp_path / "seq")
    for task in range(3):
        folder = tmp_path / "seq" / f"task-{task}" / "tensorboard" / "seq" / f"task-{task}"
        assert [step for step, _ in scalars(folder)["loss"]] == [1, 2]


def test_a_tracker_named_but_not_installed_stops_the_run_before_any_work(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.setattr(trackers, "available_trackers", lambda: {"tensorboard"})
    config = toys.write_yaml(
        tmp_path / "run.yaml", {**toys.settings(model_dir, tasks_dir), "report_to": ["wandb"]}
    )
    assert main(["train", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert "report_to: wandb not installed (pip install wandb)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"wandb, mlflow not installed \(pip install wandb mlflow\)"):
        chosen_trackers(["wandb", "mlflow", "tensorboard"])
    assert chosen_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert chosen_trackers(None) == ["tensorboard"] and chosen_trackers([]) == []
    monkeypatch.setattr(trackers, "available_trackers", set)
    assert chosen_trackers(None) == []  # the default: TensorBoard where it is installed, else nothing


def test_a_tracker_that_fails_to_start_says_which(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from accelerate.tracking import TensorBoardTracker

    def refuse(self):
        raise RuntimeError("no store at that address\nmore detail")

    monkeypatch.setattr(TensorBoardTracker, "start", refuse)
    run = RunConfig.from_dict({**toys.settings(model_dir, tasks_dir, steps=2), "report_to": ["tensorboard"]})
    with pytest.raises(
        ConfigError, match=r"^report_to: tensorboard did not start: no store at that address$"
    ):
        run_training(run, tmp_path / "run")


def test_hyperparameters_are_plain_values_or_json():
    settings = {
        "lr": 1e-3,
        "method": "lora",
        "top_k": None,
        "keep_best": False,
        "tasks": ["a", "b"],
        "x": {"b": 1},
    }
    assert hyperparameters(settings) == {
        "lr": 1e-3,
        "method": "lora",
        "top_k": None,
        "keep_best": False,
        "tasks": '["a", "b"]',
        "x": '{"b": 1}',
    }
