"""Continual MoLA-Grad: one LoRA expert per task, added when its task arrives (:func:`loramix.grow`), trained on
that task alone and frozen after; at inference the auto-selector (DDAS) picks each input's expert, or the untouched
base model when the input is unfamiliar. Task gradients never meet, and a later task cannot move an earlier one's
expert: forgetting comes only from the selector's mistakes. With `expert_init: previous` a new expert starts as a
copy of the previous task's, so what the sequence learned carries forward (the earlier experts stay frozen)."""

from __future__ import annotations

from loramix.config import AdapterConfig
from loramix.growth import grow
from loramix.inject import get_info
from loramix.methods.base import register_method
from loramix.methods.continual.learner import Learner
from loramix.methods.continual.sequence import Continual
from loramix.methods.mola import common
from loramix.train.config import RunConfig


@register_method
class ContinualMolaGrad(Continual):
    name = "continual-mola-grad"
    description = "one LoRA expert per task, trained when it arrives and frozen after; DDAS picks the expert"
    uses_selector = True
    blends_experts = True

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        return AdapterConfig(num_experts=1, router="task", num_tasks=1, **common(run))

    def begin_task(self, learner: Learner, task: int) -> None:
        info = get_info(learner.backbone)
        if task >= info.config.num_experts:
            grow(learner.backbone, num_experts=task + 1, num_tasks=task + 1)
        for layer in info.layers:
            if task:
                layer.experts.freeze_experts(list(range(task)))
                if learner.run.expert_init == "previous":
                    layer.experts.copy_expert(task - 1, task)

    def end_task(self, learner: Learner, task: int) -> None:
        super().end_task(learner, task)
        learner.records["frozen"][str(task)] = list(range(task + 1))  # its expert never trains again


@register_method
class ContinualMolaGradTaskId(ContinualMolaGrad):
    name = "continual-mola-grad-task-id"
    description = (
        "continual-mola-grad routed by the true task id instead of DDAS (tasks not learned yet: the base)"
    )
    uses_selector = False
