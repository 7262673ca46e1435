"""The Distribution Discriminative Auto-Selector (DDAS; Yu et al., CVPR 2024, Sec. 3.3): per sample, which learned
task an input belongs to, or none (then it goes to the untouched base model).

One small autoencoder per learned task is fitted on features of that task's training inputs. At inference every
autoencoder reconstructs the sample's feature, and a task *accepts* the sample when its error is at most its
threshold: a percentile (`percentile`, 95 by default) of its errors on held-out training features of that task (a
fifth of them, never fitted on). About 5% of a learned task's inputs are refused by their own autoencoder by
construction, the price of sending unfamiliar inputs to the base. A sample no task accepts goes to the base model.

Two rules, chosen by `normalize` (saved with the tensors, so a loaded selector decides as it did when fitted):

- `whiten` (the default): inside each autoencoder, the feature is first whitened with the mean and the shrunk
  covariance of that task's own training features, `z_t = (f - mu_t) W_t`, `W_t = ((1 - a) C_t + a c_t I)^(-1/2)`
  (`a` = `shrinkage`, `c_t` the mean variance), and the autoencoder fits `z_t`. A direction in which task t
  hardly varies weighs as much as one in which it varies a lot, so an input of another task that sits inside t's
  principal subspace but far along it is still unfamiliar; on mean-pooled text features, where every task shares
  most of its variance with the others, this is what makes the errors tell tasks apart. Among the tasks that
  accept a sample, it goes to the one whose error is lowest relative to that task's own held-out errors, as a
  z-score of the log error: `task = argmin_t (log err_t - m_t) / s_t`.
- `l2`: the paper's rule on L2-normalised features, `task = argmin_t err_t / thr_t`, base if that ratio is above 1.

The released code hard-codes one threshold for all tasks (0.0655) and decides per batch; this decides per sample,
inside the same batched pass. The autoencoders are stacked tensors and run as one batched op for all tasks.

Legend: n samples, d feature width, h autoencoder width, T learned tasks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import ConfigError

NORMALIZE = ("l2", "whiten")


class AutoSelector(nn.Module):
    """Per-task autoencoders `d -> h -> d` (tanh) with calibrated thresholds.

    Example:
        >>> selector = AutoSelector(386)
        >>> selector.add_task(train_features_of_task_0)
        >>> task_ids, keep_base = selector(features)  # (n,), (n,) bool
    """

    loramix_role = "router"

    def __init__(
        self,
        in_features: int,
        *,
        hidden: int = 64,
        percentile: float = 95.0,
        normalize: str = "whiten",
        shrinkage: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0 < percentile <= 100:
            raise ConfigError(f"percentile must lie in (0, 100], got {percentile}")
        if normalize not in NORMALIZE:
            raise ConfigError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if not 0 < shrinkage <= 1:
            raise ConfigError(f"shrinkage must lie in (0, 1], got {shrinkage}")
        self.in_features, self.hidden, self.percentile = in_features, hidden, percentile
        self.shrinkage = shrinkage
        self.register_buffer("rule", torch.tensor(NORMALIZE.index(normalize)))  # saved: how it decides
        self.register_buffer("enc_w", torch.zeros(0, hidden, in_features))  # (T, h, d)
        self.register_buffer("enc_b", torch.zeros(0, hidden))
        self.register_buffer("dec_w", torch.zeros(0, in_features, hidden))  # (T, d, h)
        self.register_buffer("dec_b", torch.zeros(0, in_features))
        self.register_buffer("thresholds", torch.zeros(0))  # (T,)
        self.register_buffer("center", torch.zeros(0, in_features))  # (T, d); `whiten` only
        self.register_buffer(
            "whitening", torch.zeros(0, in_features, in_features)
        )  # (T, d, d); `whiten` only
        self.register_buffer("log_error_stats", torch.zeros(0, 2))  # (T, 2): mean, std of log held-out errors

    @property
    def normalize(self) -> str:
        return NORMALIZE[int(self.rule)]

    @property
    def num_tasks(self) -> int:
        return int(self.thresholds.shape[0])

    def inputs(self, features: Tensor) -> Tensor:
        """What every autoencoder sees: `(n, d) -> (n, T, d)` (`whiten`) or `(n, 1, d)` (`l2`, shared)."""
        x = features.float()
        if self.normalize == "l2":
            return F.normalize(x, dim=-1)[:, None]
        return torch.einsum("ntd,tde->nte", x[:, None] - self.center, self.whitening)

    def errors(self, features: Tensor) -> Tensor:
        """Every autoencoder's mean squared reconstruction error of each feature: `(n, d) -> (n, T)`."""
        z = self.inputs(features)  # (n, T or 1, d)
        h = torch.tanh(torch.einsum("ntd,thd->nth", z, self.enc_w) + self.enc_b)  # (n, T, h)
        recon = torch.einsum("nth,tdh->ntd", h, self.dec_w) + self.dec_b  # (n, T, d)
        return (recon - z).pow(2).mean(-1)  # (n, T)

    def errors_loop(self, features: Tensor) -> Tensor:
        """The same errors, one autoencoder at a time (the reference the tests hold `errors` to)."""
        x = features.float()
        columns = []
        for t in range(self.num_tasks):
            z = F.normalize(x, dim=-1) if self.normalize == "l2" else (x - self.center[t]) @ self.whitening[t]
            h = torch.tanh(z @ self.enc_w[t].t() + self.enc_b[t])
            columns.append((h @ self.dec_w[t].t() + self.dec_b[t] - z).pow(2).mean(-1))
        return torch.stack(columns, 1)

    def scores(self, errors: Tensor) -> Tensor:
        """How unfamiliar each sample is to each task, comparable across tasks (lower: more familiar):
        `err / thr` (`l2`) or the z-score of the log error among the task's held-out errors (`whiten`)."""
        if self.normalize == "l2" or self.log_error_stats.shape[0] != errors.shape[1]:
            return errors / self.thresholds
        mean, std = self.log_error_stats.unbind(-1)
        return (errors.clamp_min(1e-30).log() - mean) / std  # (n, T)

    @torch.no_grad()
    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """`(task_ids (n,), keep_base (n,) bool)` for features `(n, d)`; with no task learned, all go to the base.
        Among the tasks that accept a sample, the most familiar one; no task accepts it: the base model."""
        n = features.shape[0]
        if self.num_tasks == 0:
            zeros = torch.zeros(n, dtype=torch.long, device=features.device)
            return zeros, torch.ones(n, dtype=torch.bool, device=features.device)
        errors = self.errors(features)  # (n, T)
        accepted = errors <= self.thresholds  # (n, T)
        scores = self.scores(errors)
        task_ids = torch.where(accepted, scores, torch.full_like(scores, math.inf)).argmin(-1)
        task_ids = torch.where(accepted.any(-1), task_ids, scores.argmin(-1))  # (n,)
        return task_ids, ~accepted.any(-1)

    @torch.enable_grad()
    def add_task(
        self,
        features: Tensor,
        *,
        epochs: int = 200,
        lr: float = 1e-2,
        seed: int = 0,
        holdout: float = 0.2,
        noise: float = 0.0,
    ) -> int:
        """Fit a new autoencoder on one task's training features `(n, d)` and calibrate its threshold on the
        held-out part; returns the new task's index. Full-batch Adam on the mean squared error; `noise`: the
        standard deviation of Gaussian noise added to its inputs while fitting (a denoising autoencoder)."""
        features = features.detach().float().cpu()
        if features.shape[0] < 10 or features.shape[1] != self.in_features:
            raise ConfigError(
                f"a DDAS autoencoder needs at least 10 features of width {self.in_features}; got "
                f"{tuple(features.shape)}"
            )
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(features.shape[0], generator=generator)
        cut = max(1, int(round(holdout * features.shape[0])))
        held, fit = features[order[:cut]], features[order[cut:]]
        center, whitening = self._whitening(fit)
        if self.normalize == "l2":
            held, fit = F.normalize(held, dim=-1), F.normalize(fit, dim=-1)
        else:
            held, fit = (held - center) @ whitening, (fit - center) @ whitening
        encoder, decoder = nn.Linear(self.in_features, self.hidden), nn.Linear(self.hidden, self.in_features)
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
        with torch.no_grad():
            held_errors = (decoder(torch.tanh(encoder(held))) - held).pow(2).mean(-1).clamp_min(1e-30)
            threshold = torch.quantile(held_errors, self.percentile / 100.0)
            logs = held_errors.log()
            stats = torch.stack(
                [logs.mean(), logs.std().clamp_min(1e-6) if len(logs) > 1 else logs.new_ones(())]
            )
        device = self.thresholds.device
        new = {
            "enc_w": encoder.weight.detach(),
            "enc_b": encoder.bias.detach(),
            "dec_w": decoder.weight.detach(),
            "dec_b": decoder.bias.detach(),
            "thresholds": threshold,
            "center": center,
            "whitening": whitening,
            "log_error_stats": stats,
        }
        for name, value in new.items():
            if name in ("center", "whitening") and self.normalize == "l2":
                continue
            setattr(self, name, torch.cat([getattr(self, name), value[None].to(device)]))
        return self.num_tasks - 1

    def _whitening(self, fit: Tensor) -> tuple[Tensor, Tensor]:
        """`(mu (d,), W (d, d))`: the task's mean and inverse square root of its covariance, shrunk towards its mean
        variance (`shrinkage`) so that it stays well conditioned with fewer samples than dimensions."""
        if self.normalize == "l2":
            return fit.new_zeros(()), fit.new_zeros(())
        fit = fit.double()
        center = fit.mean(0)
        covariance = (fit - center).t() @ (fit - center) / fit.shape[0]  # (d, d)
        floor = covariance.diagonal().mean().clamp_min(1e-12)
        covariance = (1 - self.shrinkage) * covariance + self.shrinkage * floor * torch.eye(
            fit.shape[1]
        ).double()
        values, vectors = torch.linalg.eigh(covariance)
        whitening = vectors @ torch.diag(values.clamp_min(floor * 1e-6).rsqrt()) @ vectors.t()
        return center.float(), whitening.float()

    def state(self) -> dict[str, Tensor]:
        """Its tensors, for saving beside the adapters (`load_state` restores them)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Restore `state()`; a selector saved before the `whiten` rule existed (no `rule` tensor) decides by `l2`."""
        state = dict(state)
        if "rule" not in state:
            state["rule"] = torch.tensor(NORMALIZE.index("l2"))
            state["log_error_stats"] = torch.zeros(0, 2)
        for key, value in state.items():
            setattr(self, key, value.to(self.thresholds.device))
