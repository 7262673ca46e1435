"""What every evaluation shares: a progress bar over its batches, and the log of what the learned routers did on
the evaluated inputs (the `routing` part of the metrics).

A progress bar counts the batches (on a large test split, evaluation runs for minutes after training ends, and a
silent terminal looks hung); like the training bar, it shows only on a terminal and when the run's `progress` is
on.
"""

from __future__ import annotations

from typing import Any

import torch

from loramix.report.routing_stats import per_layer_summary, routing_summary
from loramix.train.shards import gather_lists


def _token_mean(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A per-token gate `(n, t, e)` averaged over real tokens -> `(n, e)`."""
    if mask is None or mask.shape != weights.shape[:2]:
        return weights.mean(1)
    m = mask.to(weights.dtype)[..., None]
    return (weights * m).sum(1) / m.sum(1).clamp_min(1.0)


def sample_gates(state: Any, batch: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Each learned router's gates on this batch as `(n, e)` per sample, named by its layer or `model` (per-token
    gates averaged over the real tokens; a task's hard gate is given, not learned, and left out)."""
    mask = batch.get("prompt_mask", batch.get("attention_mask"))
    return [
        (name, _token_mean(gate.weights, mask) if gate.per_token else gate.weights)
        for name, gate in state.records
        if not gate.hard
    ]


class GateLog:
    """What the learned routers did on evaluated batches: `add(state, batch)` after each routed forward,
    `summary(task_names)` at the end (the routing part of the metrics; empty for hard, task-given gates)."""

    def __init__(self) -> None:
        self.model: list[torch.Tensor] = []
        self.layers: dict[str, list[torch.Tensor]] = {}
        self.task_ids: list[torch.Tensor] = []

    def add(self, state: Any, batch: dict[str, torch.Tensor]) -> None:
        learned = sample_gates(state, batch)
        if learned:
            self.task_ids.append(batch["task_ids"].cpu())
        for name, weights in learned:
            target = self.model if name == "model" else self.layers.setdefault(name, [])
            target.append(weights.float().cpu())

    def gather(self) -> None:
        """Every process's log, in process order (a collective, after each scored its share of the batches:
        :mod:`loramix.train.shards`); nothing to do with one process."""
        self.task_ids = gather_lists(self.task_ids)
        self.model = gather_lists(self.model)
        layers: dict[str, list[torch.Tensor]] = {}
        for name, gates in gather_lists(list(self.layers.items())):
            layers.setdefault(name, []).extend(gates)
        self.layers = layers

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


def progress_bar(batches: int, split: str, progress: bool) -> Any:
    """A bar over this many batches, on stderr; shown only when stderr is a terminal and `progress` is on (tqdm's
    own check decides the first)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=batches,
        desc=f"eval {split}",
        unit="batch",
        dynamic_ncols=True,
        leave=False,
        disable=None if progress else True,
    )


def with_unscored(metrics: dict[str, Any], data: Any, split: str) -> dict[str, Any]:
    """`metrics`, with the tasks of `data` (a `MultiTaskData`) that have no example in `split` listed under
    `unscored_tasks` if there are any."""
    missing = data.missing(split)
    return {**metrics, "unscored_tasks": missing} if missing else metrics
