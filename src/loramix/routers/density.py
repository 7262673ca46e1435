"""The fitted models behind the auto-selector (:mod:`loramix.routers.selector`): a task's Gaussian, its covariance
shrunk towards the mean variance so that it stays well conditioned with fewer samples than dimensions, one
covariance shared by all tasks, the distance to a task's k-th nearest fitting feature, and the paper's autoencoder.
Legend: n samples, d feature width, h autoencoder width, T tasks, m fitting rows per task."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def inverse_sqrt(covariance: Tensor, floor: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """`(C^(-1/2), eigenvalues)` of a symmetric `(d, d)` covariance (`eigh` reads its lower triangle), its
    eigenvalues clamped below at `floor` (by default 1e-12 of the largest)."""
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp_min(values.max() * 1e-12 if floor is None else floor)
    return vectors @ torch.diag(values.rsqrt()) @ vectors.t(), values


def shrunk_gaussian(fit: Tensor, shrinkage: float) -> tuple[Tensor, Tensor, Tensor]:
    """`(mu (d,), W (d, d), log det C)` of features `(n, d)`: their mean, the inverse square root of their
    covariance `C = (1 - a) S + a c I` (`a` = `shrinkage`, `c` their mean variance), and its log-determinant."""
    fit = fit.double()
    center = fit.mean(0)
    covariance = (fit - center).t() @ (fit - center) / fit.shape[0]  # (d, d)
    floor = covariance.diagonal().mean().clamp_min(1e-12)
    covariance = (1 - shrinkage) * covariance + shrinkage * floor * torch.eye(fit.shape[1]).double()
    whitening, values = inverse_sqrt(covariance, floor * 1e-6)
    return center.float(), whitening.float(), values.log().sum().float()


def shared_whitening(whitening: Tensor) -> Tensor:
    """`W (d, d)`, the inverse square root of the mean of the tasks' covariances, from their own inverse square
    roots `W_t (T, d, d)`: `C = mean_t (W_t^T W_t)^(-1)`, `W = C^(-1/2)`, in float64."""
    whitening = whitening.double()
    # C_t from W_t^T W_t by Cholesky: the batched LU inverse fails with two or more MKL threads in torch 2.13's CPU
    # build (DLASWP errors, then bad pivots or no end)
    precisions = whitening.transpose(1, 2) @ whitening
    covariance = torch.cholesky_inverse(torch.linalg.cholesky(precisions)).mean(0)
    return inverse_sqrt((covariance + covariance.t()) / 2)[0]


def kth_nearest(x: Tensor, bank: Tensor, rows: Tensor, k: int) -> Tensor:
    """`(n, T)`: the distance from each of `x (n, a)` to its k-th nearest among each task's fitting rows, `bank
    (T, m, a)` zero-padded past each task's `rows (T,)` real ones."""
    distances = torch.cdist(x[None].expand(bank.shape[0], -1, -1), bank)  # (T, n, m)
    padding = torch.arange(bank.shape[1], device=x.device) >= rows[:, None]  # (T, m)
    distances = distances.masked_fill(padding[:, None], math.inf)
    return distances.topk(k, dim=-1, largest=False).values[..., -1].t()


def kth_nearest_loop(x: Tensor, bank: Tensor, rows: Tensor, k: int) -> Tensor:
    """The same distances, one task and one input at a time, by sorting (the tests' reference)."""
    columns = []
    for t in range(bank.shape[0]):
        fitting = bank[t, : rows[t]]  # (m_t, a)
        columns.append(torch.stack([(one - fitting).pow(2).sum(-1).sqrt().sort().values[k - 1] for one in x]))
    return torch.stack(columns, 1)


def fit_autoencoder(
    fit: Tensor, hidden: int, *, epochs: int, lr: float, noise: float, generator: torch.Generator
) -> tuple[nn.Linear, nn.Linear]:
    """An autoencoder `d -> h -> d` (tanh) fitted to `fit (n, d)` by full-batch Adam on the mean squared error;
    `noise`: the standard deviation of Gaussian noise added to its inputs (a denoising autoencoder)."""
    width = fit.shape[1]
    encoder, decoder = nn.Linear(width, hidden), nn.Linear(hidden, width)
    with torch.no_grad():
        for layer in (encoder, decoder):
            bound = 1 / layer.in_features**0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    for _ in range(epochs):
        inputs = fit + noise * torch.randn(fit.shape, generator=generator) if noise else fit
        loss = (decoder(torch.tanh(encoder(inputs))) - fit).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder, decoder


def fit_temperature(scores: Tensor, labels: Tensor, low: float = 1e-2, high: float = 1e3) -> float:
    """The temperature `tau` in `[low, high]` that makes `softmax(-scores / (2 tau))` the best-calibrated posterior
    of `labels` `(n,)` on held-out `scores` `(n, T)` (doubled negative log-likelihoods): the minimum of the mean
    negative log-probability of the true class, which is convex in `1 / tau`, found by golden-section search on
    `log tau`."""
    scores, labels = scores.double(), labels.long()

    def loss(log_tau: float) -> float:
        logits = -scores / (2 * math.exp(log_tau))
        return float(-torch.log_softmax(logits, -1).gather(1, labels[:, None]).mean())

    a, b = math.log(low), math.log(high)
    ratio = (5**0.5 - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(60):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)
