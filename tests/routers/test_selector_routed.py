"""Routed acceptance in the auto-selector (`accept_state="route"`): the task is chosen on the leading columns alone,
and only the chosen task accepts or rejects, on the trailing ones; equal to a loop over single-purpose selectors of
each part, and decided the same after save and load."""

from __future__ import annotations

import pytest
import torch

from loramix.errors import ConfigError
from loramix.routers.selector import AutoSelector

CHOICE, ACCEPT = 4, 3  # columns


def tasks_features(generator: torch.Generator) -> list[torch.Tensor]:
    """Three tasks' features: choice columns around one centre per task, acceptance columns around another."""
    return [
        torch.cat(
            [
                torch.randn(80, CHOICE, generator=generator) + 3 * t,
                torch.randn(80, ACCEPT, generator=generator) * (1 + t) - 5 * t,
            ],
            1,
        )
        for t in range(3)
    ]


@pytest.mark.parametrize(("neighbours", "choice"), [(0, "own"), (3, "shared")])
def test_routed_acceptance_equals_a_loop_of_one_choosing_and_one_accepting_selector(
    neighbours: int, choice: str
):
    generator = torch.Generator().manual_seed(0)
    options = {"threshold": "pooled", "neighbours": neighbours}
    routed = AutoSelector(
        CHOICE + ACCEPT, accept_width=ACCEPT, accept_state="route", choice=choice, **options
    )
    chooser = AutoSelector(CHOICE, choice=choice)  # fitted on the leading columns alone
    acceptor = AutoSelector(ACCEPT, **options)  # and on the trailing ones alone
    for features in tasks_features(generator):
        routed.add_task(features, seed=2)
        chooser.add_task(features[:, :CHOICE], seed=2)
        acceptor.add_task(features[:, CHOICE:], seed=2)
    assert routed.center.shape == (3, CHOICE) and routed.choice_width == CHOICE
    probe = torch.cat([torch.randn(60, CHOICE, generator=generator) * 4, torch.randn(60, ACCEPT) * 3], 1)
    route, keep = routed(probe)
    thresholds = acceptor.acceptance_thresholds()
    for i, x in enumerate(probe):
        one = x[None]
        scores = (
            chooser.shared_scores_loop(one[:, :CHOICE]) if choice == "shared" else chooser.errors_loop(one)
        )
        task = int(scores.argmin())
        error = acceptor.errors_loop(one[:, CHOICE:], accept=True)[0, task]
        assert int(route[i]) == task and bool(keep[i]) == bool(error > thresholds[task] + 1e-4)
    assert keep.any() and not keep.all()
    # the choice reads the leading columns only: other trailing columns change acceptance, never the route
    moved = torch.cat([probe[:, :CHOICE], probe[:, CHOICE:] + 10], 1)
    assert torch.equal(routed(moved)[0], route) and routed(moved)[1].all()
    torch.testing.assert_close(routed.posterior(probe), routed.posterior(probe[:, :CHOICE]))


def test_only_the_chosen_task_accepts_with_routed_acceptance():
    """An input chosen for task 0 whose trailing columns look like task 2's: the base-state rule accepts it (some
    task does), routed acceptance rejects it (task 0's route does not)."""
    generator = torch.Generator().manual_seed(1)
    routed = AutoSelector(CHOICE + ACCEPT, accept_width=ACCEPT, accept_state="route", threshold="pooled")
    base = AutoSelector(CHOICE + ACCEPT, accept_width=ACCEPT, threshold="pooled")
    features = tasks_features(generator)
    for each in features:
        routed.add_task(each, seed=0)
        base.add_task(each, seed=0)
    mixed = torch.cat([features[0][:20, :CHOICE], features[2][:20, CHOICE:]], 1)
    assert (routed(mixed)[0] == 0).all()
    assert routed(mixed)[1].all() and not base(mixed)[1].any()


def test_a_routed_selector_decides_the_same_after_save_and_load_and_needs_an_acceptance_stage():
    generator = torch.Generator().manual_seed(2)
    routed = AutoSelector(CHOICE + ACCEPT, accept_width=ACCEPT, accept_state="route", neighbours=2)
    for features in tasks_features(generator):
        routed.add_task(features)
    loaded = AutoSelector(CHOICE + ACCEPT)
    loaded.load_state(routed.state())
    assert loaded.accept_state == "route"
    probe = torch.randn(50, CHOICE + ACCEPT, generator=generator) * 4
    for got, want in zip(loaded(probe), routed(probe)):
        assert torch.equal(got, want)
    # saved before routed acceptance existed: acceptance of the base state
    old = AutoSelector(CHOICE + ACCEPT, accept_width=ACCEPT)
    old.add_task(tasks_features(generator)[0])
    state = {k: v for k, v in old.state().items() if k != "accept_routed"}
    loaded = AutoSelector(CHOICE + ACCEPT, accept_width=ACCEPT, accept_state="route")
    loaded.load_state(state)
    assert loaded.accept_state == "base"
    with pytest.raises(ConfigError, match="accept_state .*'route' with an acceptance stage"):
        AutoSelector(6, accept_state="route")
    with pytest.raises(ConfigError, match="accept_state must be one of"):
        AutoSelector(6, accept_width=2, accept_state="routed")
