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
from loramix.train.model import MultiTaskModel
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

    `progress`: a bar over the batches on stderr, shown only when stderr is a terminal (False: never)."""
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
        return {**metrics, "routing": gates.summary(data.task_names)}
    model.eval()
    device = next(model.parameters()).device
    tasks: dict[str, Any] = {}
    scored = data.scored_tasks(split)
    chosen = [data.eval_examples(split, task.task_id, max_examples) for task in scored]
    bar = progress_bar(chosen, batch_size, split, progress)
    with model.heads.inference_cache():  # class texts encoded once, not per batch
        for task, examples in zip(scored, chosen):
            bar.set_postfix(task=task.name)
            preds, labels = [], []
            for start in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in collator(examples[start : start + batch_size]).items()}
                with routed(model, batch) as state:
                    preds.append(model.heads.predict(model, batch).cpu())
                labels.append(batch["labels"].cpu())
                gates.add(state, batch)
                bar.update(1)
            tasks[task.name] = task_scores(
                torch.cat(preds).numpy(), torch.cat(labels).numpy(), task.task_type
            )
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
