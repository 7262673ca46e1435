"""The auto-selector's fitted models: a task's shrunk Gaussian and its whitening."""

from __future__ import annotations

import pytest
import torch

from loramix.routers.density import (
    fit_temperature,
    inverse_sqrt,
    kth_nearest,
    kth_nearest_loop,
    shared_whitening,
    shrunk_gaussian,
)


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 1.0])
def test_shrunk_gaussian_whitens_its_covariance(shrinkage: float):
    features = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)) @ torch.diag(
        torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    )
    center, whitening, log_det = shrunk_gaussian(features, shrinkage)
    x = features.double() - features.double().mean(0)
    sample = x.t() @ x / x.shape[0]
    covariance = (1 - shrinkage) * sample + shrinkage * sample.diagonal().mean() * torch.eye(6).double()
    assert torch.allclose(center.double(), features.double().mean(0), atol=1e-6)
    identity = whitening.double() @ covariance @ whitening.double()
    assert torch.allclose(identity, torch.eye(6).double(), atol=1e-4)
    assert log_det.item() == pytest.approx(torch.linalg.slogdet(covariance)[1].item(), rel=1e-5)


def test_inverse_sqrt_clamps_a_singular_covariance():
    """A zero eigenvalue is raised to the floor, so the whitening stays finite; the others are inverted exactly."""
    whitening, values = inverse_sqrt(torch.diag(torch.tensor([0.0, 1.0, 4.0])).double())
    assert values.tolist() == pytest.approx([4e-12, 1.0, 4.0])
    assert torch.isfinite(whitening).all()
    assert whitening.diagonal()[1:].tolist() == pytest.approx([1.0, 0.5])


def test_fit_temperature_finds_the_temperature_the_labels_were_drawn_at_and_the_grid_minimum():
    """Labels drawn from `softmax(-scores / (2 * 3))`: the fitted temperature is near 3, and it is the minimum of
    the mean negative log-probability found on a fine grid (the slow reference)."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(20000, 4, generator=generator) * 20
    labels = torch.multinomial(torch.softmax(-scores / 6, -1), 1, generator=generator)[:, 0]
    tau = fit_temperature(scores, labels)
    assert tau == pytest.approx(3.0, rel=0.1)
    grid = torch.exp(torch.linspace(-2, 4, 3001, dtype=torch.float64))
    losses = [
        float(-torch.log_softmax(-scores.double() / (2 * t), -1).gather(1, labels[:, None]).mean())
        for t in grid
    ]
    assert tau == pytest.approx(float(grid[int(torch.tensor(losses).argmin())]), rel=0.01)


@pytest.mark.parametrize("k", [1, 3])
def test_kth_nearest_skips_the_padding_and_equals_the_loop(k: int):
    """Three tasks with 7, 4 and 5 fitting rows padded to 7 with zeros: the padding is never a neighbour (an input
    at the origin would otherwise find it at distance 0), and the batched distances equal one task and one input
    at a time."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor([7, 4, 5])
    bank = torch.randn(3, 7, 5, generator=generator) + 3
    bank[torch.arange(7) >= rows[:, None]] = 0.0
    x = torch.cat([torch.zeros(1, 5), torch.randn(6, 5, generator=generator) + 3])
    distances = kth_nearest(x, bank, rows, k)
    assert distances.shape == (7, 3) and (distances[0] > 1).all()
    torch.testing.assert_close(distances, kth_nearest_loop(x, bank, rows, k))


def test_shared_whitening_whitens_the_mean_covariance():
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(3, 4, 4, generator=generator, dtype=torch.float64)
    covariances = factors @ factors.transpose(1, 2) + torch.eye(4, dtype=torch.float64)
    whitening = torch.stack([inverse_sqrt(c)[0] for c in covariances])
    shared = shared_whitening(whitening)
    identity = shared @ covariances.mean(0) @ shared
    torch.testing.assert_close(identity, torch.eye(4, dtype=torch.float64))
