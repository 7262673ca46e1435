"""Learned routers: per token inside a layer (MixLoRA style), or per sample for the whole model (MoLA-Router).

Legend: n samples, t tokens, e experts, d router input features, h router hidden width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loramix.routers.base import LearnedRouter


class TokenRouter(LearnedRouter):
    """A linear router on each adapted layer's own input: one gate per token."""

    scope = "layer"

    def __init__(self, in_features: int, num_experts: int, **kwargs) -> None:
        super().__init__(in_features, num_experts, **kwargs)
        self.weight = nn.Parameter(torch.randn(num_experts, in_features) * 0.02)

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.weight.float().t()  # (n, t, e)


class SampleRouter(LearnedRouter):
    """One router network for the whole model (MoLA-Router, Zhou et al. 2024, Sec. 3.3).

    It looks at the input once (mean-pooled input embeddings by default) and its per-sample gate is shared by every
    adapted layer. `network` may be any module mapping `(n, d)` features to `(n, e)` logits; the default is a
    small MLP `d -> h -> e`.
    """

    scope = "model"

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        hidden: int = 64,
        network: nn.Module | None = None,
        **kwargs,
    ) -> None:
        super().__init__(in_features, num_experts, **kwargs)
        self.network = network or nn.Sequential(
            nn.LayerNorm(in_features),
            nn.Linear(in_features, hidden),
            nn.GELU(),
            nn.Linear(hidden, num_experts),
        )

    def logits(self, hidden: Tensor) -> Tensor:
        dtype = next(self.network.parameters()).dtype
        return self.network(hidden.to(dtype)).float()  # (n, e)
