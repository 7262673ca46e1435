"""Scoring a continual learner: the accuracy row after each task (every task of the sequence, learned or not, as
the method routes), and where the auto-selector sends each task's inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loramix.data import MultiTaskData
from loramix.errors import DataError
from loramix.methods.continual.learner import Learner
from loramix.train.evaluate import task_scores
from loramix.train.run import eval_split

RouteAndPredict = Callable[[Learner, dict[str, Tensor]], tuple[Tensor, Tensor, Tensor]]
"""`(learner, batch) -> (route ids, keep-base mask, label indices)` of an evaluation batch."""


@torch.no_grad()
def accuracy_row(
    learner: Learner, route_and_predict: RouteAndPredict, split: str | None = None
) -> list[float]:
    """Accuracy on every task of the sequence (a fixed sample of each test split), each batch routed and answered by
    `route_and_predict`; with an auto-selector, where it sent the learned and the unlearned tasks' inputs is
    appended to `learner.records["selector_rows"]`."""
    model, data, run = learner.model, learner.data, learner.run
    model.eval()
    split = every_task_has(data, split or eval_split(data))
    row, own, seen, base, unseen = [], 0, 0, 0, 0
    learner.scores = {}
    for task in data.tasks:
        examples = data.eval_examples(split, task.task_id, run.max_eval_examples)
        correct, predictions, labels = 0, [], []
        for batch in learner.batches(examples, run.eval_batch_size):
            route, keep, predicted = route_and_predict(learner, batch)
            correct += int((predicted == batch["labels"].float()).sum())
            predictions.append(predicted.cpu())
            labels.append(batch["labels"].float().cpu())
            if learner.learned[learner.offset + task.task_id]:
                global_id = learner.offset + task.task_id
                own, seen = own + int(((route == global_id) & ~keep).sum()), seen + len(keep)
            else:
                base, unseen = base + int(keep.sum()), unseen + len(keep)
        row.append(correct / max(len(examples), 1))
        learner.scores[task.name] = task_scores(
            torch.cat(predictions).numpy(), torch.cat(labels).numpy(), task.task_type
        )
    if (
        learner.selector is not None
    ):  # where the selector sent learned and not yet learned tasks' inputs, per row
        learned = [i for i, done in enumerate(learner.learned) if done]
        learner.records.setdefault("selector_rows", []).append(
            {
                "after": learner.task_names[learned[-1]] if learned else None,
                "own_task_rate": own / seen if seen else None,
                "base_rate_unlearned": base / unseen if unseen else None,
            }
        )
    model.train()
    return row


@torch.no_grad()
def selector_confusion(learner: Learner, split: str | None = None) -> dict[str, Any]:
    """Where the auto-selector sends this run's tasks' test inputs once every task is learned:
    `confusion[task][chosen]`, one column per task the selector knows (earlier runs' first) and a last one for
    the base model; and the share of inputs sent to their own task."""
    assert learner.selector is not None
    data, run, offset = learner.data, learner.run, learner.offset
    known = learner.selector.num_tasks
    confusion = np.zeros((data.num_tasks, known + 1), dtype=int)
    for task in data.tasks:
        for batch in learner.batches(
            data.eval_examples(split or eval_split(data), task.task_id, run.max_eval_examples), 64
        ):
            chosen, keep = learner.select(batch)
            column = torch.where(keep, torch.full_like(chosen, known), chosen).cpu()
            np.add.at(confusion[task.task_id], column.numpy(), 1)
    own = sum(confusion[i, offset + i] for i in range(data.num_tasks)) / max(confusion.sum(), 1)
    return {
        "confusion": confusion.tolist(),
        "own_task_rate": float(own),
        "task_names": learner.task_names,
    }


def every_task_has(data: MultiTaskData, split: str) -> str:
    """`split`, once every task is known to have examples in it: the accuracy matrix scores every task."""
    missing = data.missing(split)
    if missing:
        raise DataError(
            f"a continual run scores every task after every task, on its {split!r} split; task(s) "
            f"{', '.join(missing)} have none: give them a {split} file"
        )
    return split
