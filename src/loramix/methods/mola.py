"""The multi-task methods that differ only in their adapters and losses: one LoRA, a wide LoRA, per-task LoRAs,
MoLA-Grad, MoLA-Router (with the TwD loss) and a per-token router.

MoLA: Zhou et al., "MoLA: Mixture of LoRA experts for heterogeneous multi-task learning", ICML 2024.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from loramix.config import AdapterConfig
from loramix.context import RoutingState
from loramix.errors import ConfigError, TrainingError
from loramix.losses import TwDProjection, twd_loss
from loramix.methods.base import Method, register_method
from loramix.train.aux_losses import AuxLoss, LoadBalance, ZLoss, learned_gates
from loramix.train.config import RunConfig


def common(run: RunConfig) -> dict[str, Any]:
    return {
        "rank": run.rank,
        "alpha": run.alpha,
        "dropout": run.dropout,
        "targets": run.targets,
        "layers_to_transform": run.layers_to_transform,
        "train_backbone": run.train_backbone,
    }


def sharing(run: RunConfig) -> dict[str, Any]:
    return {"share": run.share, "shared_dropout": run.shared_dropout}


def balance_and_z(run: RunConfig, default_balance: float = 0.0, z: bool = True) -> list[AuxLoss]:
    balance = run.balance_weight if run.balance_weight is not None else default_balance
    return [LoadBalance(balance), ZLoss(run.z_loss_weight if z else 0.0)]


@register_method
class Lora(Method):
    name = "lora"
    description = "one LoRA for every task (Hu et al. 2021)"

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        return AdapterConfig(num_experts=1, router="none", **common(run))

    def aux_losses(self, run: RunConfig, adapters: AdapterConfig) -> list[AuxLoss]:
        return balance_and_z(run, z=False)


@register_method
class LoraWide(Lora):
    name = "lora-wide"
    description = "one LoRA of rank E*r: the mixture's parameter count in one adapter"

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        experts = run.num_experts or num_tasks
        settings = {**common(run), "rank": run.rank * experts, "alpha": run.alpha * experts}
        return AdapterConfig(num_experts=1, router="none", **settings)


@register_method
class PerTaskLora(Lora):
    name = "per-task-lora"
    description = "one LoRA per task on the frozen base, trained in one run"

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        if run.train_backbone:
            raise ConfigError(
                "per-task-lora shares nothing but the frozen base: train_backbone must be false"
            )

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        return AdapterConfig(num_experts=num_tasks, router="task", num_tasks=num_tasks, **common(run))


@register_method
class MolaGrad(Lora):
    name = "mola-grad"
    description = "one expert per task (or task_to_expert), hard routing by task id (MoLA-Grad)"

    def validate(self, run: RunConfig) -> None:  # task_to_expert is this method's
        if run.num_experts is not None and run.task_to_expert is None and run.num_experts != len(run.tasks):
            raise ConfigError(
                f"num_experts: mola-grad gives each of the {len(run.tasks)} tasks its own expert; to share "
                f"{run.num_experts} experts among them set task_to_expert (one expert index per task)"
            )
        self.check_sequence_and_adapters(run)

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        experts = run.num_experts or num_tasks
        return AdapterConfig(
            num_experts=experts if run.task_to_expert else num_tasks,
            router="task",
            num_tasks=num_tasks,
            task_to_expert=run.task_to_expert,
            **common(run),
            **sharing(run),
        )


class TwD(nn.Module):
    """MoLA's Task-wise Decorrelation on the model-wide router's output (Zhou et al. 2024, Sec. 3.3), with its
    optional trainable projection; its parameters are the method's own. `space` says what it compares: the gate
    probabilities (the default: tasks pushed apart must take different experts) or the logits, as MoLA's code."""

    loramix_role = "method"
    name = "twd"

    def __init__(
        self,
        weight: float,
        num_experts: int,
        projection: bool,
        *,
        space: Literal["gates", "logits"] = "logits",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.weight, self.space, self.temperature = weight, space, temperature
        self.projection = TwDProjection(num_experts) if projection and weight > 0 else None

    def forward(self, state: RoutingState, batch: dict[str, Any]) -> Tensor | None:
        gates = learned_gates(state)
        if not gates:
            return None
        if batch.get("task_ids") is None:
            raise TrainingError(
                "TwD compares the router's outputs between tasks: each sample's task id is needed (a 'task_ids' "
                "column in the batch), also where the router itself reads none"
            )
        gate = gates[0] if state.model_gate is None else state.model_gate
        return twd_loss(
            gate.logits,  # type: ignore[arg-type]
            batch["task_ids"],
            projection=self.projection,
            tau=self.temperature,
            space=self.space,
        )


@register_method
class MolaRouter(Method):
    name = "mola-router"
    description = "E experts, one learned router on the pooled input, plus the TwD loss (MoLA-Router)"

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        if run.twd_projection and run.twd_space == "gates":
            raise ConfigError(
                "twd_projection: a projection would mix the gate probabilities and lose what twd_space 'gates' "
                "is for (tasks on disjoint experts); set twd_space: logits to use it, or twd_projection: false"
            )

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        experts = run.num_experts or num_tasks
        return AdapterConfig(
            num_experts=experts,
            router="sample",
            top_k=run.top_k,
            router_input=run.router_input,
            **common(run),
            **sharing(run),
        )

    def aux_losses(self, run: RunConfig, adapters: AdapterConfig) -> list[AuxLoss]:
        twd = TwD(
            run.twd_weight,
            adapters.num_experts,
            run.twd_projection,
            space=run.twd_space,
            temperature=run.twd_temperature,
        )
        return [twd, *balance_and_z(run)]


@register_method
class TokenRouter(Method):
    name = "token-router"
    description = "a linear top-k router per layer and token, with load balance (MixLoRA style)"

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        experts = run.num_experts or num_tasks
        return AdapterConfig(
            num_experts=experts,
            router="token",
            top_k=run.top_k or min(2, experts),
            **common(run),
            **sharing(run),
        )

    def aux_losses(self, run: RunConfig, adapters: AdapterConfig) -> list[AuxLoss]:
        return balance_and_z(run, default_balance=0.01)
