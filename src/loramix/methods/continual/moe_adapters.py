"""MoE-Adapters for continual learning (Yu et al., "Boosting continual learning of vision-language models via
mixture-of-experts adapters", CVPR 2024), on a text encoder, and its true-task-id variant.

- Experts: bottleneck adapters (width `adapter_width`, 64; scale 0.1; up-projection zero-initialised),
  `moe_experts` (22) in every transformer block, on the block's MLP: around its output projection by default
  (`...layer.N.output.dense` in BERT-style encoders, whose post-LayerNorm blocks leave no seam beside the whole MLP;
  `mlp.c_proj` / `mlp.down_proj` / `mlp.fc2` elsewhere), or wherever `targets` says.
- Routing: one router per task in every block (`router: per-task`), noisy top-2 on the first token, zero-initialised;
  while task t trains only task t's routers run, and the older ones are frozen (bit-identical from then on).
- Activate-freeze: while task t trains, each block counts how often each expert is chosen; after task t the
  `moe_freeze` (2) most chosen experts of each block are frozen, and the frozen set only grows.
- DDAS: after task t a model of task t's inputs (a Gaussian by default; the paper's autoencoder with
  `ddas_normalize: whiten`) is fitted on the base model's features of its training inputs; at inference it routes
  each input to a learned task's routers or to the untouched base model (see :mod:`loramix.routers.selector`). The `-task-id` variant routes by the true task id instead, which separates
  routing errors from forgetting.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from loramix.config import AdapterConfig
from loramix.errors import ConfigError
from loramix.growth import grow
from loramix.inject import get_info
from loramix.methods.base import register_method
from loramix.methods.continual.learner import Learner
from loramix.methods.continual.sequence import Continual
from loramix.routers import PerTaskRouter
from loramix.train.callbacks import Callback
from loramix.train.config import RunConfig
from loramix.train.loop import processes, sum_over_processes

MLP_OUTPUTS = r"(.*\.)?(layer\.\d+\.output\.dense|mlp\.c_proj|mlp\.down_proj|mlp\.fc2)"


class ExpertUse(Callback):
    """Counts, per adapted layer, how often each expert is among a sample's chosen experts, over the batches of
    every training process (so that all of them freeze the same experts)."""

    def __init__(self) -> None:
        self.counts: dict[str, Tensor] = {}

    def on_batch_end(self, trainer: Any, batch: dict[str, Any], result: Any) -> None:
        gates = [
            (name, gate)
            for name, gate in result.state.records
            if gate.indices is not None and name != "model"
        ]
        if not gates:
            return
        chosen = [torch.bincount(g.indices.flatten(), minlength=g.weights.shape[-1]) for _, g in gates]
        total = sum_over_processes(torch.cat(chosen)).cpu()  # one transfer and one collective a batch
        for (name, _), counts in zip(gates, total.split([len(c) for c in chosen])):
            self.counts[name] = self.counts.get(name, torch.zeros_like(counts)) + counts

    def state_dict(self) -> dict[str, Any]:
        return {name: counts.tolist() for name, counts in self.counts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {name: torch.tensor(counts) for name, counts in state.items()}


@register_method
class MoEAdapters(Continual):
    name = "moe-adapters"
    description = "experts added to a frozen encoder task by task, most-used frozen, per-task routers, DDAS"
    uses_selector = True

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        where: dict[str, Any] = (
            {"target_regex": MLP_OUTPUTS, "targets": "all-linear"}
            if run.targets == "all-linear"
            else {"targets": run.targets}
        )
        return AdapterConfig(
            experts="adapter",
            rank=run.adapter_width,
            adapter_scale=0.1,
            num_experts=run.moe_experts,
            router="per-task",
            num_tasks=self.initial_tasks(num_tasks),
            top_k=run.top_k or 2,
            noisy=True,
            dropout=run.dropout,
            layers_to_transform=run.layers_to_transform,
            **where,
        )

    def initial_tasks(self, num_tasks: int) -> int:
        return 1  # a router per task is added as its task arrives

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        if run.moe_freeze > run.moe_experts:
            raise ConfigError(
                f"moe_freeze: {run.moe_freeze} experts frozen per block after each task, of moe_experts="
                f"{run.moe_experts}; freeze at most as many as there are"
            )

    def begin_task(self, learner: Learner, task: int) -> None:
        info = get_info(learner.backbone)
        if task >= (info.config.num_tasks or 0):
            grow(learner.backbone, num_tasks=task + 1)
        for layer in info.layers:  # the older routers never change again
            assert isinstance(layer.router, PerTaskRouter)
            if task:
                layer.router.freeze_tasks(list(range(task)))
            if not learner.run.moe_route_frozen:
                keep_to_training_experts(layer.router, task, layer.experts.frozen_experts, info.config.top_k)
        every = [
            n
            for n, layer in zip(info.names, info.layers)
            if len(layer.experts.frozen_experts) == layer.experts.num_experts
        ]
        if every and processes().is_main_process:
            print(
                f"loramix: warning: task {task + 1} ({learner.data.task_names[task - learner.offset]}): every expert "
                f"of {len(every)} block(s) is frozen (moe_freeze {learner.run.moe_freeze} per task), so it trains "
                "its routers only there",
                file=sys.stderr,
            )
        self.use = ExpertUse()

    def task_callbacks(self, learner: Learner, task: int | None) -> list[Callback]:
        return [self.use] if task is not None else []

    def end_task(self, learner: Learner, task: int) -> None:
        info = get_info(learner.backbone)
        frozen, use = {}, {}
        for name, layer in zip(info.names, info.layers):
            counts = self.use.counts.get(name, torch.zeros(layer.experts.num_experts, dtype=torch.long))
            top = counts.argsort(descending=True, stable=True)[: learner.run.moe_freeze].tolist()
            if top:
                layer.experts.freeze_experts(top)
            frozen[name], use[name] = sorted(layer.experts.frozen_experts), counts.tolist()  # all so far
        learner.records["frozen"][str(task)] = frozen
        learner.records["expert_use"][str(task)] = use
        super().end_task(learner, task)


@torch.no_grad()
def keep_to_training_experts(router: PerTaskRouter, task: int, frozen: list[int], top_k: int | None) -> None:
    """Task `task`'s router chooses among the experts not frozen yet, while at least `top_k` of them are left (else
    among all); the older tasks' choices are untouched."""
    if frozen and router.num_experts - len(frozen) >= (top_k or 1):
        router.allowed[task] = True
        router.allowed[task, frozen] = False


@register_method
class MoEAdaptersTaskId(MoEAdapters):
    name = "moe-adapters-task-id"
    description = "moe-adapters routed by the true task id instead of DDAS (tasks not learned yet: the base)"
    uses_selector = False


@register_method
class JointMoEAdapters(MoEAdapters):
    name = "joint"
    description = (
        "the moe-adapters experts trained on all tasks at once, as many steps as the sequence (upper bound)"
    )
    uses_selector = False
    per_task_steps = False

    def initial_tasks(self, num_tasks: int) -> int:
        return num_tasks

    def train_task(self, learner: Learner, task: int | None, output_dir: Any, resume: bool) -> list:
        learner.learned = [True] * learner.data.num_tasks
        self.mark_learned(learner)
        return super().train_task(learner, task, output_dir, resume)
