"""A linear router in each adapted layer, on that layer's input: one gate per token (MixLoRA style).

Legend: n samples, t tokens, e experts, d router input features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from loramix.routers.base import LearnedRouter, register_router


@register_router
class TokenRouter(LearnedRouter):
    """`logits = hidden W^T`, `W` `(e, d)`. Growing adds experts with fresh rows: they join every token's
    competition at once (this router knows no tasks whose old decisions it could keep)."""

    kind = "token"
    scope = "layer"
    per_token = True

    def __init__(self, in_features: int, num_experts: int, **kwargs: Any) -> None:
        super().__init__(in_features, num_experts, **kwargs)
        self.weight = nn.Parameter(torch.randn(num_experts, in_features) * 0.02)

    def logits(self, hidden: Tensor, state: Any) -> Tensor:
        return hidden @ self.weight.float().t()  # (n, t, e)

    @torch.no_grad()
    def grow(self, num_experts: int, num_tasks: int | None) -> None:
        extra = (
            torch.randn(num_experts - self.num_experts, self.weight.shape[1], device=self.weight.device)
            * 0.02
        )
        self.weight = nn.Parameter(torch.cat([self.weight, extra.to(self.weight)]), self.weight.requires_grad)
        self._grow_noise(num_experts)
        self.num_experts = num_experts
