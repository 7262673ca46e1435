"""Evaluation: per-task accuracy and macro-F1, and what the routers did on the evaluated inputs.

A progress bar counts the batches (on a large test split, evaluation runs for minutes after training ends, and a
silent terminal looks hung); like the training bar, it shows only on a terminal and when the run's `progress` is
on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score

from loramix.data import MultiTaskData
from loramix.train.model import MultiTaskModel
from loramix.train.routing_stats import per_layer_summary, routing_summary
from loramix.train.step import routed


def _token_mean(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A per-token gate `(n, t, e)` averaged over real tokens -> `(n, e)`."""
    if mask is None or mask.shape != weights.shape[:2]:
        return weights.mean(1)
    m = mask.to(weights.dtype)[..., None]
    return (weights * m).sum(1) / m.sum(1).clamp_min(1.0)


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
) -> dict[str, Any]:
    """`{"tasks": {name: {"accuracy", "macro_f1", "n"}}, "mean_accuracy", "routing"}` on `split`.

    `progress`: a bar over the batches on stderr, shown only when stderr is a terminal (False: never)."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    tasks: dict[str, Any] = {}
    model_gates, layer_gates, gate_tasks = [], {}, []
    chosen = [data.eval_examples(split, task.task_id, max_examples) for task in data.tasks]
    bar = tqdm(
        total=sum(math.ceil(len(examples) / batch_size) for examples in chosen),
        desc=f"eval {split}",
        unit="batch",
        dynamic_ncols=True,
        leave=False,
        disable=None if progress else True,  # None: tqdm's own check, off when stderr is not a terminal
    )
    for task, examples in zip(data.tasks, chosen):
        bar.set_postfix(task=task.name)
        preds, labels = [], []
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collator(examples[start : start + batch_size]).items()}
            with routed(model, batch) as state:
                preds.append(model.heads.predict(model, batch).cpu())
            labels.append(batch["labels"].cpu())
            learned = [(name, g) for name, g in state.records if not g.hard]
            if learned:
                gate_tasks.append(batch["task_ids"].cpu())
            for name, gate in learned:
                weights = (
                    _token_mean(gate.weights, batch.get("attention_mask")) if gate.per_token else gate.weights
                )
                if name == "model":
                    model_gates.append(weights.float().cpu())
                else:
                    layer_gates.setdefault(name, []).append(weights.float().cpu())
            bar.update(1)
        tasks[task.name] = task_scores(torch.cat(preds).numpy(), torch.cat(labels).numpy(), task.task_type)
    bar.close()
    routing: dict[str, Any] = {}
    if gate_tasks:
        task_ids = torch.cat(gate_tasks).numpy()
        if model_gates:
            routing["model"] = routing_summary(torch.cat(model_gates).numpy(), task_ids, data.task_names)
        if layer_gates:
            routing.update(
                per_layer_summary(
                    {k: torch.cat(v).numpy() for k, v in layer_gates.items()}, task_ids, data.task_names
                )
            )
    model.train()
    return {"tasks": tasks, "mean_accuracy": mean_accuracy(tasks), "routing": routing}


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
