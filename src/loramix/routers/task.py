"""Routing by task id: hard (MoLA-Grad) and a learned per-task table (Poly / MHR).

Legend: n samples, e experts, T tasks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.routers.base import Gate, Router


class TaskRouter(Router):
    """Task id -> one expert (MoLA-Grad, Zhou et al. 2024, Sec. 3.2): the gradients of tasks never meet.

    `task_to_expert` lets several tasks share an expert; by default task t uses expert t.
    Runs once per model forward; every adapted layer uses its gate.

    Example:
        >>> TaskRouter(3, 2, task_to_expert=[0, 1, 1])(task_ids=torch.tensor([2, 0])).indices
        tensor([1, 0])
    """

    scope = "model"
    needs_task_ids = True

    def __init__(self, num_tasks: int, num_experts: int, *, task_to_expert: list[int] | None = None) -> None:
        super().__init__()
        self.num_tasks, self.num_experts = num_tasks, num_experts
        mapping = torch.arange(num_tasks) if task_to_expert is None else torch.tensor(task_to_expert)
        self.register_buffer("task_to_expert", mapping.long())

    def forward(self, *, hidden: Tensor | None = None, task_ids: Tensor | None = None) -> Gate:
        assert task_ids is not None
        experts = self.task_to_expert[task_ids]  # (n,)
        return Gate(weights=F.one_hot(experts, self.num_experts).float(), indices=experts, hard=True)


class PolyRouter(Router):
    """A learned table of task -> expert mixing weights in each layer (Poly, Ponti et al. 2023; MHR).

    Training samples the table through a relaxed Bernoulli (logistic noise, temperature 1); evaluation uses the
    sigmoid. The weights are then normalised to sum to one.
    """

    scope = "layer"
    needs_task_ids = True

    def __init__(
        self, num_tasks: int, num_experts: int, *, temperature: float = 1.0, eps: float = 1e-12
    ) -> None:
        super().__init__()
        self.num_experts, self.temperature, self.eps = num_experts, temperature, eps
        self.table = nn.Parameter(torch.empty(num_tasks, num_experts).uniform_(-1e-3, 1e-3))

    def forward(self, *, hidden: Tensor | None = None, task_ids: Tensor | None = None) -> Gate:
        assert task_ids is not None
        logits = self.table.float()[task_ids]  # (n, e)
        if self.training:
            u = torch.rand_like(logits).clamp(self.eps, 1 - self.eps)
            scores = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.temperature)
        else:
            scores = torch.sigmoid(logits)
        return Gate(weights=scores / (scores.sum(-1, keepdim=True) + self.eps), logits=logits)

    def weights_for_task(self, task: int) -> Tensor:
        """The evaluation gate of one task, `(e,)`, used to merge or export that task."""
        scores = torch.sigmoid(self.table.float()[task])
        return scores / (scores.sum() + self.eps)
