"""A bank of routers, one per task, in each adapted layer (MoE-Adapters4CL, Yu et al., CVPR 2024).

Sample i is scored by the router of its task `t_i`, from the layer's input at the first token (the CLS token of an
encoder; the pooled channels of an image feature map): noisy top-k, every router zero-initialised (uniform at
start), noise only in training. A new task adds a router without touching the old ones; old routers can be frozen
(:meth:`PerTaskRouter.freeze_tasks`) and then stay bit-identical through any optimizer. Experts added after a task
stay out of that task's choice (`allowed`), so growing never changes an old task's gate.

Legend: n samples, t tokens, e experts, d router input features, T tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import RoutingError
from loramix.frozen_rows import FrozenRows
from loramix.routers.base import LearnedRouter, Router, register_router

if TYPE_CHECKING:
    from loramix.config import AdapterConfig


def first_token(hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """`(n, t, d) -> (n, d)` at each sample's first token: token 0, or with an `attention_mask` `(n, t)` the first
    one it keeps (a left-padded prompt's first real token); `(n, c, h, w) -> (n, c)` by the spatial mean; `(n, d)`
    as it is."""
    if hidden.dim() == 3:
        n, t = hidden.shape[:2]
        if attention_mask is None or attention_mask.shape[0] != n or attention_mask.shape[1] > t:
            return hidden[:, 0]
        # (n,): 0 for right padding or none; a prompt's mask still names its first token once the sequence grew
        first = attention_mask.ne(0).int().argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if hidden.dim() > 3:
        return hidden.flatten(2).mean(-1)
    return hidden


@register_router
class PerTaskRouter(LearnedRouter, FrozenRows):
    """`logits_i = W[t_i] x_i`, `W` `(T, e, d)`; noise scale `softplus(W_noise[t_i] x_i) + 0.01` when noisy."""

    kind = "per-task"
    scope = "layer"
    needs_task_ids = True
    needs_num_tasks = True
    per_sample = True  # one gate per sample, from its first token: generation decides it on the prompt

    def __init__(self, in_features: int, num_experts: int, *, num_tasks: int, **kwargs: Any) -> None:
        noisy = kwargs.pop("noisy", False)
        super().__init__(in_features, num_experts, noisy=False, **kwargs)
        self.num_tasks, self.noisy = num_tasks, noisy
        self.stacked = ("weight", "noise_weight") if noisy else ("weight",)
        self.weight = nn.Parameter(torch.zeros(num_tasks, num_experts, in_features))
        if noisy:
            self.noise_weight = nn.Parameter(torch.zeros(num_tasks, num_experts, in_features))
        self.register_buffer("allowed", torch.ones(num_tasks, num_experts, dtype=torch.bool))
        self._init_frozen()

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int | None, **kwargs: Any) -> Router | None:
        assert config.num_tasks is not None
        return super().from_config(config, in_features, num_tasks=config.num_tasks, **kwargs)

    @property
    def num_rows(self) -> int:
        return self.num_tasks

    def reset_rows(self, rows: slice) -> None:
        for name in self.stacked:
            getattr(self, name)[rows] = 0.0

    def features(self, hidden: Tensor, state: Any = None) -> Tensor:
        return first_token(hidden, None if state is None else state.attention_mask)

    def _per_task(self, name: str, hidden: Tensor, task_ids: Tensor) -> Tensor:
        """Each sample's scores by its own task's router, `(n, d) -> (n, e)`: a product and a sum over `d`, whose
        rounding does not depend on how many tasks and experts there are (a matmul's does), so that growing leaves
        old tasks' logits bit-identical."""
        if task_ids.shape[0] != hidden.shape[0]:
            raise RoutingError(
                f"router 'per-task' got {hidden.shape[0]} inputs but task_ids for {task_ids.shape[0]}: the routing "
                "block's task_ids must have one entry per sample of the batch"
            )
        weight = self.effective()[name].float()[task_ids]  # (n, e, d)
        return (hidden[:, None, :] * weight).sum(-1)

    def logits(self, hidden: Tensor, state: Any) -> Tensor:
        task_ids = self.task_ids(state)
        logits = self._per_task("weight", hidden, task_ids)  # (n, e)
        return logits.masked_fill(~self.allowed[task_ids], torch.finfo(logits.dtype).min)

    def noise_scale(self, hidden: Tensor, state: Any) -> Tensor:
        return F.softplus(self._per_task("noise_weight", hidden, self.task_ids(state))) + 0.01

    def freeze_tasks(self, tasks: list[int] | Tensor) -> None:
        """Freeze these tasks' routers: bit-identical from now on, whatever the optimizer does."""
        self.freeze_rows(tasks)

    @torch.no_grad()
    def grow(self, num_experts: int, num_tasks: int | None) -> None:
        num_tasks = num_tasks or self.num_tasks
        if num_experts > self.num_experts:
            self.sync_frozen_into_parameters()
            frozen = self.frozen_rows
            for name in self.stacked:
                param = getattr(self, name)
                extra = param.new_zeros(param.shape[0], num_experts - self.num_experts, param.shape[2])
                setattr(self, name, nn.Parameter(torch.cat([param, extra], 1), param.requires_grad))
            self._init_frozen_rows(self.num_tasks)
            if frozen:
                self.freeze_rows(frozen)
            allowed = torch.zeros(self.num_tasks, num_experts, dtype=torch.bool, device=self.allowed.device)
            allowed[:, : self.num_experts] = self.allowed
            self.allowed = allowed
            self.num_experts = num_experts
        if num_tasks > self.num_tasks:
            self.grow_rows(num_tasks)
            extra = torch.ones(
                num_tasks - self.num_tasks, num_experts, dtype=torch.bool, device=self.allowed.device
            )
            self.allowed = torch.cat([self.allowed, extra])
            self.num_tasks = num_tasks
