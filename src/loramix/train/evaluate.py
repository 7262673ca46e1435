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


class GateLog:
    """What the learned routers did on evaluated batches: `add(state, batch)` after each routed forward,
    `summary(task_names)` at the end (the routing part of the metrics; empty for hard, task-given gates)."""

    def __init__(self) -> None:
        self.model: list[torch.Tensor] = []
        self.layers: dict[str, list[torch.Tensor]] = {}
        self.task_ids: list[torch.Tensor] = []

    def add(self, state: Any, batch: dict[str, torch.Tensor]) -> None:
        learned = [(name, g) for name, g in state.records if not g.hard]
        if learned:
            self.task_ids.append(batch["task_ids"].cpu())
        mask = batch.get("prompt_mask", batch.get("attention_mask"))
        for name, gate in learned:
            weights = _token_mean(gate.weights, mask) if gate.per_token else gate.weights
            target = self.model if name == "model" else self.layers.setdefault(name, [])
            target.append(weights.float().cpu())

    def summary(self, task_names: list[str]) -> dict[str, Any]:
        if not self.task_ids:
            return {}
        task_ids = torch.cat(self.task_ids).numpy()
        routing: dict[str, Any] = {}
        if self.model:
            routing["model"] = routing_summary(torch.cat(self.model).numpy(), task_ids, task_names)
        if self.layers:
            routing.update(
                per_layer_summary(
                    {k: torch.cat(v).numpy() for k, v in self.layers.items()}, task_ids, task_names
                )
            )
        return routing


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
    from tqdm.auto import tqdm

    gates = GateLog()
    if any(task.task_type == "generation" for task in data.tasks):
        from loramix.train.generation_eval import RoutedAnswers, evaluate_generation

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
            gates.add(state, batch)
            bar.update(1)
        tasks[task.name] = task_scores(torch.cat(preds).numpy(), torch.cat(labels).numpy(), task.task_type)
    bar.close()
    model.train()
    return {"tasks": tasks, "mean_accuracy": mean_accuracy(tasks), "routing": gates.summary(data.task_names)}


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
