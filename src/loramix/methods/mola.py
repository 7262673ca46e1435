"""The multi-task methods as adapter configurations: one LoRA, a wide LoRA, per-task LoRAs, MoLA-Grad,
MoLA-Router (with TwD) and a per-token router.

MoLA: Zhou et al., "MoLA: Mixture of LoRA experts for heterogeneous multi-task learning", ICML 2024.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loramix.config import AdapterConfig

if TYPE_CHECKING:  # a run-time import would be circular: loramix.train's loop imports this module
    from loramix.train.config import RunConfig


def adapter_config(run: RunConfig, num_tasks: int) -> AdapterConfig:
    """The adapters `run.method` injects into the backbone."""
    experts = run.num_experts or num_tasks
    common = {
        "rank": run.rank,
        "alpha": run.alpha,
        "dropout": run.dropout,
        "targets": run.targets,
        "train_backbone": run.train_backbone,
    }
    method = run.method
    if method in ("lora", "elrea"):  # elrea starts from one base adapter; its experts come later
        return AdapterConfig(num_experts=1, router="none", **common)
    if method == "lora-wide":  # the parameter count of the mixture in one adapter
        common.update(rank=run.rank * experts, alpha=run.alpha * experts)
        return AdapterConfig(num_experts=1, router="none", **common)
    sharing = {"share": run.share, "shared_dropout": run.shared_dropout}
    if method == "per-task-lora":
        return AdapterConfig(num_experts=num_tasks, router="task", num_tasks=num_tasks, **common)
    if method == "mola-grad":
        return AdapterConfig(
            num_experts=experts if run.task_to_expert else num_tasks,
            router="task",
            num_tasks=num_tasks,
            task_to_expert=run.task_to_expert,
            **common,
            **sharing,
        )
    if method == "mola-router":
        return AdapterConfig(num_experts=experts, router="sample", top_k=run.top_k, **common, **sharing)
    if method == "token-router":
        return AdapterConfig(
            num_experts=experts, router="token", top_k=run.top_k or min(2, experts), **common, **sharing
        )
    raise ValueError(f"unknown method {method!r}")


def loss_weights(run: RunConfig) -> dict[str, float]:
    """Weights of the auxiliary losses for this run (0 means not computed)."""
    default_balance = 0.01 if run.method == "token-router" else 0.0
    return {
        "twd": run.twd_weight if run.method == "mola-router" else 0.0,
        "balance": run.balance_weight if run.balance_weight is not None else default_balance,
        "z": run.z_loss_weight if run.method in ("mola-router", "token-router") else 0.0,
    }
