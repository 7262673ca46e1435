"""The classification heads' loss: cross-entropy on the sample's own task's classes, with label smoothing spread over
those classes alone (never another task's columns), and squared error for a regression task, against a loop over
the samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramix.errors import ConfigError
from loramix.heads import TaskHeads
from loramix.methods import run_training
from loramix.train.config import RunConfig
from tests.train import toys

NUM_LABELS, REGRESSION = [2, 3, 1, 4], [False, False, True, False]


def loop_loss(
    logits: torch.Tensor, labels: torch.Tensor, tasks: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """The reference: each sample's own columns, its log-softmax, and the smoothed target, one at a time."""
    offsets = [sum(NUM_LABELS[:t]) for t in range(len(NUM_LABELS))]
    losses = []
    for row, label, task in zip(logits, labels.tolist(), tasks.tolist()):
        own = row[offsets[task] : offsets[task] + NUM_LABELS[task]]
        if REGRESSION[task]:
            losses.append((own[0] - label) ** 2)
            continue
        log_probs = own.log_softmax(-1)
        losses.append(-(1 - smoothing) * log_probs[int(label)] - smoothing * log_probs.mean())
    return torch.stack(losses)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_loss_spreads_smoothing_over_the_tasks_own_classes(smoothing: float):
    torch.manual_seed(0)
    heads = TaskHeads(8, NUM_LABELS, REGRESSION, label_smoothing=smoothing)
    tasks = torch.tensor([0, 1, 2, 3, 1, 3, 0, 2])
    labels = torch.tensor([1, 2, 0.5, 3, 0, 1, 0, -1.25])
    logits = heads(torch.randn(8, 8), {"task_ids": tasks})
    got = heads.per_sample_loss(logits, labels, tasks)
    torch.testing.assert_close(got, loop_loss(logits, labels, tasks, smoothing))
    got.sum().backward()  # the other tasks' -inf columns give no NaN gradient
    assert all(torch.isfinite(p.grad).all() for p in heads.parameters())


def test_smoothing_lifts_the_loss_of_a_confident_right_answer():
    heads = TaskHeads(2, [3], label_smoothing=0.3)
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    smoothed = heads.per_sample_loss(logits, torch.tensor([0]), torch.tensor([0]))
    plain = -logits.log_softmax(-1)
    assert float(smoothed) == pytest.approx(0.7 * float(plain[0, 0]) + 0.3 * float(plain.mean()))
    assert float(plain[0, 0]) < 1e-3  # the plain loss of a confident right answer is near 0
    assert float(smoothed) > 1.9  # 0.3 of the mean of 0, 10 and 10


def test_a_run_with_a_classification_head_takes_label_smoothing(
    model_dir: Path, tasks_dir: Path, gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    run = RunConfig.from_dict(
        toys.settings(model_dir, tasks_dir, method="lora", steps=2, label_smoothing=0.1)
    )
    assert run.head == "classification"
    run_training(run, tmp_path / "run")
    generation = RunConfig.from_dict(toys.gen_settings(gpt2_dir, gen_tasks_dir, steps=1, label_smoothing=0.1))
    with pytest.raises(ConfigError, match="label_smoothing: generation tasks"):
        run_training(generation, tmp_path / "gen")
