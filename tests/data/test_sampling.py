from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from loramix.data import TaskBalancedSampler, task_probabilities
from loramix.errors import ConfigError, DataError

SIZES = [600, 300, 100]
TASK_IDS = [t for t, size in enumerate(SIZES) for _ in range(size)]
TASK_OF = np.asarray(TASK_IDS)


def sampler(**kwargs: object) -> TaskBalancedSampler:
    options: dict[str, object] = {"batch_size": 16, "seed": 7, **kwargs}
    return TaskBalancedSampler(TASK_IDS, **options)


def test_same_seed_same_batches_other_seed_or_epoch_different():
    first = list(sampler())
    assert first == list(sampler())
    assert first != list(sampler(seed=8))
    again = sampler()
    again.set_epoch(1)
    assert list(again) != first


def test_batches_have_batch_size_valid_indices_and_default_length():
    batches = list(sampler())
    assert len(batches) == len(sampler()) == sum(SIZES) // 16
    assert all(len(batch) == 16 for batch in batches)
    flat = [i for batch in batches for i in batch]
    assert min(flat) >= 0 and max(flat) < sum(SIZES)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("proportional", [0.6, 0.3, 0.1]),
        ("uniform", [1 / 3, 1 / 3, 1 / 3]),
        ("temperature", list(np.sqrt(SIZES) / np.sqrt(SIZES).sum())),
        ("uniform-weighted", [1 / 6, 2 / 6, 3 / 6]),  # the factors 1, 2, 3 alone
        ("proportional-weighted", [600 / 1300, 600 / 1300, 100 / 1300]),  # 600 x 1, 300 x 2, 100 x 1
    ],
)
@pytest.mark.parametrize("single_task_batches", [False, True])
def test_task_frequencies_follow_the_mode(mode: str, expected: list[float], single_task_batches: bool):
    options = {"batch_size": 4, "num_batches": 20_000, "single_task_batches": single_task_batches}
    mode, _, weighted = mode.partition("-")
    if weighted:
        options["weights"] = [1.0, 2.0, 3.0] if mode == "uniform" else [1.0, 2.0, 1.0]
    batches = list(sampler(mode=mode, temperature=2.0, **options))  # 20k task draws at least: std <= 0.0035
    counts = np.bincount(TASK_OF[np.concatenate(batches)], minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.015)


def test_each_task_is_drawn_without_replacement_until_it_runs_out():
    batches = list(sampler(mode="uniform", num_batches=200))
    per_task: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for index in (i for batch in batches for i in batch):
        per_task[int(TASK_OF[index])].append(index)
    small = per_task[2]
    assert len(small) > 2 * SIZES[2]  # the small task wrapped around at least twice
    for start in range(0, len(small) - SIZES[2] + 1, SIZES[2]):
        assert len(set(small[start : start + SIZES[2]])) == SIZES[2]


def test_single_task_batches_hold_one_task():
    batches = list(sampler(single_task_batches=True, num_batches=100))
    assert all(len(set(TASK_OF[batch].tolist())) == 1 for batch in batches)
    assert set(Counter(int(TASK_OF[batch[0]]) for batch in batches)) == {0, 1, 2}


@pytest.mark.parametrize("single_task_batches", [False, True])
@pytest.mark.parametrize("consumed", [0, 1, 17, 61])
def test_resume_after_k_batches_matches_the_uninterrupted_run(consumed: int, single_task_batches: bool):
    uninterrupted = sampler(single_task_batches=single_task_batches)
    epoch0, epoch1 = list(uninterrupted), list(uninterrupted)

    interrupted = sampler(single_task_batches=single_task_batches)
    iterator = iter(interrupted)
    seen = [next(iterator) for _ in range(consumed)]
    state = interrupted.state_dict()
    assert state == {"seed": 7, "epoch": 0, "batches_consumed": consumed}

    resumed = sampler(single_task_batches=single_task_batches)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a loop that calls set_epoch at each epoch start keeps the resume point
    rest = list(resumed)
    assert seen + rest == epoch0
    assert len(rest) == len(epoch0) - consumed
    assert list(resumed) == epoch1  # then it moves on to the next epoch by itself


def test_resume_from_a_step_count_in_a_later_epoch():
    full = sampler()
    full.set_epoch(3)
    expected = list(full)[10:]
    resumed = sampler()
    resumed.load_state_dict({"seed": 7, "epoch": 3, "batches_consumed": 10})
    assert list(resumed) == expected


def test_resume_at_the_end_of_an_epoch_starts_the_next():
    full = sampler()
    epoch1 = (list(full), list(full))[1]
    resumed = sampler()
    resumed.load_state_dict({"seed": 7, "epoch": 0, "batches_consumed": len(full)})
    assert list(resumed) == epoch1


def test_load_state_dict_refuses_another_seed_or_too_many_batches():
    with pytest.raises(ConfigError, match="seed 3"):
        sampler().load_state_dict({"seed": 3, "epoch": 0, "batches_consumed": 0})
    with pytest.raises(ConfigError, match="batches_consumed=999"):
        sampler().load_state_dict({"seed": 7, "epoch": 0, "batches_consumed": 999})


def test_task_probabilities():
    np.testing.assert_allclose(task_probabilities([900, 100], "temperature", temperature=2.0), [0.75, 0.25])
    np.testing.assert_allclose(task_probabilities([900, 100], "temperature", temperature=1.0), [0.9, 0.1])
    np.testing.assert_allclose(task_probabilities([5, 0, 5], "uniform"), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(task_probabilities([900, 100], "uniform", weights=[1, 3]), [0.25, 0.75])
    weighted = task_probabilities([900, 100], "temperature", temperature=2.0, weights=[1, 3])
    np.testing.assert_allclose(weighted, [0.5, 0.5])  # 30 x 1 against 10 x 3
    np.testing.assert_allclose(task_probabilities([5, 0, 5], "uniform", weights=[1, 9, 3]), [0.25, 0.0, 0.75])


def test_tasks_without_examples_are_never_drawn():
    batches = list(
        TaskBalancedSampler([0, 0, 0, 2, 2], batch_size=2, mode="uniform", num_batches=50, num_tasks=4)
    )
    assert {i for batch in batches for i in batch} == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "balanced"}, ConfigError, "mode must be one of"),
        ({"batch_size": 0}, ConfigError, "batch_size"),
        ({"mode": "temperature", "temperature": 0.0}, ConfigError, "temperature"),
        ({"num_batches": 0}, ConfigError, "num_batches"),
        ({"num_tasks": 2}, DataError, "task id 2 is outside 0..1"),
        ({"weights": [1.0, 2.0]}, ConfigError, "one positive factor a task, 3 in all"),
        ({"weights": [1.0, 0.0, 1.0]}, ConfigError, "one positive factor a task"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], message: str):
    with pytest.raises(error, match=message):
        sampler(**kwargs)
