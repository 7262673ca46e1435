"""Exact resumption: a run interrupted after a checkpoint and resumed ends bitwise where an uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loramix.methods import run_training
from loramix.train import callbacks
from loramix.train.config import RunConfig
from tests.train import toys


class Interrupted(Exception):
    pass


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    history = [{k: v for k, v in h.items() if k != "samples_per_s"} for h in metrics["history"]]
    return {**metrics, "history": history}


# (method, steps, checkpoint_every, max_train_examples): the second has 6 batches per epoch, so it stops in epoch 1.
CASES = [("mola-router", 12, 6, None), ("token-router", 12, 8, 16)]


@pytest.mark.parametrize(("method", "steps", "every", "max_train_examples"), CASES)
def test_an_interrupted_run_resumes_exactly(
    method: str,
    steps: int,
    every: int,
    max_train_examples: int | None,
    model_dir: Path,
    tasks_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    # Dropout on the adapters and in BERT itself, so the RNG state must be restored too.
    settings = toys.settings(
        model_dir,
        tasks_dir,
        method=method,
        steps=steps,
        log_every=1,
        dropout=0.2,
        twd_weight=0.5,
        max_train_examples=max_train_examples,
    )
    assert toys.tiny_bert_config().hidden_dropout_prob > 0
    straight = run_training(RunConfig.from_dict(settings), tmp_path / "straight")

    run = RunConfig.from_dict({**settings, "checkpoint_every": every})
    checkpoint_step = callbacks.Checkpointer.on_step_end

    def crash_one_step_after_the_checkpoint(self, trainer, logs):
        checkpoint_step(self, trainer, logs)
        if trainer.step == every + 1:
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.Checkpointer, "on_step_end", crash_one_step_after_the_checkpoint)
        with pytest.raises(Interrupted):
            run_training(run, tmp_path / "resumed")
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step-{every:06d}"
    assert not (tmp_path / "resumed" / "adapter").exists()

    resumed = run_training(run, tmp_path / "resumed", resume=True)

    a = load_file(tmp_path / "straight" / "adapter" / "adapters.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapters.safetensors")
    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert without_timings(resumed) == without_timings(straight)
    saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [h["step"] for h in saved["history"]] == list(range(1, steps + 1))
    logged = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == list(range(1, steps + 1))
    assert (checkpoints / "latest").read_text() == f"step-{steps:06d}"


def test_resuming_without_a_checkpoint_starts_from_step_zero(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="lora", steps=2))
    metrics = run_training(run, tmp_path, resume=True)
    assert "no checkpoint" in capsys.readouterr().out
    assert [h["step"] for h in metrics["history"]] == [2]
