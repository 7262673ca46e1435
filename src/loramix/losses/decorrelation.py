"""Task-wise Decorrelation (TwD): a supervised contrastive loss on router outputs.

MoLA (Zhou et al., "Exploring Training on Heterogeneous Data with Mixture of Low-rank Adapters", ICML 2024)
adds TwD to MoLA-Router so that samples of one task get similar routing and samples of different tasks get
dissimilar routing. Each sample's router logits are (optionally) projected, L2-normalised, and pulled towards
the other samples of its task against all other samples in the batch, as in supervised contrastive learning.

On logits the loss is blind to what the router decides: it is invariant to the logits' scale (gates may stay
near uniform) and two tasks may point in different directions yet share their largest logit (the same top
expert). With `space="gates"` it compares the gate probabilities instead. They are non-negative, so two gates
are orthogonal only when they share no expert: pushing tasks apart then gives them different experts, and
pulling a task together makes its gates agree on them.

Legend: n samples, t tokens, e experts, d projection width.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import ConfigError, RoutingError


class TwDProjection(nn.Module):
    """The trainable projection `P` applied to router logits before TwD (MoLA's released code: `e -> 32`).

    Example:
        >>> projection = TwDProjection(num_experts=4)
        >>> projection(torch.randn(8, 4)).shape
        torch.Size([8, 32])
    """

    def __init__(self, num_experts: int, proj_dim: int = 32, *, bias: bool = True) -> None:
        super().__init__()
        if num_experts < 1 or proj_dim < 1:
            raise ConfigError(f"num_experts and proj_dim must be >= 1, got {num_experts} and {proj_dim}")
        self.num_experts, self.proj_dim = num_experts, proj_dim
        self.linear = nn.Linear(num_experts, proj_dim, bias=bias)

    def forward(self, router_logits: Tensor) -> Tensor:
        """Project `(..., e)` logits to `(..., d)`."""
        return self.linear(router_logits)  # (..., d)


def _sample_logits(router_logits: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sample fp32 logits `(n, e)`: per-token logits `(n, t, e)` are averaged over the unmasked tokens.

    A sample whose tokens are all masked gets the zero vector.
    """
    z = router_logits.float()
    if z.dim() == 2:
        if mask is not None:
            raise RoutingError(
                f"mask is only used with per-token logits (n, t, e); got logits of shape {tuple(z.shape)} "
                "and a mask. Drop the mask, or pass per-token logits."
            )
        return z  # (n, e)
    if z.dim() != 3:
        raise RoutingError(
            f"router_logits must have shape (n, e) or (n, t, e), got {tuple(router_logits.shape)}"
        )
    if mask is None:
        return z.mean(dim=1)  # (n, e)
    if mask.shape != z.shape[:2]:
        raise RoutingError(
            f"mask must have shape (n, t) = {tuple(z.shape[:2])} to match router_logits, got {tuple(mask.shape)}"
        )
    weight = mask.to(torch.float32).unsqueeze(-1)  # (n, t, 1)
    total = (z * weight).sum(dim=1)  # (n, e)
    count = weight.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (n, 1)
    return total / count  # (n, e)


def twd_loss(
    router_logits: Tensor,
    task_ids: Tensor,
    *,
    projection: nn.Module | None = None,
    tau: float = 1.0,
    mask: Tensor | None = None,
    space: Literal["logits", "gates"] = "logits",
) -> Tensor:
    """Task-wise Decorrelation loss of MoLA (Zhou et al., ICML 2024), computed in fp32.

    With `h_i = normalize(P z_i)` (P the projection, identity when None; `z_i` the logits, or with
    `space="gates"` their softmax over experts) and `S_ij = exp(h_i . h_j / tau)`,
    `S_ii = 0`, the loss is the mean over ordered same-task pairs `(i, j)`, `i != j`, of

        -log( S_ij / sum_{k != i} S_ik ),

    evaluated with log-sum-exp. Tasks with one sample in the batch contribute no pairs; a batch with no
    same-task pair gives a zero that is still connected to the inputs' graph.

    Args:
        router_logits: `(n, e)` per-sample logits, or `(n, t, e)` per-token logits, first averaged over tokens.
        task_ids: `(n,)` integer task id of each sample.
        projection: maps `(n, e)` to `(n, d)`, e.g. :class:`TwDProjection`; None for the identity.
        tau: temperature, > 0.
        mask: `(n, t)` with per-token logits only; true (or 1) for real tokens, false (or 0) for padding.
        space: "logits" (MoLA's code) or "gates": compare softmax(logits), so that tasks pushed apart take
            different experts (see the module docstring); use it without a projection to keep that property.

    Example:
        >>> logits, task_ids = torch.randn(8, 4, requires_grad=True), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = twd_loss(logits, task_ids, projection=TwDProjection(num_experts=4), tau=0.5)
        >>> loss.backward()
        >>> twd_loss(logits, task_ids, space="gates", tau=0.1).shape
        torch.Size([])
    """
    if tau <= 0:
        raise ConfigError(f"tau must be > 0, got {tau}")
    if space not in ("logits", "gates"):
        raise ConfigError(f"space must be 'logits' or 'gates', got {space!r}")
    z = _sample_logits(router_logits, mask)  # (n, e)
    if space == "gates":
        z = torch.softmax(z, dim=-1)  # (n, e)
    n = z.shape[0]
    if task_ids.shape != (n,):
        raise RoutingError(
            f"task_ids must have shape (n,) = ({n},) to match router_logits, got {tuple(task_ids.shape)}"
        )
    if n < 2:
        return router_logits.float().sum() * 0.0

    h = z if projection is None else projection(z)  # (n, d)
    h = F.normalize(h.float(), dim=-1)  # (n, d)
    self_pair = torch.eye(n, dtype=torch.bool, device=h.device)  # (n, n)
    similarity = (h @ h.T / tau).masked_fill(self_pair, float("-inf"))  # (n, n); S_ii = exp(-inf) = 0
    log_prob = torch.log_softmax(similarity, dim=-1)  # (n, n): log S_ij - log sum_{k != i} S_ik

    task_ids = task_ids.to(h.device)
    positive = (task_ids[:, None] == task_ids[None, :]) & ~self_pair  # (n, n)
    # where(), not multiplication: the -inf on the diagonal must not become 0 * -inf = nan.
    total = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum()
    num_pairs = positive.sum().clamp_min(1)  # a tensor, so no host synchronisation
    return -total / num_pairs
