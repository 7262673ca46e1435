"""A learned table of task -> expert mixing weights in each layer (Poly, Ponti et al. 2023; MHR, Caccia et al.).

Legend: n samples, e experts, T tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from loramix.routers.base import Router, register_router
from loramix.routers.gate import Gate

if TYPE_CHECKING:
    from loramix.config import AdapterConfig


@register_router
class PolyRouter(Router):
    """Training samples the table through a relaxed Bernoulli (logistic noise, temperature 1); evaluation uses the
    sigmoid. The weights are then normalised to sum to one. `allowed` `(T, e)` says which experts a task may use:
    experts added after a task was created stay out of its mixture, so growing never changes an old task's gate.
    """

    kind = "poly"
    scope = "layer"
    needs_task_ids = True
    needs_num_tasks = True

    def __init__(
        self, num_tasks: int, num_experts: int, *, temperature: float = 1.0, eps: float = 1e-12
    ) -> None:
        super().__init__()
        self.num_experts, self.temperature, self.eps = num_experts, temperature, eps
        self.table = nn.Parameter(torch.empty(num_tasks, num_experts).uniform_(-1e-3, 1e-3))
        self.register_buffer("allowed", torch.ones(num_tasks, num_experts, dtype=torch.bool))

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int | None, **kwargs: Any) -> Router | None:
        assert config.num_tasks is not None
        return cls(config.num_tasks, config.num_experts)

    def _scores(self, logits: Tensor, allowed: Tensor) -> Tensor:
        scores = torch.sigmoid(logits)
        return scores * allowed.to(scores.dtype)

    def forward(self, state: Any, hidden: Tensor | None) -> Gate:
        task_ids = self.task_ids(state)
        logits = self.table.float()[task_ids]  # (n, e)
        if self.training:
            u = torch.rand_like(logits).clamp(self.eps, 1 - self.eps)
            scores = self._scores(
                (logits + torch.log(u) - torch.log1p(-u)) / self.temperature, self.allowed[task_ids]
            )
        else:
            scores = self._scores(logits, self.allowed[task_ids])
        return Gate(weights=scores / (scores.sum(-1, keepdim=True) + self.eps), logits=logits)

    def weights_for_task(self, task: int) -> Tensor:
        """The evaluation gate of one task, `(e,)`, used to merge or export that task."""
        scores = self._scores(self.table.float()[task], self.allowed[task])
        return scores / (scores.sum() + self.eps)

    task_gate = weights_for_task

    @torch.no_grad()
    def grow(self, num_experts: int, num_tasks: int | None) -> None:
        old_tasks, old_experts = self.table.shape
        num_tasks = num_tasks or old_tasks
        table = torch.empty(num_tasks, num_experts, device=self.table.device).uniform_(-1e-3, 1e-3)
        table[:old_tasks, :old_experts] = self.table
        allowed = torch.ones(num_tasks, num_experts, dtype=torch.bool, device=self.allowed.device)
        allowed[:old_tasks] = False
        allowed[:old_tasks, :old_experts] = self.allowed
        self.table = nn.Parameter(table, self.table.requires_grad)
        self.allowed = allowed
        self.num_experts = num_experts
