"""The Distribution Discriminative Auto-Selector (DDAS; Yu et al., CVPR 2024, Sec. 3.3): per sample, which learned
task an input belongs to, or none (then it goes to the untouched base model).

After each task, a model of that task's input distribution is fitted on features of its training inputs, and each
input gets an *error* from every learned task (how unfamiliar it is to that task). A task *accepts* the input when
its error is at most its threshold: a percentile (`percentile`, 95 by default) of its errors on held-out training
features of that task (a fifth of them, never fitted on). About 5% of a learned task's inputs are refused by their
own task by construction, the price of sending unfamiliar inputs to the base. Among the accepting tasks the input
goes to the most familiar one; an input no task accepts goes to the base model.

With `threshold="pooled"` (`gaussian` only) every task accepts up to one common level instead: that percentile of
the held-out errors of all learned tasks together, recomputed as tasks are added. The Gaussians' errors are negative
log-likelihoods, so this keeps the inputs where the learned tasks' densities are high, a level set of their mixture
rather than a region per task: a task with a broad distribution (short chat messages, which resemble many other
tasks' inputs) accepts less of the space around it than a percentile of its own would give it, and a narrow task
more.

Three rules, chosen by `normalize` (saved with the tensors, so a loaded selector decides as it did when fitted):

- `gaussian` (the default): each task is the Gaussian of its features' mean and covariance, shrunk towards its
  mean variance, `C_t = (1 - a) S_t + a c_t I` (`a` = `shrinkage`); the error is the negative log-likelihood,
  doubled and up to a constant: `||z_t||^2 + log det C_t` with `z_t = (f - mu_t) C_t^(-1/2)`. The most likely
  accepting task wins. No autoencoder is fitted.
- `whiten`: the paper's autoencoders, one per task, each fitting the features whitened as `z_t` above; the error is
  the reconstruction error, and the input goes to the accepting task whose error is lowest relative to its own
  held-out errors, as a z-score of the log error: `task = argmin_t (log err_t - m_t) / s_t`.
- `l2`: the paper's rule: autoencoders on L2-normalised features, `task = argmin_t err_t / thr_t`, base if that
  ratio is above 1.

Options, each described in full in `docs/auto-selector.md` with what it costs at inference:
- two stages (`accept_width`, `gaussian` only): the last `accept_width` feature columns (a deeper block's state)
  get a Gaussian of their own per task and alone decide whether some task accepts; the task is then the likeliest
  under the Gaussians of all columns, among all learned tasks;
- nearest neighbours (`neighbours` k): a task accepts by the distance to the k-th nearest of its own fitting
  features (kept for the purpose) instead of by its Gaussian; the threshold is the same percentile rule;
- routed acceptance (`accept_state="route"`, two stages): the task is chosen on the leading columns, and only the
  chosen task accepts, on trailing columns read along its own route (fitted on its inputs through its own experts;
  :mod:`loramix.methods.continual.routed`);
- one covariance for the choice (`choice="shared"`): the nearest task mean under the mean of the tasks' shrunk
  covariances (linear discriminant analysis where the default is quadratic), recomputed when a task is added or
  the selector is loaded;
- the posterior over the tasks (`posterior`): a softmax of the choosing scores at a temperature fitted on every
  learned task's held-out features.

Whitening by each task's own statistics is what makes these features tell tasks apart: mean-pooled text features
of every task share most of their variance, and an input of another task that sits inside t's principal subspace
but far along it is still unfamiliar to t. On the ten text tasks of the selector benchmark the Gaussian names a
seen task's inputs more often than either autoencoder rule (`benchmarks/results/ddas-selector.md`).

The released code hard-codes one threshold for all tasks (0.0655) and decides per batch; this decides per sample,
inside the same batched pass. The tasks' models are stacked tensors and run as one batched op for all tasks.

Legend: n samples, d feature width, h autoencoder width, T learned tasks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import ConfigError
from loramix.routers.density import (
    fit_autoencoder,
    fit_temperature,
    kth_nearest,
    kth_nearest_loop,
    shared_whitening,
    shrunk_gaussian,
)
from loramix.routers.selector_formats import ACCEPT_STATES, CHOICES, NORMALIZE, check_options, upgrade


class AutoSelector(nn.Module):
    """Per-task Gaussians, or autoencoders `d -> h -> d` (tanh), with calibrated thresholds.

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
        normalize: str = "gaussian",
        shrinkage: float = 0.1,
        accept_width: int = 0,
        threshold: str = "task",
        neighbours: int = 0,
        choice: str = "own",
        accept_state: str = "base",
    ) -> None:
        super().__init__()
        check_options(
            in_features,
            percentile=percentile,
            normalize=normalize,
            shrinkage=shrinkage,
            accept_width=accept_width,
            threshold=threshold,
            neighbours=neighbours,
            choice=choice,
            accept_state=accept_state,
        )
        self.in_features, self.hidden, self.percentile = in_features, hidden, percentile
        self.shrinkage = shrinkage
        self.register_buffer("rule", torch.tensor(NORMALIZE.index(normalize)))  # saved: how it decides
        self.register_buffer("enc_w", torch.zeros(0, hidden, in_features))  # (T, h, d)
        self.register_buffer("enc_b", torch.zeros(0, hidden))
        self.register_buffer("dec_w", torch.zeros(0, in_features, hidden))  # (T, d, h)
        self.register_buffer("dec_b", torch.zeros(0, in_features))
        self.register_buffer("thresholds", torch.zeros(0))  # (T,)
        # two stages: the width a of the acceptance columns (0: one stage); routed acceptance (saved): the choice
        # reads the leading c = d - a columns only, acceptance the chosen task's model of the trailing a, read along
        # its route
        self.register_buffer("accept_columns", torch.tensor(accept_width))
        self.register_buffer("accept_routed", torch.tensor(accept_state == "route"))
        # `whiten` and `gaussian`: each task's mean (T, c) and inverse square root of its covariance (T, c, c)
        width = self.choice_width
        self.register_buffer("center", torch.zeros(0, width))
        self.register_buffer("whitening", torch.zeros(0, width, width))
        self.register_buffer("log_error_stats", torch.zeros(0, 2))  # (T, 2): mean, std of log held-out errors
        self.register_buffer("log_det", torch.zeros(0))  # (T,): log det of each covariance; `gaussian` only
        # two stages: each task's Gaussian of the acceptance columns
        self.register_buffer("accept_center", torch.zeros(0, accept_width))  # (T, a)
        self.register_buffer("accept_whitening", torch.zeros(0, accept_width, accept_width))  # (T, a, a)
        self.register_buffer("accept_log_det", torch.zeros(0))  # (T,)
        # nearest neighbours: k (0: a Gaussian accepts), each task's fitting rows of the acceptance columns, zero-
        # padded to the longest (T, m, a), and how many of them are real (T,)
        self.register_buffer("neighbours", torch.tensor(neighbours))
        self.register_buffer("bank", torch.zeros(0, 0, accept_width or in_features))
        self.register_buffer("bank_rows", torch.zeros(0, dtype=torch.long))
        # `pooled`: the quantile level of the common threshold (saved, so a loaded selector decides as fitted; 0:
        # each task's own threshold), and every task's held-out errors, NaN-padded to the longest (T, m)
        self.register_buffer(
            "pooled_level", torch.tensor(percentile / 100.0 if threshold == "pooled" else 0.0)
        )
        self.register_buffer("held_errors", torch.zeros(0, 0))
        # `gaussian`: every task's held-out features, zero-padded like `held_errors` (T, m, d), and the temperature
        # they calibrate the posterior to (1 for a selector saved without them)
        self.register_buffer("held_features", torch.zeros(0, 0, in_features))
        self.register_buffer("temperature", torch.tensor(1.0), persistent=False)
        # `shared`: how the task is chosen (saved, by index into CHOICES), and the inverse square root of the mean of
        # the learned tasks' covariances (d, d), derived from their saved whitening when tasks are added or loaded
        self.register_buffer("choice_rule", torch.tensor(CHOICES.index(choice)))
        self.register_buffer("shared_whitening", torch.zeros(0, in_features), persistent=False)
        self.register_buffer(
            "pooled", torch.zeros(0), persistent=False
        )  # (T,): the common level, when pooled

    @property
    def normalize(self) -> str:
        return NORMALIZE[int(self.rule)]

    @property
    def choice(self) -> str:
        return CHOICES[int(self.choice_rule)]

    @property
    def accept_width(self) -> int:
        """How many trailing feature columns decide acceptance on their own (0: all of them, one stage)."""
        return int(self.accept_columns)

    @property
    def accept_state(self) -> str:
        """`route`: acceptance reads the chosen task's route (see the module's docstring); `base`: the features as
        given."""
        return ACCEPT_STATES[int(self.accept_routed)]

    @property
    def choice_width(self) -> int:
        """How many leading feature columns choose the task (all of them, but with routed acceptance)."""
        return self.in_features - (self.accept_width if self.accept_state == "route" else 0)

    @property
    def k(self) -> int:
        """The neighbour whose distance decides acceptance (0: a Gaussian decides)."""
        return int(self.neighbours)

    @property
    def num_tasks(self) -> int:
        return int(self.thresholds.shape[0])

    def acceptance_thresholds(self) -> Tensor:
        """`(T,)`: the error up to which each task accepts an input: its own (`task`), or the common level of all
        learned tasks' held-out errors (`pooled`, computed when tasks are added or loaded)."""
        return self.pooled if self.pooled.shape[0] else self.thresholds

    def _pool(self) -> None:
        """Set the common level from every task's held-out errors (pooled rule only)."""
        level = float(self.pooled_level)
        if not level or not self.num_tasks:
            self.pooled = self.thresholds.new_zeros(0)
            return
        if self.held_errors.shape[0] != self.num_tasks:
            raise ConfigError(
                "this auto-selector pools its tasks' held-out errors but holds them for "
                f"{self.held_errors.shape[0]} of its {self.num_tasks} tasks"
            )
        self.pooled = torch.nanquantile(self.held_errors.flatten(), level).expand(self.num_tasks).clone()

    def _share(self) -> None:
        """Set the shared covariance's whitening from every learned task's own (`shared` choice only): with
        `W_t = C_t^(-1/2)`, `C = mean_t (W_t^T W_t)^(-1)` and `W = C^(-1/2)`."""
        if self.choice != "shared" or not self.num_tasks:
            self.shared_whitening = self.center.new_zeros(0, self.in_features)
            return
        self.shared_whitening = shared_whitening(self.whitening).to(self.center)

    @torch.no_grad()
    def _calibrate(self) -> None:
        """Set the posterior's temperature from every learned task's held-out features (`gaussian`, two tasks or
        more): the one under which their posterior gives their own task the highest mean log-probability. The
        Gaussians' likelihoods in hundreds of dimensions are far surer than they are right; calibrated on inputs
        they were not fitted on, the posterior weighs alike tasks' answers by how often the choice between them is
        right (`ddas_mix: posterior`). Temperature 1 where the features are missing (a selector saved before)."""
        held = ~self.held_errors.isnan()  # (T, m): which rows are real
        if self.num_tasks < 2 or self.held_features.shape[:2] != held.shape or not held.any():
            self.temperature = torch.tensor(1.0, device=self.thresholds.device)
            return
        labels = torch.arange(self.num_tasks, device=held.device)[:, None].expand_as(held)[held]
        scores = self.choice_scores(self.held_features[held])
        self.temperature = torch.tensor(fit_temperature(scores, labels), device=self.thresholds.device)

    def shared_scores(self, features: Tensor) -> Tensor:
        """`(n, T)`: each input's squared distance to each task's mean under the shared covariance (`shared`)."""
        x = features.float()[:, : self.choice_width] @ self.shared_whitening  # (n, c)
        means = self.center @ self.shared_whitening  # (T, d)
        return (x[:, None] - means).pow(2).sum(-1)

    def shared_scores_loop(self, features: Tensor) -> Tensor:
        """The same distances from the shared precision matrix, one task at a time (the tests' reference)."""
        covariances = [torch.linalg.inv(w.double() @ w.double()) for w in self.whitening]
        precision = torch.linalg.inv(torch.stack(covariances).mean(0))
        columns = []
        for center in self.center.double():
            offset = features.double()[:, : self.choice_width] - center  # (n, c)
            columns.append(((offset @ precision) * offset).sum(-1))
        return torch.stack(columns, 1).float()

    def inputs(self, features: Tensor) -> Tensor:
        """What every autoencoder sees: `(n, d) -> (n, T, d)` (`whiten`) or `(n, 1, d)` (`l2`, shared)."""
        x = features.float()
        if self.normalize == "l2":
            return F.normalize(x, dim=-1)[:, None]
        x = x[:, : self.choice_width]
        return torch.einsum("ntd,tde->nte", x[:, None] - self.center, self.whitening)

    def errors(self, features: Tensor) -> Tensor:
        """Every autoencoder's mean squared reconstruction error of each feature (`gaussian`: every task's negative
        log-likelihood, doubled, up to a constant): `(n, d) -> (n, T)`."""
        z = self.inputs(features)  # (n, T or 1, d)
        if self.normalize == "gaussian":
            return z.pow(2).sum(-1) + self.log_det  # (n, T)
        h = torch.tanh(torch.einsum("ntd,thd->nth", z, self.enc_w) + self.enc_b)  # (n, T, h)
        recon = torch.einsum("nth,tdh->ntd", h, self.dec_w) + self.dec_b  # (n, T, d)
        return (recon - z).pow(2).mean(-1)  # (n, T)

    def accept_errors(self, features: Tensor) -> Tensor:
        """The errors that decide acceptance `(n, T)`: with nearest neighbours, the distance of the acceptance
        columns to their k-th nearest among each task's fitting rows; with two stages, each task's negative
        log-likelihood (doubled, up to a constant) of the last `accept_width` columns; else `errors`."""
        if self.k:
            return kth_nearest(features.float()[:, -self.bank.shape[2] :], self.bank, self.bank_rows, self.k)
        if not self.accept_width:
            return self.errors(features)
        x = features.float()[:, -self.accept_width :]
        z = torch.einsum("ntd,tde->nte", x[:, None] - self.accept_center, self.accept_whitening)
        return z.pow(2).sum(-1) + self.accept_log_det  # (n, T)

    def errors_loop(self, features: Tensor, accept: bool = False) -> Tensor:
        """The same errors, one task at a time (the reference the tests hold `errors` and, with `accept`,
        `accept_errors` to)."""
        x = features.float()
        columns = []
        for t in range(self.num_tasks):
            if accept and self.k:
                bank, rows = self.bank[t : t + 1], self.bank_rows[t : t + 1]
                columns.append(kth_nearest_loop(x[:, -bank.shape[2] :], bank, rows, self.k)[:, 0])
                continue
            if accept and self.accept_width:
                z = (x[:, -self.accept_width :] - self.accept_center[t]) @ self.accept_whitening[t]
                columns.append(z.pow(2).sum(-1) + self.accept_log_det[t])
                continue
            z = (
                F.normalize(x, dim=-1)
                if self.normalize == "l2"
                else (x[:, : self.choice_width] - self.center[t]) @ self.whitening[t]
            )
            if self.normalize == "gaussian":
                columns.append(z.pow(2).sum(-1) + self.log_det[t])
                continue
            h = torch.tanh(z @ self.enc_w[t].t() + self.enc_b[t])
            columns.append((h @ self.dec_w[t].t() + self.dec_b[t] - z).pow(2).mean(-1))
        return torch.stack(columns, 1)

    def scores(self, errors: Tensor) -> Tensor:
        """How unfamiliar each sample is to each task, comparable across tasks (lower: more familiar):
        `err / thr` (`l2`), the z-score of the log error among the task's held-out errors (`whiten`), or the
        negative log-likelihood itself (`gaussian`)."""
        if self.normalize == "gaussian":
            return errors
        if self.normalize == "l2" or self.log_error_stats.shape[0] != errors.shape[1]:
            return errors / self.thresholds
        mean, std = self.log_error_stats.unbind(-1)
        return (errors.clamp_min(1e-30).log() - mean) / std  # (n, T)

    def choice_scores(self, features: Tensor) -> Tensor:
        """`(n, T)`: the scores that name each input's task (lowest wins): the doubled negative log-likelihoods
        (`gaussian`), or the squared distances under the shared covariance (`shared`)."""
        return self.shared_scores(features) if self.choice == "shared" else self.scores(self.errors(features))

    @torch.no_grad()
    def posterior(self, features: Tensor) -> Tensor:
        """`(n, T)`: each input's posterior over the learned tasks at equal priors (`gaussian` only): a softmax of
        minus half its `choice_scores`, divided by the `temperature` calibrated on the tasks' held-out features
        (:meth:`_calibrate`). Where acceptance has a stage of its own (`accept_width`, `neighbours`), its argmax is
        the task `forward` chooses for an accepted input."""
        if self.normalize != "gaussian":
            raise ConfigError(f"a posterior over the tasks needs the gaussian rule, not {self.normalize!r}")
        scores = self.choice_scores(features.to(self.thresholds.device))
        return torch.softmax(-scores.double() / (2 * float(self.temperature)), -1).float()

    @torch.no_grad()
    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """`(task_ids (n,), keep_base (n,) bool)` for features `(n, d)`; with no task learned, all go to the base.
        Among the tasks that accept a sample, the most familiar one (two stages: the most familiar of all learned
        tasks; `shared`: the nearest under the shared covariance); no task accepts it: the base model. Routed
        acceptance: the chosen task alone accepts or rejects, on the trailing columns read along its route."""
        n, device = features.shape[0], features.device
        if self.num_tasks == 0:
            zeros = torch.zeros(n, dtype=torch.long, device=device)
            return zeros, torch.ones(n, dtype=torch.bool, device=device)
        features = features.to(self.thresholds.device)  # where the selector lives
        thresholds = self.acceptance_thresholds()
        if self.accept_state == "route":
            route = self.choice_scores(features).argmin(-1)  # (n,)
            errors = self.accept_errors(features).gather(1, route[:, None])[:, 0]
            return route.to(device), (errors > thresholds[route]).to(device)
        if self.accept_width or self.k:  # acceptance has errors of its own
            scores = self.choice_scores(features)  # (n, T)
            accepted = self.accept_errors(features) <= thresholds  # (n, T)
            return scores.argmin(-1).to(device), ~accepted.any(-1).to(device)
        errors = self.errors(features)  # (n, T)
        scores = self.shared_scores(features) if self.choice == "shared" else self.scores(errors)
        accepted = errors <= thresholds  # (n, T)
        task_ids = torch.where(accepted, scores, torch.full_like(scores, math.inf)).argmin(-1)
        task_ids = torch.where(accepted.any(-1), task_ids, scores.argmin(-1))  # (n,)
        return task_ids.to(device), ~accepted.any(-1).to(device)

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
        """Fit a new task's model on its training features `(n, d)` and calibrate its threshold on the held-out
        part; returns the new task's index. An autoencoder is fitted by full-batch Adam on the mean squared error
        (`noise`: the standard deviation of Gaussian noise added to its inputs, a denoising autoencoder); the
        `gaussian` rule fits only the mean and covariance, and `epochs`, `lr` and `noise` do not apply."""
        features = features.detach().float().cpu()
        if features.shape[0] < 10 or features.shape[1] != self.in_features:
            raise ConfigError(
                f"a DDAS selector needs at least 10 features of width {self.in_features} per task; got "
                f"{tuple(features.shape)}"
            )
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(features.shape[0], generator=generator)
        cut = max(1, int(round(holdout * features.shape[0])))
        held, fit = features[order[:cut], : self.choice_width], features[order[cut:], : self.choice_width]
        center, whitening, log_det = self._gaussian(fit)
        if self.normalize == "l2":
            held, fit = F.normalize(held, dim=-1), F.normalize(fit, dim=-1)
        else:
            held, fit = (held - center) @ whitening, (fit - center) @ whitening
        new: dict[str, Tensor] = {"center": center, "whitening": whitening}
        if self.k:  # the distances of held-out rows to their k-th nearest fitting row set the threshold
            columns = features[:, -self.bank.shape[2] :]
            rows = columns[order[cut:]]
            if rows.shape[0] < self.k:
                raise ConfigError(
                    f"neighbours {self.k}: this task has {rows.shape[0]} fitting features; give it more examples "
                    "or choose a smaller k"
                )
            held_errors = torch.cdist(columns[order[:cut]], rows).topk(self.k, largest=False).values[:, -1]
            new["log_det"] = log_det
            width = max(self.bank.shape[1], rows.shape[0])
            grown = F.pad(self.bank, (0, 0, 0, width - self.bank.shape[1]))
            self.bank = torch.cat([grown, F.pad(rows, (0, 0, 0, width - rows.shape[0]))[None].to(grown)])
            self.bank_rows = torch.cat([self.bank_rows, self.bank_rows.new_tensor([rows.shape[0]])])
        elif self.accept_width:  # the acceptance columns' own Gaussian sets the threshold
            columns = features[order[cut:], -self.accept_width :]
            accept_center, accept_whitening, accept_log_det = self._gaussian(columns)
            z = (features[order[:cut], -self.accept_width :] - accept_center) @ accept_whitening
            held_errors = z.pow(2).sum(-1) + accept_log_det
            new.update(
                log_det=log_det,
                accept_center=accept_center,
                accept_whitening=accept_whitening,
                accept_log_det=accept_log_det,
            )
        elif self.normalize == "gaussian":
            held_errors = held.pow(2).sum(-1) + log_det
            new["log_det"] = log_det
        else:
            encoder, decoder = fit_autoencoder(
                fit, self.hidden, epochs=epochs, lr=lr, noise=noise, generator=generator
            )
            with torch.no_grad():
                held_errors = (decoder(torch.tanh(encoder(held))) - held).pow(2).mean(-1).clamp_min(1e-30)
            logs = held_errors.log()
            spread = logs.std().clamp_min(1e-6) if len(logs) > 1 else logs.new_ones(())
            new.update(
                enc_w=encoder.weight.detach(),
                enc_b=encoder.bias.detach(),
                dec_w=decoder.weight.detach(),
                dec_b=decoder.bias.detach(),
                log_error_stats=torch.stack([logs.mean(), spread]),
            )
        new["thresholds"] = torch.quantile(held_errors, self.percentile / 100.0)
        device = self.thresholds.device
        width = max(self.held_errors.shape[1], held_errors.shape[0])
        self.held_errors = torch.cat(
            [_pad(self.held_errors, width), _pad(held_errors[None].to(device), width)]
        )
        if (
            self.normalize == "gaussian" and self.held_features.shape[0] == self.num_tasks
        ):  # every earlier task's too
            rows = features[order[:cut]][None].to(device)
            self.held_features = torch.cat(
                [
                    F.pad(self.held_features, (0, 0, 0, width - self.held_features.shape[1])),
                    F.pad(rows, (0, 0, 0, width - cut)),
                ]
            )
        for name, value in new.items():
            if name in ("center", "whitening") and self.normalize == "l2":
                continue
            setattr(self, name, torch.cat([getattr(self, name), value[None].to(device)]))
        self._pool()
        self._share()
        self._calibrate()
        return self.num_tasks - 1

    def _gaussian(self, fit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.normalize == "l2":
            return fit.new_zeros(()), fit.new_zeros(()), fit.new_zeros(())
        return shrunk_gaussian(fit, self.shrinkage)

    def state(self) -> dict[str, Tensor]:
        """Its tensors, for saving beside the adapters (`load_state` restores them)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Restore `state()`, one saved by an earlier version included (:func:`selector_formats.upgrade`: it
        decides as it did when saved)."""
        state = upgrade(state, self.in_features)
        for key, value in state.items():
            setattr(self, key, value.to(self.thresholds.device))
        self._pool()
        self._share()
        self._calibrate()


def _pad(rows: Tensor, width: int) -> Tensor:
    """`rows (k, m)` NaN-padded on the right to `(k, width)`."""
    return F.pad(rows.float(), (0, width - rows.shape[1]), value=math.nan)
