"""The gate type every router returns, and the template learned routers share.

A router says what it decided and nothing else: it computes no loss. Routing maths runs in fp32.
Legend: n samples, t tokens, e experts, k experts kept, d router input features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Gate:
    """A routing decision.

    weights: `(n, e)` per sample or `(n, t, e)` per token, fp32, each row sums to 1.
    indices: for a hard gate, the expert of each sample `(n,)`; for top-k, the kept experts `(..., k)`.
    logits: the router's raw scores where it has them (TwD and the z-loss need them).
    hard: one expert per sample, applied by gather + bmm instead of the dense op.
    """

    weights: Tensor
    indices: Tensor | None = None
    logits: Tensor | None = None
    hard: bool = False

    @property
    def per_token(self) -> bool:
        return self.weights.dim() == 3


class Router(nn.Module):
    """Base of all routers. `scope` says where it runs: once per model forward, or inside each adapted layer."""

    scope: ClassVar[str] = "layer"  # "layer" or "model"
    needs_task_ids: ClassVar[bool] = False
    needs_hidden: ClassVar[bool] = False

    def forward(self, *, hidden: Tensor | None = None, task_ids: Tensor | None = None) -> Gate:
        raise NotImplementedError


class LearnedRouter(Router):
    """Template for routers that score experts from features: `logits()` differs, the rest is shared.

    softmax(logits / temperature), optional noise in training (noisy top-k, Shazeer et al. 2017, with a learned
    noise scale), optional top-k with renormalisation. Top-1 keeps a gate of exactly 1 whose gradient is the
    chosen probability's (a straight-through estimate), so the router still learns from the task loss.
    """

    needs_hidden = True

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        top_k: int | None = None,
        noisy: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.temperature = num_experts, top_k, temperature
        self.noise = nn.Linear(in_features, num_experts, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    def logits(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, *, hidden: Tensor | None = None, task_ids: Tensor | None = None) -> Gate:
        assert hidden is not None
        hidden = hidden.float()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            logits = self.logits(hidden).float()  # (n, [t,] e)
            scores = logits
            if self.noise is not None and self.training:
                scale = F.softplus(F.linear(hidden, self.noise.weight.float()))
                scores = logits + torch.randn_like(logits) * scale
            probs = torch.softmax(scores / self.temperature, dim=-1)
            if self.top_k is None or self.top_k >= self.num_experts:
                return Gate(weights=probs, logits=logits)
            top_p, top_i = probs.topk(self.top_k, dim=-1)  # (..., k)
            if self.top_k == 1:  # value 1, gradient of p: renormalising alone would give the router none
                top_p = top_p - top_p.detach() + 1.0
            else:
                top_p = top_p / top_p.sum(-1, keepdim=True)
            weights = torch.zeros_like(probs).scatter(-1, top_i, top_p)
            return Gate(weights=weights, indices=top_i, logits=logits)
