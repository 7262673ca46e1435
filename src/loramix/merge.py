"""Merging: the gate a layer uses for one task (or a fixed mixture of its experts), and that gate baked into the
base layers, everything loramix added dropped (PEFT's `merge_and_unload`)."""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch
from torch import nn

from loramix.errors import InjectionError
from loramix.experts import AdaptedLayer
from loramix.inject import get_info, unwrap


def fixed_gate(
    model: nn.Module,
    layer: AdaptedLayer,
    *,
    task: int | None,
    gate: torch.Tensor | Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """The `(e,)` gate a layer uses for one task (or the given fixed mixture), for merging and export.

    `gate` is one mixture for every layer, or `{layer name: mixture}` for routers that choose per layer (a mean of
    per-layer gates is per layer too); a mapping must name every adapted layer."""
    info = get_info(model)
    config = info.config
    if isinstance(gate, Mapping):
        if layer.layer_name not in gate:
            raise InjectionError(
                f"gate is a per-layer mapping but has no entry for layer '{layer.layer_name}'; give one mixture "
                f"per adapted layer (loramix.get_info(model).names lists them), or one mixture for all"
            )
        where = f" for layer '{layer.layer_name}'"
        gate = gate[layer.layer_name]
    else:
        where = ""
    if gate is not None:
        gate = torch.as_tensor(gate, dtype=torch.float32).flatten()
        if gate.numel() != config.num_experts:
            raise InjectionError(
                f"gate{where} has {gate.numel()} entries but the model has {config.num_experts} experts"
            )
        if not torch.isfinite(gate).all():
            raise InjectionError(f"gate{where} holds a value that is not a finite number: {gate.tolist()}")
        return gate
    if info.router_class.scope is None:
        return torch.ones(1)
    router = info.model_router or layer.router
    assert router is not None
    num_tasks = config.num_tasks
    if task is not None and not isinstance(task, bool):
        try:
            task = operator.index(task)  # an int or a numpy integer; not 1.5 or "2"
        except TypeError:
            pass
    if num_tasks is not None and (
        not isinstance(task, int) or isinstance(task, bool) or not 0 <= task < num_tasks
    ):
        raise InjectionError(f"task must be an integer in 0..{num_tasks - 1}, got {task!r}")
    fixed = router.task_gate(task) if task is not None else None
    if fixed is None:
        raise InjectionError(
            f"router '{config.router}' decides per input: pass gate=[...] (one weight per expert) to fix a mixture, "
            "e.g. the task's mean gate over its inputs from loramix.io.export.mean_gate(model, inputs, task=...)"
        )
    return fixed.detach().float()


def check_task_or_gate(task: object, gate: object) -> None:
    """A fixed gate is asked for by a task or given as the mixture itself; both at once is ambiguous."""
    if task is not None and gate is not None:
        raise InjectionError(
            "pass task or gate, not both: a gate is the mixture itself, a task names its own"
        )


def merge_and_unload(
    model: nn.Module, *, task: int | None = None, gate: torch.Tensor | None = None
) -> nn.Module:
    """Bake one task's expert (or a fixed mixture) into plain layers and drop everything loramix added.

    Example:
        >>> plain = loramix.merge_and_unload(model, task=2)  # the model now runs task 2 with no routing
    """
    info = get_info(model)
    check_task_or_gate(task, gate)
    # every layer's gate and mergeability first: a refusal leaves no layer merged
    gates = [fixed_gate(model, layer, task=task, gate=gate) for layer in info.layers]
    for layer in info.layers:
        layer._check_mergeable()
    merged = []
    try:
        for layer, fixed in zip(info.layers, gates):
            layer.unmerge()
            layer.merge(fixed)
            merged.append(layer)
    except Exception:  # a layer that cannot merge (its base has no weight to fold into): undo the others
        for layer in merged:
            layer.unmerge()
        raise
    return unwrap(model)
