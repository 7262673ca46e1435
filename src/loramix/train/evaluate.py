"""Evaluation: per-task accuracy and macro-F1 (generation tasks: scores of their generated text, see
:mod:`loramix.train.generation_eval`), and what the routers did on the evaluated inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score

from loramix.data import MultiTaskData
from loramix.train.config import RunConfig
from loramix.train.eval_log import GateLog, progress_bar, with_unscored
from loramix.train.generation_eval import RoutedAnswers, evaluate_generation
from loramix.train.model import MultiTaskModel, route_of
from loramix.train.shards import EvalBatches
from loramix.train.step import routed


def eval_options(run: RunConfig) -> dict[str, Any]:
    """A run's evaluation settings, as keyword arguments of `evaluate` and `evaluate_generation`."""
    return {
        "batch_size": run.eval_batch_size,
        "max_examples": run.max_eval_examples,
        "progress": run.progress,
        "max_new_tokens": run.max_new_tokens,
    }


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    data: MultiTaskData,
    collator: Any,
    *,
    split: str = "test",
    batch_size: int = 64,
    max_examples: int | None = None,
    progress: bool = True,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """`{"tasks": {name: {"accuracy", "macro_f1", "n"}}, "mean_accuracy", "routing"}` on `split`; generation
    tasks are scored by their generated text instead (:func:`~loramix.train.generation_eval.evaluate_generation`,
    which `max_new_tokens` goes to).

    `progress`: a bar over the batches on stderr, shown only when stderr is a terminal (False: never).

    Under several processes each scores its share of the batches and all of them get the whole result
    (:mod:`loramix.train.shards`): every process must call it."""
    gates = GateLog()
    if any(task.task_type == "generation" for task in data.tasks):
        metrics = evaluate_generation(
            model,
            data,
            collator,
            split=split,
            batch_size=batch_size,
            max_examples=max_examples,
            max_new_tokens=max_new_tokens,
            progress=progress,
            answers=RoutedAnswers(model, collator, gates),
        )
        gates.gather()
        return {**metrics, "routing": gates.summary(data.task_names)}
    model.eval()
    device = next(model.parameters()).device
    scored = data.scored_tasks(split)
    batches = EvalBatches(
        [data.eval_examples(split, task.task_id, max_examples) for task in scored], batch_size
    )
    bar = progress_bar(len(batches), split, progress)

    def score(_: int, examples: Any) -> tuple[torch.Tensor, torch.Tensor]:
        collated = collator(examples)  # one task's examples (EvalBatches)
        batch = {k: v.to(device) for k, v in collated.items()}
        with routed(model, batch, route_of(collated)) as state:
            preds = model.heads.predict(model, batch).cpu()
        gates.add(state, batch)
        return preds, batch["labels"].cpu()

    with model.heads.inference_cache():  # class texts encoded once, not per batch
        results = batches.map(score, bar, [task.name for task in scored])
    gates.gather()
    tasks: dict[str, Any] = {}
    for task, parts in zip(scored, results):
        preds, labels = zip(*parts)
        tasks[task.name] = task_scores(torch.cat(preds).numpy(), torch.cat(labels).numpy(), task.task_type)
    bar.close()
    model.train()
    metrics = {
        "tasks": tasks,
        "mean_accuracy": mean_accuracy(tasks),
        "routing": gates.summary(data.task_names),
    }
    return with_unscored(metrics, data, split)


def task_scores(y_pred: np.ndarray, y_true: np.ndarray, task_type: str) -> dict[str, Any]:
    """One task's scores: accuracy and macro-F1 for classification, mean squared error for regression."""
    if task_type == "regression":
        return {"mse": float(np.mean((y_pred - y_true) ** 2)), "n": len(y_true)}
    return {
        "accuracy": float(np.mean(y_pred == y_true)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "n": len(y_true),
    }


def mean_accuracy(tasks: dict[str, dict[str, Any]]) -> float | None:
    """The mean accuracy over the classification tasks; None when there are none."""
    accuracies = [m["accuracy"] for m in tasks.values() if "accuracy" in m]
    return float(np.mean(accuracies)) if accuracies else None
