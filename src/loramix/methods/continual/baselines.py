"""The references a continual method is judged against, run by the same schedule: the zero-shot base (no
training), one LoRA fine-tuned through the whole sequence (the forgetting reference), and LAE.

LAE (Gao et al., "A unified continual learning framework with general parameter-efficient tuning", ICCV 2023): an
online adapter trained on each new task in turn, and an offline adapter that is its exponential moving average
(decay `lae_decay`, per optimizer step); the prediction is the element-wise maximum of the two softmaxes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from loramix.config import AdapterConfig
from loramix.data import MultiTaskData
from loramix.growth import grow
from loramix.inject import get_info
from loramix.methods.base import register_method
from loramix.methods.continual.decided import Decided, from_probabilities
from loramix.methods.continual.learner import Learner
from loramix.methods.continual.sequence import Continual
from loramix.methods.mola import common
from loramix.train.callbacks import Callback
from loramix.train.config import RunConfig
from loramix.train.model import MultiTaskModel
from loramix.train.step import routed


class EverythingAdapted(Continual):
    """Inputs and class texts all go through the adapters, learned tasks or not (no selector, no base)."""

    base_for_unlearned = False


@register_method
class SequentialLora(EverythingAdapted):
    name = "sequential-lora"
    description = "one LoRA fine-tuned on each task in turn (the forgetting reference)"

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        return AdapterConfig(num_experts=1, router="none", **common(run))


@register_method
class ZeroShot(SequentialLora):
    name = "zero-shot"
    description = "the base model, never trained: every task answered from its label names"

    def train_task(self, learner: Learner, task: int | None, output_dir: Any, resume: bool) -> list:
        return []  # nothing trains: each row of the matrix is the base model's


class OfflineEma(Callback):
    """After every optimizer step: offline = decay * offline + (1 - decay) * online (experts 1 and 0)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    @torch.no_grad()
    def on_step_end(self, trainer: Any, logs: dict[str, Any]) -> None:
        for layer in get_info(trainer.accelerator.unwrap_model(trainer.model).backbone).layers:
            for param in (layer.experts.A, layer.experts.B):
                param[1].mul_(self.decay).add_(param[0], alpha=1 - self.decay)


@register_method
class Lae(EverythingAdapted):
    name = "lae"
    description = (
        "an online LoRA and its EMA offline copy; the prediction is the max of their softmaxes (LAE)"
    )

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        # two experts routed by task id: every task to expert 0 (online) in training, to 1 (offline) for its pass
        return AdapterConfig(
            num_experts=2, router="task", num_tasks=num_tasks, task_to_expert=[0] * num_tasks, **common(run)
        )

    def continued(self, run: RunConfig, data: MultiTaskData) -> Learner:
        """The finished run with a slot for each new task, routed to the online adapter as every task is."""
        learner = super().continued(run, data)
        total = learner.offset + data.num_tasks
        grow(learner.backbone, num_tasks=total, task_to_expert=[0] * total)
        return learner

    def begin_task(self, learner: Learner, task: int) -> None:
        if task == 0:  # the offline adapter starts as the online one
            with torch.no_grad():
                for layer in get_info(learner.backbone).layers:
                    layer.experts.A[1].copy_(layer.experts.A[0])
                    layer.experts.B[1].copy_(layer.experts.B[0])

    def task_callbacks(self, learner: Learner, task: int | None) -> list[Callback]:
        return [OfflineEma(learner.run.lae_decay)]

    def gate_note(self, model: MultiTaskModel, task: int) -> str:
        return (
            "the online adapter alone (expert 0): LAE predicts with the element-wise max of the online and the "
            "offline (EMA) adapters' softmaxes, which no single LoRA computes; not exact"
        )

    def predict(self, learner: Learner, batch: dict[str, Tensor], route: Tensor, keep: Tensor) -> Decided:
        """`argmax max(softmax(online), softmax(offline))` within each sample's task, and that maximum (the surer
        adapter's probability of the class)."""
        router = get_info(learner.backbone).model_router
        assert router is not None
        mapping = router.task_to_expert.clone()
        heads, probs = learner.model.heads, []
        try:
            for expert in (0, 1):
                router.task_to_expert.fill_(expert)
                with routed(learner.model, batch):
                    logits = learner.model(batch)  # (n, L), -inf outside the task
                probs.append(torch.softmax(logits.float(), -1))
        finally:
            router.task_to_expert.copy_(mapping)
        return from_probabilities(heads, torch.maximum(*probs), batch["task_ids"])
