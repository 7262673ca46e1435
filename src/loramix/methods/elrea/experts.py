"""The ELREA expert bank: expert 0 is the base adapter, experts 1..C start as copies of it (Li et al. 2025, Sec. 3.3).

The bank is one loramix model injected with `{"num_experts": C + 1, "router": "task", "num_tasks": C + 1}` and the
same targets, rank and alpha as the base adapter. Cluster c trains expert c + 1 (task id = cluster label + 1);
hard routing keeps the experts' gradients apart, and the frozen base stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from loramix.errors import CheckpointError
from loramix.inject import get_info


def cluster_task_ids(labels: Tensor) -> Tensor:
    """Task id (= expert) of each training example: cluster c trains expert c + 1, expert 0 is the base."""
    return labels.long() + 1


@torch.no_grad()
def init_experts_from_base(
    model: nn.Module, base_state: Mapping[str, Tensor], *, freeze_base: bool = True
) -> None:
    """Copy a one-expert base adapter into every expert of `model`'s bank; optionally freeze expert 0.

    `base_state` maps the base model's parameter names to its `(1, r, i)` / `(1, o, r)` adapter tensors, e.g.
    `loramix.adapter_state(base_model)`; the names must match the bank model's (same targets).

    Example:
        >>> loramix.inject(bank_model, {"num_experts": C + 1, "rank": 8, "router": "task", "num_tasks": C + 1})
        >>> init_experts_from_base(bank_model, loramix.adapter_state(base_model))
    """
    info = get_info(model)
    named = dict(model.named_parameters())
    for layer_name, layer in zip(info.names, info.layers):
        layer.experts.unfreeze_experts()  # a re-initialisation must also refresh a frozen copy
        for matrix in ("A", "B"):
            name = f"{layer_name}.experts.{matrix}"
            source = base_state.get(name)
            if source is None:
                raise CheckpointError(
                    f"the base adapter has no tensor '{name}': inject both with the same targets"
                )
            target = named[name]
            if source.shape[0] != 1 or source.shape[1:] != target.shape[1:]:
                raise CheckpointError(
                    f"'{name}': the base adapter's tensor has shape {tuple(source.shape)}, the bank expects "
                    f"(1, {', '.join(map(str, target.shape[1:]))}): use the same rank and targets"
                )
            target.copy_(source.to(target).expand_as(target))
        if freeze_base:
            layer.experts.freeze_experts([0])
