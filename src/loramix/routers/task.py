"""Routing by task id, hard (MoLA-Grad, Zhou et al. 2024, Sec. 3.2): the gradients of tasks never meet.

Given weights over the tasks (`routing(..., task_weights=)`, an auto-selector's posterior at inference:
`ddas_mix: blend`), each sample's gate mixes its tasks' experts by them instead, as a top-k gate over the experts
they name (with the pairs beyond each sample's heaviest expert listed, which LoRA experts run alone); a sample whose
row is zero keeps its task's expert, and a batch where no row names two experts keeps the hard gate.

Legend: n samples, e experts, T tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from loramix.errors import ConfigError
from loramix.routers.base import Router, register_router
from loramix.routers.gate import Gate

if TYPE_CHECKING:
    from loramix.config import AdapterConfig


@register_router
class TaskRouter(Router):
    """Task id -> one expert. `task_to_expert` lets several tasks share an expert; by default task t uses expert t.
    Runs once per model forward; every adapted layer uses its gate.

    Example:
        >>> TaskRouter(3, 2, task_to_expert=[0, 1, 1])(RoutingState(task_ids=torch.tensor([2, 0])), None).indices
        tensor([1, 0])
    """

    kind = "task"
    scope = "model"
    needs_task_ids = True
    needs_num_tasks = True
    uses_task_to_expert = True

    def __init__(self, num_tasks: int, num_experts: int, *, task_to_expert: list[int] | None = None) -> None:
        super().__init__()
        self.num_tasks, self.num_experts = num_tasks, num_experts
        mapping = torch.arange(num_tasks) if task_to_expert is None else torch.tensor(task_to_expert)
        self.register_buffer("task_to_expert", mapping.long())

    @classmethod
    def check_config(cls, config: AdapterConfig) -> None:
        super().check_config(config)
        if config.task_to_expert is not None:
            if len(config.task_to_expert) != config.num_tasks:
                raise ValueError(
                    f"task_to_expert has {len(config.task_to_expert)} entries but num_tasks is {config.num_tasks}"
                )
            bad = [e for e in config.task_to_expert if not 0 <= e < config.num_experts]
            if bad:
                raise ValueError(f"task_to_expert names experts {bad} outside 0..{config.num_experts - 1}")
        elif config.num_tasks != config.num_experts:
            raise ValueError(
                f"router 'task' with num_tasks={config.num_tasks} != num_experts={config.num_experts} needs "
                "task_to_expert"
            )

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int | None, **kwargs: Any) -> Router | None:
        assert config.num_tasks is not None
        return cls(config.num_tasks, config.num_experts, task_to_expert=config.task_to_expert)

    def forward(self, state: Any, hidden: Tensor | None) -> Gate:
        experts = self.task_to_expert[self.task_ids(state)]  # (n,)
        hard = F.one_hot(experts, self.num_experts).float()  # (n, e)
        weights = getattr(state, "task_weights", None)
        if weights is None:
            one_task = getattr(state, "one_task", None)
            expert = None if one_task is None else self.host_mapping()[one_task]
            return Gate(weights=hard, indices=experts, hard=True, expert=expert)
        mixed = weights.float() @ F.one_hot(self.task_to_expert, self.num_experts).float()  # (n, e)
        mixed = torch.where(mixed.sum(-1, keepdim=True) > 0, mixed, hard)
        k = int((mixed > 0).sum(-1).max()) if len(mixed) else 1
        if k <= 1:  # one expert each: the hard gate of the expert named
            experts = mixed.argmax(-1)
            return Gate(weights=F.one_hot(experts, self.num_experts).float(), indices=experts, hard=True)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        indices = mixed.topk(k, -1).indices  # (n, k), each row's heaviest expert first
        named = mixed.gather(-1, indices[:, 1:]) > 0  # (n, k-1)
        pairs = torch.stack([named.nonzero()[:, 0], indices[:, 1:][named]], 1)  # (p, 2)
        return Gate(weights=mixed, indices=indices, pairs=pairs)

    def host_mapping(self) -> list[int]:
        """`task_to_expert` as a list, read from the device once per change of the buffer (a new tensor, or an
        in-place write such as loading a state dict)."""
        mapping = self.task_to_expert
        held = getattr(self, "_host", None)
        if held is None or held[0] is not mapping or held[1] != mapping._version:
            held = self._host = (mapping, mapping._version, mapping.tolist())
        return held[2]

    @torch.no_grad()
    def grow(self, num_experts: int, num_tasks: int | None, task_to_expert: list[int] | None = None) -> None:
        """New task `T + j` goes to new expert `E + j` unless `task_to_expert` (for every task) says otherwise."""
        num_tasks = num_tasks or self.num_tasks
        if task_to_expert is None:
            new = torch.arange(num_tasks - self.num_tasks) + self.num_experts
            if new.numel() and int(new.max()) >= num_experts:
                raise ConfigError(
                    f"{num_tasks - self.num_tasks} new tasks but only {num_experts - self.num_experts} new experts: "
                    "pass task_to_expert for every task"
                )
            mapping = torch.cat([self.task_to_expert.cpu(), new])
        else:
            mapping = torch.tensor(task_to_expert)
            if len(mapping) != num_tasks or not torch.equal(
                mapping[: self.num_tasks], self.task_to_expert.cpu()
            ):
                raise ConfigError(
                    f"task_to_expert must have {num_tasks} entries and keep the old tasks' experts "
                    f"{self.task_to_expert.tolist()}"
                )
            if int(mapping.max()) >= num_experts or int(mapping.min()) < 0:
                raise ConfigError(f"task_to_expert names experts outside 0..{num_experts - 1}")
        self.task_to_expert = mapping.long().to(self.task_to_expert.device)
        self.num_tasks, self.num_experts = num_tasks, num_experts

    def task_gate(self, task: int) -> Tensor:
        return F.one_hot(self.task_to_expert[task].cpu(), self.num_experts).float()
