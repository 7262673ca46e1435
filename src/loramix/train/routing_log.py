"""What the learned routers chose on the training batches.

A router that reads the input decides, while it is still learning, which expert trains on each sample. Its routing
at the end (the `routing` of a run's evaluation) does not show what the experts learned from on the way. For every
learned router, :class:`RoutingLog` counts how many training samples of each task took each expert as their top
choice (per-token gates averaged over the real tokens first, as the evaluation does):

- every logged step gets `route_purity`, the purity of the choices since the logged step before (each expert mapped to
  the task it took most samples of, as in :func:`loramix.report.routing_stats.routing_summary`; the mean over the
  layers of per-layer routers), so it reaches `metrics.jsonl`, the trackers and their plots;
- the end of training writes `routing-train.json`: the counts over the whole run for each router, its purity, and for
  each expert the task it served most and the share of its training samples that came from other tasks.

Routers that send each task to its own expert (task ids) log nothing: their choices are given, not learned.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from loramix.io.files import atomic_write_json
from loramix.report.routing_stats import count_purity
from loramix.train.eval_log import sample_gates
from loramix.train.loop import Callback, Trainer, sum_over_processes
from loramix.train.step import StepResult

ROUTING_TRAIN_FILE = "routing-train.json"


def purity(counts: torch.Tensor) -> float | None:
    """Share of the counted samples whose expert's most frequent task is their own; `counts` is `(t, e)`."""
    score, _ = count_purity(counts.T.numpy())
    return None if math.isnan(score) else score


def experts_summary(counts: torch.Tensor, task_names: list[str]) -> list[dict[str, Any]]:
    """Each expert's samples, the task it took most of, and the share that came from the other tasks."""
    _, expert_task = count_purity(counts.T.numpy())
    out = []
    for column, task in zip(counts.T.tolist(), expert_task):
        samples = sum(column)
        out.append(
            {
                "samples": samples,
                "task": None if task is None else task_names[task],
                "other_tasks": None if task is None else 1 - column[task] / samples,
            }
        )
    return out


class RoutingLog(Callback):
    """Counts each learned router's top choice per task on the training batches (module docstring); writes
    `routing-train.json` into `output_dir` when training ends. The counts are summed over the processes at every
    step, so that every process holds the whole run's and a checkpoint saves them whole."""

    def __init__(self, output_dir: Path, task_names: list[str] | None = None) -> None:
        """`task_names`: the name of each task id the batches carry; default: the trainer's data's tasks (a
        continued continual run gives every task its model knows, the earlier run's first)."""
        self.path = Path(output_dir) / ROUTING_TRAIN_FILE
        self.task_names = task_names
        self.step: dict[str, torch.Tensor] = {}  # router -> (t, e) of this step, this process's samples
        self.recent: dict[str, torch.Tensor] = {}  # router -> (t, e) since the last logged step
        self.total: dict[str, torch.Tensor] = {}  # router -> (t, e) over the run

    def on_train_start(self, trainer: Trainer) -> None:
        self.task_names = list(self.task_names or trainer.data.task_names)

    def on_batch_end(self, trainer: Trainer, batch: dict[str, Any], result: StepResult) -> None:
        """Counted where the gates are: the step's counts are read to the host once, when it ends."""
        for name, gates in sample_gates(result.state, batch):
            chosen = gates.detach().argmax(-1)
            counts = self.step.get(name)
            if counts is None:
                shape = (len(self.task_names), gates.shape[-1])
                counts = self.step[name] = torch.zeros(shape, dtype=torch.long, device=gates.device)
            task_ids = batch["task_ids"].to(chosen.device)
            counts.index_put_((task_ids, chosen), torch.ones_like(chosen), accumulate=True)

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.step:  # one collective and one read for every router; every process has the same routers
            names = list(self.step)
            summed = sum_over_processes(torch.cat([self.step[name].flatten() for name in names])).cpu()
            for name, counts in zip(names, summed.split([self.step[name].numel() for name in names])):
                counts = counts.view(self.step[name].shape)
                for table in (self.recent, self.total):
                    table[name] = table[name] + counts if name in table else counts
            self.step = {}
        if "loss" in logs and self.recent:
            scores = [score for counts in self.recent.values() if (score := purity(counts)) is not None]
            if scores:
                logs["route_purity"] = sum(scores) / len(scores)
            self.recent = {}

    def on_train_end(self, trainer: Trainer) -> None:
        if not self.total or not trainer.accelerator.is_main_process:
            return
        routers = {
            name: {
                "counts": counts.tolist(),
                "purity": purity(counts),
                "experts": experts_summary(counts, self.task_names),
            }
            for name, counts in self.total.items()
        }
        atomic_write_json(self.path, {"task_names": self.task_names, "routers": routers})

    def state_dict(self) -> dict[str, Any] | None:
        if not self.total:
            return None
        return {
            key: {name: counts.tolist() for name, counts in table.items()} for key, table in self.tables()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, table in self.tables():
            table.update(
                {name: torch.tensor(counts, dtype=torch.long) for name, counts in state[key].items()}
            )

    def tables(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """What a resumed run needs back: the counts since the last logged step too, so that its purity is exact."""
        return [("recent", self.recent), ("total", self.total)]
