"""`JsonlLogger` keeps `metrics.jsonl` one line per step when a run resumes from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from loramix.train.callbacks import JsonlLogger


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
