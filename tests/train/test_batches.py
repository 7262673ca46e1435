"""The batch order that several processes share: accelerate's shards of it, resumed at any step, continue exactly
as uninterrupted shards do, whether or not an epoch splits evenly between the processes."""

from __future__ import annotations

import itertools

import pytest
from accelerate.data_loader import BatchSamplerShard

from loramix.data import TaskBalancedSampler
from loramix.train.batches import EpochBatches


def shards(
    examples: int, processes: int, resume_after: int | None = None, *, plain: bool = False
) -> list[list[list[int]]]:
    """Each process's first 12 batches, as accelerate deals them out; resumed after `resume_after` of them.
    `plain`: accelerate's shards of the sampler itself, as before batches were ordered for resuming."""
    task_ids = [i % 3 for i in range(examples)]
    taken = []
    for rank in range(processes):
        sampler = TaskBalancedSampler(task_ids, batch_size=4, seed=5)
        order = sampler if plain else EpochBatches(sampler, processes)
        if resume_after is not None:
            order.resume(resume_after)
        shard = BatchSamplerShard(order, num_processes=processes, process_index=rank)
        passes = itertools.chain.from_iterable(iter(shard) for _ in itertools.count())
        taken.append(list(itertools.islice(passes, 12 - (resume_after or 0))))
    return taken


@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("examples", [4, 12, 20, 24])  # 1, 3, 5 and 6 batches an epoch
def test_resumed_shards_continue_where_uninterrupted_ones_go(processes: int, examples: int):
    straight = shards(examples, processes)
    assert straight == shards(examples, processes, plain=True)  # uninterrupted runs train as they did
    for done in range(12):
        resumed = shards(examples, processes, resume_after=done)
        assert resumed == [shard[done:] for shard in straight], f"resumed after {done}"


def test_an_uneven_epoch_is_padded_with_its_own_first_batches():
    sampler = TaskBalancedSampler([0, 1] * 10, batch_size=4, seed=1)  # 5 batches an epoch
    epoch = list(TaskBalancedSampler([0, 1] * 10, batch_size=4, seed=1))
    order = EpochBatches(sampler, processes=2)
    assert len(order) == 6 and order.rounds == 3
    assert list(order) == [*epoch, epoch[0]]
    assert sampler.epoch == 1  # the sampler moved on by itself
