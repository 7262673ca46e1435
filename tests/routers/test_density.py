"""The auto-selector's fitted models: a task's shrunk Gaussian and its whitening."""

from __future__ import annotations

import pytest
import torch

from loramix.routers.density import fit_temperature, inverse_sqrt, shrunk_gaussian


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
