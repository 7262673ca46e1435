"""The auto-selector (DDAS): every rule's batched errors equal a per-task loop, the Gaussian rule is each task's
likelihood, unfamiliar inputs go to the base, two stages accept and choose on their own columns, pooled thresholds
are one level over all learned tasks' held-out errors, and a saved selector decides as it did when fitted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loramix.errors import ConfigError
from loramix.routers.selector import AutoSelector


@pytest.mark.parametrize("rule", ["gaussian", "whiten", "l2"])
def test_the_selector_batched_errors_equal_the_loop_and_unfamiliar_inputs_go_to_the_base(rule: str):
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 3
    selector = AutoSelector(16, hidden=4, normalize=rule)
    for c in centres:
        selector.add_task(c + 0.1 * torch.randn(200, 16), epochs=300)
    probe = torch.cat([centres + 0.03 * torch.randn(3, 16), torch.randn(2, 16) * 3])  # near each centre; far
    torch.testing.assert_close(selector.errors(probe), selector.errors_loop(probe))
    tasks, keep = selector(probe)
    assert tasks[:3].tolist() == [0, 1, 2] and not keep[:3].any()
    assert keep[3:].all()  # far from every task's data


def test_the_whitened_selector_sends_far_inputs_to_the_base_where_the_l2_rule_cannot():
    """Two tasks around the same centre, one spread 10 times wider: every direction is as likely in both, so the
    paper's rule, which sees L2-normalised features only, accepts inputs 10 times further out still; whitened by
    each task's own statistics, they are unfamiliar to both and go to the base, and the wide task keeps its own."""
    generator = torch.Generator().manual_seed(0)
    broad, narrow = (
        torch.randn(400, 8, generator=generator) * 3,
        torch.randn(400, 8, generator=generator) * 0.3,
    )
    own, far = torch.randn(100, 8, generator=generator) * 3, torch.randn(100, 8, generator=generator) * 30
    kept = {}
    for normalize in ("whiten", "l2"):
        selector = AutoSelector(8, hidden=4, normalize=normalize)
        selector.add_task(broad, epochs=300)
        selector.add_task(narrow, epochs=300)
        torch.testing.assert_close(selector.errors(far), selector.errors_loop(far))
        tasks, keep = selector(own)
        kept[normalize] = selector(far)[1].float().mean()
        if normalize == "whiten":
            assert keep.float().mean() <= 0.2 and (tasks[~keep] == 0).all()
    assert kept["whiten"] == 1.0 and kept["l2"] <= 0.1


def test_the_gaussian_selector_is_each_task_s_likelihood_and_picks_the_likeliest_accepting_task():
    """Two tasks with the same centre, one 10 times wider, plus a third far away. The Gaussian rule's score is
    each task's negative log-likelihood (doubled, up to a constant), as scipy computes it; the narrow task wins
    the inputs near the centre (more likely there), the broad one those out where only it accepts, and inputs far
    from every task go to the base."""
    from scipy.stats import multivariate_normal

    generator = torch.Generator().manual_seed(0)
    broad = torch.randn(600, 6, generator=generator) * 3
    narrow = torch.randn(600, 6, generator=generator) * 0.3
    other = torch.randn(600, 6, generator=generator) * 0.3 + 20
    selector = AutoSelector(6, normalize="gaussian", shrinkage=0.05)
    for features in (broad, narrow, other):
        selector.add_task(features)
    assert selector.enc_w.shape[0] == 0  # no autoencoder is fitted
    probe = torch.cat(
        [
            torch.randn(50, 6, generator=generator) * 0.3,  # the narrow task's own
            torch.randn(50, 6, generator=generator) * 0.3 + 20,  # the third's
            torch.full((1, 6), 3.0),  # outside the narrow task, inside the broad one
            torch.full((1, 6), -60.0),  # far from all
        ]
    )
    errors = selector.errors(probe)
    torch.testing.assert_close(errors, selector.errors_loop(probe))
    for t in range(3):
        covariance = torch.linalg.inv(selector.whitening[t].double() @ selector.whitening[t].double())
        density = multivariate_normal(selector.center[t].double().numpy(), covariance.numpy())
        expected = -2 * density.logpdf(probe.double().numpy()) - 6 * math.log(2 * math.pi)
        torch.testing.assert_close(errors[:, t].double(), torch.as_tensor(expected), rtol=1e-4, atol=1e-3)
    tasks, keep = selector(probe)
    assert (tasks[:50] == 1).float().mean() >= 0.9 and (tasks[50:100] == 2).float().mean() >= 0.9
    assert tasks[100] == 0 and not keep[100]
    assert keep[101]
    loaded = AutoSelector(6)
    loaded.load_state(selector.state())
    assert loaded.normalize == "gaussian"
    for a, b in zip(selector(probe), loaded(probe)):
        assert torch.equal(a, b)


def test_the_selector_keeps_its_rule_through_save_and_load_and_old_states_load_as_l2():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(200, 16, generator=generator) + 2
    probe = torch.cat(
        [torch.randn(20, 16, generator=generator) + 2, torch.randn(20, 16, generator=generator) * 5]
    )
    for normalize in ("whiten", "l2"):
        selector = AutoSelector(16, hidden=4, normalize=normalize)
        selector.add_task(train, epochs=100)
        loaded = AutoSelector(16, hidden=4)
        loaded.load_state(selector.state())
        assert loaded.normalize == normalize
        for a, b in zip(selector(probe), loaded(probe)):
            assert torch.equal(a, b)
    old = {
        k: v for k, v in selector.state().items() if k in ("enc_w", "enc_b", "dec_w", "dec_b", "thresholds")
    }
    loaded = AutoSelector(16, hidden=4)
    loaded.load_state(old)  # saved before the whiten rule existed
    assert loaded.normalize == "l2"
    for a, b in zip(selector(probe), loaded(probe)):
        assert torch.equal(a, b)


def test_a_two_stage_selector_accepts_by_its_last_columns_and_chooses_by_all_of_them():
    """Features of 10 columns, the last 4 deciding acceptance. Two tasks share those 4 columns' distribution and
    differ in the first 6: acceptance cannot tell them apart, the choice (all 10 columns) can. Moving an input's
    first 6 columns far away changes its task but never its keep-base mask; moving its last 4 sends it to the base."""
    generator = torch.Generator().manual_seed(0)

    def task(shift: float, n: int = 400) -> torch.Tensor:
        x = torch.randn(n, 10, generator=generator)
        x[:, :6] += shift
        return x

    selector = AutoSelector(10, normalize="gaussian", accept_width=4)
    for shift in (0.0, 4.0):
        selector.add_task(task(shift))
    assert selector.accept_width == 4 and selector.accept_center.shape == (2, 4)
    probe = torch.cat([task(0.0, 50), task(4.0, 50)])
    torch.testing.assert_close(selector.errors(probe), selector.errors_loop(probe))
    torch.testing.assert_close(selector.accept_errors(probe), selector.errors_loop(probe, accept=True))
    tasks, keep = selector(probe)
    assert (tasks[:50] == 0).float().mean() >= 0.9 and (tasks[50:] == 1).float().mean() >= 0.9
    assert keep.float().mean() <= 0.2  # each task's threshold is the 95th percentile of its held-out errors
    assert torch.equal(
        tasks, selector.scores(selector.errors(probe)).argmin(-1)
    )  # the likeliest of all tasks
    moved = probe.clone()
    moved[:, :6] += 40.0
    assert torch.equal(selector(moved)[1], keep)  # the first columns never decide acceptance
    moved = probe.clone()
    moved[:, 6:] += 40.0
    assert selector(moved)[1].all()  # unfamiliar in the acceptance columns: the base
    loaded = AutoSelector(10)
    loaded.load_state(selector.state())
    assert loaded.accept_width == 4
    for a, b in zip(selector(probe), loaded(probe)):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="accept_width"):
        AutoSelector(10, normalize="whiten", accept_width=4)


def held_out_errors(selector: AutoSelector, features: torch.Tensor, task: int, seed: int = 0) -> torch.Tensor:
    """Task `task`'s errors on the fifth of its features `add_task(seed=seed)` held out (the same draw), through the
    per-task loop."""
    order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
    held = features[order[: round(0.2 * features.shape[0])]]
    return selector.errors_loop(held, accept=True)[:, task]


@pytest.mark.parametrize("accept_width", [0, 3])
def test_a_pooled_threshold_is_one_level_over_every_learned_task_s_held_out_errors(accept_width: int):
    """A broad task and a narrow one around different centres. Pooled, both accept up to the 95th percentile of
    their held-out errors together (numpy's percentile of the per-task loop's errors), recomputed as tasks are
    added; an input of the narrow task just beyond its own threshold but below that level goes to it pooled and to
    the base with per-task thresholds; the pooled rule keeps its level through save and load."""
    generator = torch.Generator().manual_seed(0)
    broad = torch.randn(500, 6, generator=generator) * 3
    narrow = torch.randn(300, 6, generator=generator) * 0.3 + 10
    pooled = AutoSelector(6, threshold="pooled", accept_width=accept_width)
    own = AutoSelector(6, accept_width=accept_width)
    pooled.add_task(broad)
    torch.testing.assert_close(pooled.acceptance_thresholds(), pooled.thresholds)  # one task: its own
    pooled.add_task(narrow)
    for features in (broad, narrow):
        own.add_task(features)
    held = torch.cat([held_out_errors(pooled, broad, 0), held_out_errors(pooled, narrow, 1)])
    level = np.percentile(held.double().numpy(), 95)
    torch.testing.assert_close(
        pooled.acceptance_thresholds().double(), torch.full((2,), level, dtype=torch.double)
    )
    assert (
        pooled.thresholds[1] < level < pooled.thresholds[0]
    )  # the narrow task's own is lower, the broad one's higher
    torch.testing.assert_close(
        own.thresholds, pooled.thresholds
    )  # per-task thresholds are fitted all the same
    # along a ray out of the narrow task: the first point past its own threshold still under the pooled level
    ray = 10 + torch.linspace(0, 3, 301)[:, None] * torch.ones(1, 6) / math.sqrt(6)
    errors = pooled.accept_errors(ray)[:, 1]
    between = (
        (errors > pooled.thresholds[1]) & (errors <= level) & (pooled.accept_errors(ray)[:, 0] > level)
    ).nonzero()
    probe = ray[between[0]]
    assert pooled(probe)[0].item() == 1 and not pooled(probe)[1].item()
    assert own(probe)[1].item()  # per task: no task accepts it
    loaded = AutoSelector(6)
    loaded.load_state(pooled.state())
    torch.testing.assert_close(loaded.acceptance_thresholds(), pooled.acceptance_thresholds())
    tests = torch.cat([broad[:50], narrow[:50], ray])
    for a, b in zip(pooled(tests), loaded(tests)):
        assert torch.equal(a, b)


def test_tasks_with_fewer_features_pool_their_held_out_errors_unpadded_and_old_states_stay_per_task():
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randn(60, 4, generator=generator), torch.randn(200, 4, generator=generator) + 3
    selector = AutoSelector(4, threshold="pooled", percentile=90.0)
    for features in (first, second):
        selector.add_task(features)
    assert selector.held_errors.shape == (2, 40) and selector.held_errors[0].isnan().sum() == 28
    held = torch.cat([held_out_errors(selector, first, 0), held_out_errors(selector, second, 1)])
    torch.testing.assert_close(selector.acceptance_thresholds()[0], torch.quantile(held, 0.9))
    old = {k: v for k, v in selector.state().items() if k not in ("pooled_level", "held_errors")}
    loaded = AutoSelector(4)
    loaded.load_state(old)  # saved before pooled thresholds existed: each task's own
    torch.testing.assert_close(loaded.acceptance_thresholds(), selector.thresholds)
    loaded.add_task(torch.randn(50, 4, generator=generator) - 3)
    assert loaded.num_tasks == 3 and loaded.held_errors.shape[0] == 3


def test_a_pooled_threshold_needs_the_gaussian_rule():
    for normalize in ("whiten", "l2"):
        with pytest.raises(ConfigError, match="pooled"):
            AutoSelector(6, normalize=normalize, threshold="pooled")
    with pytest.raises(ConfigError, match="threshold must be one of"):
        AutoSelector(6, threshold="global")


@pytest.mark.parametrize("accept_width", [0, 3])
def test_nearest_neighbour_distances_equal_the_loop_over_tasks_of_unequal_sizes(accept_width: int):
    """Batched k-th neighbour distances (padded banks) equal a per-task loop; held-out distances set the level."""
    generator = torch.Generator().manual_seed(0)
    selector = AutoSelector(6, accept_width=accept_width, neighbours=3, threshold="pooled")
    for rows, centre in ((50, 0.0), (120, 4.0), (30, -4.0)):  # tasks of different sizes: padded banks
        selector.add_task(centre + torch.randn(rows, 6, generator=generator), seed=1)
    assert selector.bank.shape == (3, 96, accept_width or 6) and selector.bank_rows.tolist() == [40, 96, 24]
    probe = torch.randn(20, 6, generator=generator) * 4
    torch.testing.assert_close(selector.accept_errors(probe), selector.errors_loop(probe, accept=True))
    # a task's own fitting row is its own nearest neighbour: distance 0, so its 3rd neighbour is its 2nd other one
    own = selector.bank[1, :5]
    columns = torch.cat([torch.zeros(5, 6 - own.shape[1]), own], 1)
    distances = torch.cdist(own, selector.bank[1, :96]).sort(-1).values[:, 2]
    torch.testing.assert_close(selector.accept_errors(columns)[:, 1], distances)
    held = selector.held_errors[~selector.held_errors.isnan()]
    torch.testing.assert_close(selector.acceptance_thresholds(), torch.quantile(held, 0.95).expand(3))


def test_nearest_neighbours_refuse_the_gap_between_a_task_s_clusters_which_its_gaussian_accepts():
    """A task whose inputs come in two clusters: its Gaussian spans both and accepts an input between them; the
    k-th nearest neighbour sees that nothing of the task lies there and sends it to the base, while both clusters'
    inputs keep their task."""
    generator = torch.Generator().manual_seed(0)
    clusters = torch.cat([torch.randn(200, 4, generator=generator) * 0.3 + s * 3 for s in (-1, 1)])
    between = torch.randn(50, 4, generator=generator) * 0.3
    own = torch.cat([torch.randn(50, 4, generator=generator) * 0.3 + s * 3 for s in (-1, 1)])
    kept = {}
    for k in (0, 5):
        selector = AutoSelector(4, neighbours=k)
        selector.add_task(clusters[torch.randperm(400, generator=generator)])
        kept[k] = selector(between)[1].float().mean()
        tasks, keep = selector(own)
        assert keep.float().mean() <= 0.1 and (tasks == 0).all()
    assert kept[0] <= 0.1 and kept[5] == 1.0


def test_a_nearest_neighbour_selector_decides_the_same_after_save_and_load():
    generator = torch.Generator().manual_seed(0)
    selector = AutoSelector(5, neighbours=2, accept_width=2, threshold="pooled")
    for centre in (0.0, 3.0):
        selector.add_task(centre + torch.randn(60, 5, generator=generator))
    probe = torch.randn(40, 5, generator=generator) * 3
    loaded = AutoSelector(5)
    loaded.load_state(selector.state())
    assert loaded.k == 2
    for got, want in zip(loaded(probe), selector(probe)):
        assert torch.equal(got, want)
    # a selector saved before nearest neighbours existed keeps deciding by its Gaussians, whatever it is loaded into
    gaussian = AutoSelector(5, accept_width=2, threshold="pooled")
    for centre in (0.0, 3.0):
        gaussian.add_task(centre + torch.randn(60, 5, generator=generator))
    old = {k: v for k, v in gaussian.state().items() if k not in ("neighbours", "bank", "bank_rows")}
    loaded = AutoSelector(5, neighbours=2, accept_width=2, threshold="pooled")
    loaded.load_state(old)
    assert loaded.k == 0
    for got, want in zip(loaded(probe), gaussian(probe)):
        assert torch.equal(got, want)


def test_nearest_neighbours_need_the_gaussian_rule_and_enough_fitting_rows():
    with pytest.raises(ConfigError, match="neighbours 3: .*gaussian rule"):
        AutoSelector(4, normalize="whiten", neighbours=3)
    with pytest.raises(ConfigError, match="neighbours 20: this task has 16 fitting features"):
        AutoSelector(4, neighbours=20).add_task(torch.randn(20, 4))


@pytest.mark.parametrize("accept_width", [0, 3])
def test_the_shared_choice_is_the_distance_under_the_mean_covariance_and_equals_the_loop(accept_width: int):
    """Batched distances under the shared covariance equal a per-task loop through its precision matrix; where
    every task's covariance is the same (the same inputs, shifted), the shared choice is each task's own."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(8, 8, generator=generator)
    inputs = torch.randn(300, 8, generator=generator) @ mixing
    shared = AutoSelector(8, choice="shared", accept_width=accept_width, threshold="pooled")
    own = AutoSelector(8, accept_width=accept_width, threshold="pooled")
    for selector in (shared, own):
        for shift in (0.0, 2.0, -3.0):
            selector.add_task(inputs + shift)
    probe = torch.randn(50, 8, generator=generator) @ mixing + 1.0
    torch.testing.assert_close(
        shared.shared_scores(probe), shared.shared_scores_loop(probe), rtol=1e-4, atol=1e-3
    )
    for got, want in zip(shared(probe), own(probe)):
        assert torch.equal(got, want)
    # tasks of different covariances: the shared one is their mean
    shared.add_task(torch.randn(200, 8, generator=generator) * 5)
    torch.testing.assert_close(
        shared.shared_scores(probe), shared.shared_scores_loop(probe), rtol=1e-4, atol=1e-3
    )


def test_the_shared_choice_fits_wide_features_with_two_threads():
    """Fitting the shared covariance of three tasks 200 features wide with two CPU threads: the batched LU inverse
    it once used failed there (MKL's DLASWP error, then bad pivots or no end); the fit must finish and equal the
    per-task loop."""
    generator = torch.Generator().manual_seed(0)
    selector = AutoSelector(200, choice="shared", threshold="pooled")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shift in (0.0, 1.0, -1.0):
            selector.add_task(torch.randn(400, 200, generator=generator) + shift)
    finally:
        torch.set_num_threads(threads)
    probe = torch.randn(20, 200, generator=generator)
    torch.testing.assert_close(
        selector.shared_scores(probe), selector.shared_scores_loop(probe), rtol=1e-4, atol=1e-2
    )


def test_the_shared_choice_names_alike_tasks_better_from_few_inputs_and_survives_save_and_load():
    """Two tasks of one covariance in 40 dimensions, their means close, 60 inputs each: each task's own Gaussian,
    estimated from so few, misnames more of their test inputs than the shared one estimated from all of them. A
    loaded selector chooses as fitted; one saved before the shared choice existed chooses by its own Gaussians."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(40, 40, generator=generator) / 40**0.5
    means = torch.zeros(2, 40)
    means[1, :4] = 0.6

    def draw(n: int, t: int) -> torch.Tensor:
        return torch.randn(n, 40, generator=generator) @ mixing + means[t]

    right = {}
    for choice in ("own", "shared"):
        selector = AutoSelector(40, choice=choice, percentile=100.0)
        for t in (0, 1):
            selector.add_task(draw(60, t), seed=0)
        test = torch.cat([draw(500, 0), draw(500, 1)])
        tasks, _ = selector(test)
        right[choice] = float((tasks == torch.arange(2).repeat_interleave(500)).float().mean())
        loaded = AutoSelector(40)
        loaded.load_state(selector.state())
        assert loaded.choice == choice and torch.equal(loaded(test)[0], tasks)
    assert right["shared"] >= right["own"] + 0.05, right
    old = {k: v for k, v in selector.state().items() if k != "choice_rule"}
    loaded = AutoSelector(40)
    loaded.load_state(old)
    assert loaded.choice == "own"
    with pytest.raises(ConfigError, match="choice .*'shared' with the gaussian rule only"):
        AutoSelector(4, normalize="whiten", choice="shared")


@pytest.mark.parametrize("choice", ["own", "shared"])
def test_the_posterior_names_the_task_the_selector_chooses(choice: str):
    """Each row a distribution over the learned tasks whose argmax is the routed task of every accepted input; the
    gaussian rule only."""
    generator = torch.Generator().manual_seed(0)
    selector = AutoSelector(6, accept_width=3, neighbours=3, threshold="pooled", choice=choice)
    for task in range(3):
        selector.add_task(torch.randn(80, 6, generator=generator) + 2 * task)
    features = torch.randn(60, 6, generator=generator) * 2 + 2
    task_ids, keep = selector(features)
    weights = selector.posterior(features)
    assert weights.shape == (60, 3) and torch.allclose(weights.sum(-1), torch.ones(60))
    assert (~keep).any() and torch.equal(weights.argmax(-1)[~keep], task_ids[~keep])
    assert ((weights > 0.05) & (weights < 0.95)).any()  # alike inputs spread their weight
    with pytest.raises(ConfigError, match="gaussian rule"):
        AutoSelector(6, hidden=4, normalize="whiten").posterior(features)


def test_the_posterior_is_the_gaussians_at_equal_priors_under_its_temperature(
    monkeypatch: pytest.MonkeyPatch,
):
    """Scores are doubled negative log-likelihoods: at temperature 1 a task 2 log 3 less likely than another gets a
    third of its weight, at temperature 2 a square root of a third; a far one none; the weights do not move when
    every score shifts alike."""
    generator = torch.Generator().manual_seed(0)
    selector = AutoSelector(2)
    for task in range(3):
        selector.add_task(torch.randn(40, 2, generator=generator) + task)
    scores = torch.tensor([[0.0, 2 * math.log(3.0), 1e4]])
    monkeypatch.setattr(selector, "scores", lambda errors: scores)
    selector.temperature = torch.tensor(1.0)
    weights = selector.posterior(torch.zeros(1, 2))
    assert weights[0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    monkeypatch.setattr(selector, "scores", lambda errors: scores + 50)
    assert selector.posterior(torch.zeros(1, 2))[0].tolist() == pytest.approx(weights[0].tolist())
    selector.temperature = torch.tensor(2.0)
    third = 1 / math.sqrt(3.0)
    assert selector.posterior(torch.zeros(1, 2))[0].tolist() == pytest.approx(
        [1 / (1 + third), third / (1 + third), 0.0]
    )


def test_the_temperature_is_calibrated_on_held_out_features_and_saved_with_them():
    """Two alike tasks in 40 dimensions from 60 inputs each: their Gaussians are far surer than they are right, so
    the temperature that fits their held-out fifth lies above 1 and gives those rows a better mean log-probability
    of their own task than temperature 1. The held-out rows are kept (12 a task); a loaded selector has the same
    temperature, and one saved without them keeps temperature 1, also when it learns another task."""
    generator = torch.Generator().manual_seed(0)
    selector = AutoSelector(40)
    for task in range(2):
        selector.add_task(torch.randn(60, 40, generator=generator) + 0.3 * task)
    held = ~selector.held_errors.isnan()
    assert held.sum(-1).tolist() == [12, 12] and selector.held_features.shape == (2, 12, 40)
    tau = float(selector.temperature)
    assert tau > 1.5

    def held_out_log_probability(temperature: float) -> float:
        scores = selector.choice_scores(selector.held_features[held])
        labels = torch.tensor([0] * 12 + [1] * 12)
        log_p = torch.log_softmax(-scores.double() / (2 * temperature), -1)
        return float(log_p.gather(1, labels[:, None]).mean())

    assert held_out_log_probability(tau) > held_out_log_probability(1.0)
    loaded = AutoSelector(40)
    loaded.load_state(selector.state())
    assert float(loaded.temperature) == pytest.approx(tau)
    old = AutoSelector(40)
    old.load_state({k: v for k, v in selector.state().items() if k != "held_features"})
    assert float(old.temperature) == 1.0
    old.add_task(
        torch.randn(60, 40, generator=generator) - 0.3
    )  # its earlier tasks have no held-out rows to pool
    assert float(old.temperature) == 1.0 and old.held_features.shape[0] == 0
