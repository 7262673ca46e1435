"""The order in which batches reach the processes, fixed so that a resumed run can enter it anywhere.

With several processes, accelerate deals the batches out in turn (batch i to process i mod n), so a step takes one
batch per process. When an epoch does not split evenly, accelerate pads its last round with the first batches it
saw in that pass, which, after a resume part-way through an epoch, are not the epoch's first batches. Padding here,
with the epoch's own first batches (what accelerate does on an uninterrupted pass), makes every epoch a fixed list
of whole rounds, and a resumed run can start at any round of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.utils.data

from loramix.data import TaskBalancedSampler


class EpochBatches(torch.utils.data.Sampler[list[int]]):
    """The sampler's batches, one epoch per pass, padded to whole rounds of `processes` batches; after
    :meth:`resume`, the next pass starts part-way.

    Skipped batches are drawn (lists of indices, cheap) but never loaded. Its sampler moves to the next epoch by
    itself; accelerate finds no `set_epoch` here to reset it with its own pass count.
    """

    def __init__(self, source: TaskBalancedSampler, processes: int = 1) -> None:
        super().__init__()
        if processes < 1:
            raise ValueError(f"processes must be at least 1 (got {processes})")
        self.source, self.processes = source, processes
        self.batch_size = source.batch_size  # accelerate reads these to shard the batches
        self.drop_last = False
        self._skip = 0

    def __len__(self) -> int:
        return self.rounds * self.processes

    @property
    def rounds(self) -> int:
        """Batches each process takes in one epoch."""
        return -(-len(self.source) // self.processes)

    def resume(self, batches_per_process: int) -> None:
        """Continue after each process has taken `batches_per_process` batches (steps x gradient accumulation)."""
        epoch, done = divmod(batches_per_process, self.rounds)
        self.source.set_epoch(epoch)
        self._skip = done * self.processes

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        first: list[list[int]] = []
        count = 0
        for index, batch in enumerate(self.source):
            if index < self.processes:
                first.append(batch)
            if index >= skip:
                yield batch
            count = index + 1
        for index in range(count, len(self)):
            if index >= skip:
                yield first[(index - count) % len(first)]
