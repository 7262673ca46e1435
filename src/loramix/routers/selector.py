"""The Distribution Discriminative Auto-Selector (DDAS; Yu et al., CVPR 2024, Sec. 3.3): per sample, which learned
task an input belongs to, or none (then it goes to the untouched base model).

One small autoencoder per learned task is fitted on features of that task's training inputs. At inference every
autoencoder reconstructs the sample's feature; the errors are divided by each autoencoder's own threshold, and

    task = argmin_t err_t(f) / thr_t,      keep base  if  min_t err_t(f) / thr_t > 1

so a sample goes to the task whose autoencoder finds it most familiar relative to what that autoencoder calls
familiar, and to the base model when no autoencoder does. The threshold of task t is a percentile (`percentile`,
95 by default) of its autoencoder's errors on held-out training features of task t (a fifth of them, never fitted
on): about 5% of a learned task's inputs are sent to the base by construction, the price of sending unfamiliar
inputs there. The released code hard-codes one threshold for all tasks (0.0655) and decides per batch; this decides
per sample, inside the same batched pass.

The autoencoders are stacked tensors and run as one batched op for all tasks. Features are L2-normalised.

Legend: n samples, d feature width, h autoencoder width, T learned tasks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import ConfigError


class AutoSelector(nn.Module):
    """Per-task autoencoders `d -> h -> d` (tanh) with calibrated thresholds.

    Example:
        >>> selector = AutoSelector(384)
        >>> selector.add_task(train_features_of_task_0)
        >>> task_ids, keep_base = selector(features)  # (n,), (n,) bool
    """

    loramix_role = "router"

    def __init__(self, in_features: int, *, hidden: int = 64, percentile: float = 95.0) -> None:
        super().__init__()
        if not 0 < percentile <= 100:
            raise ConfigError(f"percentile must lie in (0, 100], got {percentile}")
        self.in_features, self.hidden, self.percentile = in_features, hidden, percentile
        self.register_buffer("enc_w", torch.zeros(0, hidden, in_features))  # (T, h, d)
        self.register_buffer("enc_b", torch.zeros(0, hidden))
        self.register_buffer("dec_w", torch.zeros(0, in_features, hidden))  # (T, d, h)
        self.register_buffer("dec_b", torch.zeros(0, in_features))
        self.register_buffer("thresholds", torch.zeros(0))  # (T,)

    @property
    def num_tasks(self) -> int:
        return int(self.thresholds.shape[0])

    def errors(self, features: Tensor) -> Tensor:
        """Every autoencoder's mean squared reconstruction error of each feature: `(n, d) -> (n, T)`."""
        x = F.normalize(features.float(), dim=-1)
        h = torch.tanh(torch.einsum("nd,thd->nth", x, self.enc_w) + self.enc_b)  # (n, T, h)
        recon = torch.einsum("nth,tdh->ntd", h, self.dec_w) + self.dec_b  # (n, T, d)
        return (recon - x[:, None]).pow(2).mean(-1)  # (n, T)

    def errors_loop(self, features: Tensor) -> Tensor:
        """The same errors, one autoencoder at a time (the reference the tests hold `errors` to)."""
        x = F.normalize(features.float(), dim=-1)
        columns = []
        for t in range(self.num_tasks):
            h = torch.tanh(x @ self.enc_w[t].t() + self.enc_b[t])
            columns.append((h @ self.dec_w[t].t() + self.dec_b[t] - x).pow(2).mean(-1))
        return torch.stack(columns, 1)

    @torch.no_grad()
    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """`(task_ids (n,), keep_base (n,) bool)` for features `(n, d)`; with no task learned, all go to the base."""
        n = features.shape[0]
        if self.num_tasks == 0:
            zeros = torch.zeros(n, dtype=torch.long, device=features.device)
            return zeros, torch.ones(n, dtype=torch.bool, device=features.device)
        relative = self.errors(features) / self.thresholds  # (n, T)
        best, task_ids = relative.min(-1)
        return task_ids, best > 1.0

    @torch.enable_grad()
    def add_task(
        self, features: Tensor, *, epochs: int = 200, lr: float = 1e-2, seed: int = 0, holdout: float = 0.2
    ) -> int:
        """Fit a new autoencoder on one task's training features `(n, d)` and calibrate its threshold on the
        held-out part; returns the new task's index. Full-batch Adam on the mean squared error."""
        features = F.normalize(features.detach().float().cpu(), dim=-1)
        if features.shape[0] < 10 or features.shape[1] != self.in_features:
            raise ConfigError(
                f"a DDAS autoencoder needs at least 10 features of width {self.in_features}; got "
                f"{tuple(features.shape)}"
            )
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(features.shape[0], generator=generator)
        cut = max(1, int(round(holdout * features.shape[0])))
        held, fit = features[order[:cut]], features[order[cut:]]
        encoder, decoder = nn.Linear(self.in_features, self.hidden), nn.Linear(self.hidden, self.in_features)
        with torch.no_grad():
            for layer in (encoder, decoder):
                bound = 1 / layer.in_features**0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
        for _ in range(epochs):
            loss = (decoder(torch.tanh(encoder(fit))) - fit).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            held_errors = (decoder(torch.tanh(encoder(held))) - held).pow(2).mean(-1)
            threshold = torch.quantile(held_errors, self.percentile / 100.0).clamp_min(1e-12)
        device = self.thresholds.device
        self.enc_w = torch.cat([self.enc_w, encoder.weight.detach()[None].to(device)])
        self.enc_b = torch.cat([self.enc_b, encoder.bias.detach()[None].to(device)])
        self.dec_w = torch.cat([self.dec_w, decoder.weight.detach()[None].to(device)])
        self.dec_b = torch.cat([self.dec_b, decoder.bias.detach()[None].to(device)])
        self.thresholds = torch.cat([self.thresholds, threshold[None].to(device)])
        return self.num_tasks - 1

    def state(self) -> dict[str, Tensor]:
        """Its tensors, for saving beside the adapters (`load_state` restores them)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        for key, value in state.items():
            setattr(self, key, value.to(self.thresholds.device))
