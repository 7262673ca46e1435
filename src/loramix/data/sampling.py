"""Task-balanced batches: how often each task is seen is chosen on purpose, not left to the tasks' sizes.

Task t is drawn with probability p_t:
    proportional   p_t ∝ n_t            (every example about once per epoch)
    uniform        p_t ∝ 1              (small tasks repeat, large ones are seen partly)
    temperature    p_t ∝ n_t ** (1/T)   (T = 1 is proportional, T → ∞ is uniform; T2T/mT5 style, T ≈ 2..5)

times a factor w_t per task where one is given (weights; 1 otherwise), before normalising: w = (2, 1) draws the
first task twice as often as the mode alone would, relative to the second.

Each task serves examples from its own shuffled stream without replacement and reshuffles when the stream runs
out. The batches of an epoch are a pure function of (seed, epoch), so a run resumed after k batches gets the
same remaining batches as one that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch.utils.data

from loramix.errors import ConfigError, DataError

SamplingMode = Literal["proportional", "uniform", "temperature"]
_MODES = ("proportional", "uniform", "temperature")


class TaskBalancedSampler(torch.utils.data.Sampler[list[int]]):
    """Yields batches (lists of global example indices) with tasks drawn from the chosen distribution.

    Each batch draws every sample's task independently (mixed batches), or, with ``single_task_batches=True``,
    one task for the whole batch. An epoch has ``num_batches`` batches (default: examples // batch_size, at
    least 1). After a full pass the sampler moves to the next epoch by itself; :meth:`set_epoch` sets it.

    Resuming: :meth:`state_dict` records (seed, epoch, batches yielded). A DataLoader with workers prefetches
    batches, so the sampler runs ahead of training; store the trainer's own step count instead, with
    ``load_state_dict({"seed": s, "epoch": e, "batches_consumed": steps_done_in_epoch})``.

    Example:
        >>> sampler = TaskBalancedSampler(data.task_ids("train"), batch_size=32, mode="temperature", temperature=2)
        >>> loader = DataLoader(data.split("train"), batch_sampler=sampler, collate_fn=TextCollator(tokenizer))
    """

    def __init__(
        self,
        task_ids: Sequence[int],
        *,
        batch_size: int,
        mode: SamplingMode = "proportional",
        temperature: float = 2.0,
        num_batches: int | None = None,
        single_task_batches: bool = False,
        seed: int = 0,
        num_tasks: int | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ConfigError(f"mode must be one of {', '.join(_MODES)} (got {mode!r})")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1 (got {batch_size})")
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive (got {temperature})")
        if num_batches is not None and num_batches < 1:
            raise ConfigError(f"num_batches must be at least 1 (got {num_batches})")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative (got {seed})")
        ids = np.asarray(task_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise DataError("TaskBalancedSampler needs a non-empty sequence of task ids, one per example")
        if ids.min() < 0:
            raise DataError(f"task ids must be non-negative (got {int(ids.min())})")
        num_tasks = int(ids.max()) + 1 if num_tasks is None else num_tasks
        if ids.max() >= num_tasks:
            raise DataError(f"task id {int(ids.max())} is outside 0..{num_tasks - 1}")

        self.batch_size = batch_size
        self.mode = mode
        self.temperature = float(temperature)
        self.single_task_batches = single_task_batches
        self.seed = seed
        self.num_batches = num_batches if num_batches is not None else max(1, ids.size // batch_size)
        order = np.argsort(ids, kind="stable")
        self._groups = np.split(order, np.cumsum(np.bincount(ids, minlength=num_tasks))[:-1])
        self.probabilities = task_probabilities([len(g) for g in self._groups], mode, temperature, weights)
        self.epoch = 0
        self._start = 0  # batches of self.epoch to skip on the next pass (set by load_state_dict)
        self._consumed = 0

    @property
    def num_tasks(self) -> int:
        return len(self._groups)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        self._consumed = start
        for index, batch in enumerate(self._batches(self.epoch)):
            if index >= start:
                self._consumed = index + 1
                yield batch
        self.epoch, self._consumed = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the batches of ``epoch``. Setting the current epoch again keeps a pending resume point."""
        if epoch != self.epoch:
            self.epoch, self._start, self._consumed = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "batches_consumed": self._consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next pass yields the batches of ``state['epoch']`` after the first
        ``state['batches_consumed']``, exactly as an uninterrupted run would."""
        if int(state["seed"]) != self.seed:
            raise ConfigError(
                f"the saved sampler used seed {state['seed']} but this one uses seed {self.seed}"
            )
        consumed = int(state["batches_consumed"])
        if not 0 <= consumed <= self.num_batches:
            raise ConfigError(f"batches_consumed={consumed} is outside 0..num_batches={self.num_batches}")
        self.epoch, self._start, self._consumed = int(state["epoch"]), consumed, consumed
        if consumed == self.num_batches:
            self.epoch, self._start, self._consumed = self.epoch + 1, 0, 0

    def _batches(self, epoch: int) -> Iterator[list[int]]:
        """All batches of ``epoch``: a pure function of (seed, epoch)."""
        draws = np.random.default_rng([self.seed, epoch, 0])
        streams = [
            _Stream(group, np.random.default_rng([self.seed, epoch, 1, t]))
            for t, group in enumerate(self._groups)
        ]
        if self.single_task_batches:
            for task in draws.choice(self.num_tasks, size=self.num_batches, p=self.probabilities):
                yield streams[task].take(self.batch_size)
            return
        counts = draws.multinomial(
            self.batch_size, self.probabilities, size=self.num_batches
        )  # (batches, tasks)
        for row in counts:
            yield [index for task in np.flatnonzero(row) for index in streams[task].take(int(row[task]))]


def task_probabilities(
    sizes: Sequence[int],
    mode: SamplingMode,
    temperature: float = 2.0,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """p_t for tasks of ``sizes`` examples, each times its factor in ``weights`` (one a task, positive) before
    normalising; tasks without examples get 0.

    Example:
        >>> task_probabilities([900, 100], "temperature", temperature=2.0)   # array([0.75, 0.25])
        >>> task_probabilities([900, 100], "uniform", weights=[1, 3])        # array([0.25, 0.75])
    """
    counts = np.asarray(sizes, dtype=np.float64)
    if mode == "proportional":
        shares = counts
    elif mode == "uniform":
        shares = (counts > 0).astype(np.float64)
    elif mode == "temperature":
        shares = counts ** (1.0 / temperature)
    else:
        raise ConfigError(f"mode must be one of {', '.join(_MODES)} (got {mode!r})")
    if weights is not None:
        factors = np.asarray(weights, dtype=np.float64)
        if factors.shape != counts.shape or not (factors > 0).all():
            raise ConfigError(
                f"weights: one positive factor a task, {len(counts)} in all (got {list(weights)})"
            )
        shares = shares * factors
    if shares.sum() <= 0:
        raise DataError("no task has any examples to sample")
    return shares / shares.sum()


class _Stream:
    """One task's examples in shuffled order, reshuffled each time they run out."""

    def __init__(self, indices: np.ndarray, rng: np.random.Generator) -> None:
        self.indices, self.rng = indices, rng
        self.order: np.ndarray = indices[:0]
        self.position = 0

    def take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            if self.position == len(self.order):
                self.order, self.position = self.rng.permutation(self.indices), 0
            chunk = self.order[self.position : self.position + count - len(taken)]
            self.position += len(chunk)
            taken.extend(chunk.tolist())
        return taken
