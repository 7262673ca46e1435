"""Evaluation split among the processes of a distributed run: each process scores its own share of the batches,
and every process then holds every batch's result, in the order one process would have made them.

The batches are those one process would score (each task's chosen examples, `batch_size` at a time, task after
task), so a batch holds the same rows with or without other processes and its answers are the same bit for bit.
Process r takes the r-th contiguous run of that list, about a 1/N share; gathering the runs in process order puts
the results back in the list's order. With one process (or none initialised) nothing is gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def process_share() -> tuple[int, int]:
    """`(rank, world size)` of this process in the initialised process group; `(0, 1)` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_lists(items: list[R]) -> list[R]:
    """Every process's `items`, concatenated in process order (a collective: every process must call it)."""
    _, world = process_share()
    if world == 1:
        return items
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


class EvalBatches(Generic[T]):
    """The batches of every task's chosen examples (`chosen[i]`: task i's, in order), and this process's share.

    Iterate for `(task index, examples)` of this process's batches (`len()` of them); `per_task(results)` takes
    one result per batch iterated, in order, and gives every task's results from every process:
    `per_task(...)[i]` holds task i's, one per batch, in order."""

    def __init__(self, chosen: Sequence[Sequence[T]], batch_size: int) -> None:
        self.chosen, self.batch_size = chosen, batch_size
        self.plan = [
            (i, start) for i, examples in enumerate(chosen) for start in range(0, len(examples), batch_size)
        ]
        rank, world = process_share()
        self.mine = self.plan[len(self.plan) * rank // world : len(self.plan) * (rank + 1) // world]

    def __len__(self) -> int:
        return len(self.mine)

    def __iter__(self) -> Iterator[tuple[int, Sequence[T]]]:
        for task, start in self.mine:
            yield task, self.chosen[task][start : start + self.batch_size]

    def per_task(self, results: list[R]) -> list[list[R]]:
        if len(results) != len(self.mine):
            raise ValueError(f"per_task: {len(results)} results for this process's {len(self.mine)} batches")
        grouped: list[list[R]] = [[] for _ in self.chosen]
        for (task, _), result in zip(self.plan, gather_lists(results), strict=True):
            grouped[task].append(result)
        return grouped

    def map(
        self, score: Callable[[int, Sequence[T]], R], bar: Any = None, names: Sequence[str] = ()
    ) -> list[list[R]]:
        """`per_task` of `score(task index, examples)` on each of this process's batches. A `bar` is updated after
        each batch, its postfix the task's name (from `names`) where there are names."""
        results = []
        for task, examples in self:
            if bar is not None and names:
                bar.set_postfix(task=names[task], refresh=False)
            results.append(score(task, examples))
            if bar is not None:
                bar.update(1)
        return self.per_task(results)
