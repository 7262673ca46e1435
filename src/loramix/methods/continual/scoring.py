"""Scoring a continual learner: the accuracy row after each task (every task of the sequence, learned or not, as
the method routes), where the auto-selector sends each task's inputs, and how often it answers them right when
their task is not given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loramix.data import MultiTaskData
from loramix.errors import DataError
from loramix.methods.continual.decided import Decided
from loramix.methods.continual.learner import Learner
from loramix.train.evaluate import task_scores
from loramix.train.predict import UNKNOWN_TASK
from loramix.train.run import eval_split
from loramix.train.shards import EvalBatches

Answer = Callable[[Learner, dict[str, Tensor]], tuple[Tensor, Tensor, Tensor, Decided]]
"""`(learner, batch) -> (route ids, keep-base mask, task ids, (label indices, their probabilities))`; a task id
UNKNOWN_TASK in the batch is chosen by the method (:meth:`loramix.methods.continual.sequence.Continual.answer`)."""


@torch.no_grad()
def accuracy_row(learner: Learner, answer: Answer, split: str | None = None) -> list[float]:
    """Accuracy on every task of the sequence (a fixed sample of each test split), each batch routed and answered by
    `answer`; with an auto-selector, where it sent the learned and the unlearned tasks' inputs is appended to
    `learner.records["selector_rows"]`."""
    model, data, run = learner.model, learner.data, learner.run
    model.eval()
    split = every_task_has(data, split or eval_split(data))
    chosen = [data.eval_examples(split, task.task_id, run.max_eval_examples) for task in data.tasks]
    batches = EvalBatches(chosen, run.eval_batch_size)

    def score(_: int, examples: Any) -> tuple[Tensor, ...]:
        batch = learner.collated(examples)
        route, keep, _, predicted = answer(learner, batch)
        return route.cpu(), keep.cpu(), predicted.labels.cpu(), batch["labels"].float().cpu()

    with model.heads.inference_cache():
        results = batches.map(score)
    row, own, seen, base, unseen = [], 0, 0, 0, 0
    learner.scores = {}
    for task, examples, parts in zip(data.tasks, chosen, results):
        route, keep, predicted, labels = (torch.cat(column) for column in zip(*parts))
        row.append(int((predicted == labels).sum()) / max(len(examples), 1))
        learner.scores[task.name] = task_scores(predicted.numpy(), labels.numpy(), task.task_type)
        global_id = learner.offset + task.task_id
        if learner.learned[global_id]:
            own, seen = own + int(((route == global_id) & ~keep).sum()), seen + len(keep)
        else:
            base, unseen = base + int(keep.sum()), unseen + len(keep)
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
def selector_confusion(learner: Learner, answer: Answer, split: str | None = None) -> dict[str, Any]:
    """Where the auto-selector sends this run's tasks' test inputs once every task is learned:
    `confusion[task][chosen]`, one column per task the selector knows (earlier runs' first) and a last one for
    the base model; the share of inputs sent to their own task; and the share answered right with no input's task
    given (`task_free_accuracy`, per task, and its mean: the selector's task must be the input's own, or on the
    base the task of the nearest class among every task's, and the class the right one)."""
    assert learner.selector is not None
    model, data, run, offset = learner.model, learner.data, learner.run, learner.offset
    known = learner.selector.num_tasks
    confusion = np.zeros((data.num_tasks, known + 1), dtype=int)
    right = np.zeros(data.num_tasks)
    training = model.training
    model.eval()
    chosen = [
        data.eval_examples(split or eval_split(data), task.task_id, run.max_eval_examples)
        for task in data.tasks
    ]

    def score(task: int, examples: Any) -> tuple[Tensor, Tensor]:
        batch = learner.collated(examples)
        unknown = torch.full_like(batch["task_ids"], UNKNOWN_TASK)
        route, keep, tasks, predicted = answer(learner, {**batch, "task_ids": unknown})
        hit = (tasks == offset + data.tasks[task].task_id) & (predicted.labels == batch["labels"].float())
        return torch.where(keep, torch.full_like(route, known), route).cpu(), hit.cpu()

    with model.heads.inference_cache():
        results = EvalBatches(chosen, 64).map(score)
    for task, parts in zip(data.tasks, results):
        for column, hit in parts:
            np.add.at(confusion[task.task_id], column.numpy(), 1)
            right[task.task_id] += int(hit.sum())
    model.train(training)
    own = sum(confusion[i, offset + i] for i in range(data.num_tasks)) / max(confusion.sum(), 1)
    accuracy = right / np.maximum(confusion.sum(1), 1)
    return {
        "confusion": confusion.tolist(),
        "own_task_rate": float(own),
        "task_names": learner.task_names,
        "task_free_accuracy": dict(zip(data.task_names, accuracy.tolist())),
        "task_free_mean": float(accuracy.mean()),
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
