"""`JsonlLogger` keeps `metrics.jsonl` one line per step when a run resumes from a checkpoint; callbacks see the
gates of every step."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from loramix.data import MultiTaskData, TextCollator
from loramix.methods import get_method
from loramix.train.callbacks import Callback, JsonlLogger
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
