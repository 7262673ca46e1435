"""One router network for the whole model (MoLA-Router, Zhou et al. 2024, Sec. 3.3).

Legend: n samples, e experts, d router input features, h router hidden width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from loramix.errors import ConfigError
from loramix.routers.base import LearnedRouter, Router, register_router

if TYPE_CHECKING:
    from loramix.config import AdapterConfig


@register_router
class SampleRouter(LearnedRouter):
    """It looks at the input once (mean-pooled input embeddings by default) and its per-sample gate is shared by
    every adapted layer. `network` may be any module mapping `(n, d)` features to `(n, e)` logits; the default is
    a small MLP `d -> h -> e`. Growing the default network adds output rows: new experts join at once."""

    kind = "sample"
    scope = "model"
    pools_model_input = True

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        hidden: int = 64,
        network: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, num_experts, **kwargs)
        self.network = network or nn.Sequential(
            nn.LayerNorm(in_features),
            nn.Linear(in_features, hidden),
            nn.GELU(),
            nn.Linear(hidden, num_experts),
        )

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int | None, **kwargs: Any) -> Router | None:
        return super().from_config(config, in_features, hidden=config.router_hidden, **kwargs)

    def logits(self, hidden: Tensor, state: Any) -> Tensor:
        dtype = next(self.network.parameters()).dtype
        return self.network(hidden.to(dtype)).float()  # (n, e)

    @torch.no_grad()
    def grow(self, num_experts: int, num_tasks: int | None) -> None:
        last = self.network[-1] if isinstance(self.network, nn.Sequential) else None
        if not isinstance(last, nn.Linear):
            raise ConfigError("a custom router network cannot grow: build the grown router yourself")
        grown = nn.Linear(last.in_features, num_experts).to(last.weight)
        grown.weight[: last.out_features] = last.weight
        grown.bias[: last.out_features] = last.bias
        grown.requires_grad_(last.weight.requires_grad)
        self.network[-1] = grown
        self._grow_noise(num_experts)
        self.num_experts = num_experts
