"""The routing context: side inputs (task ids, the attention mask, the model-wide gate) reach every adapted layer
through forward pre-hooks that are installed for one call and always removed. No globals.

Example:
    >>> with loramix.routing(model, task_ids=batch["task_ids"]) as state:
    ...     out = model(**inputs)
    >>> state.records  # [(layer or "model", Gate), ...] for the losses
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from loramix.errors import RoutingError
from loramix.routers.base import Gate


@dataclass
class RoutingState:
    """What one forward pass needs to route, and what its routers decided."""

    task_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    model_gate: Gate | None = None
    record: bool = True
    keep_model_gate: bool = False  # generation: the sample router decides on the prompt, later steps reuse it
    records: list[tuple[str, Gate]] = field(default_factory=list)

    def add(self, name: str, gate: Gate) -> None:
        if self.record:
            self.records.append((name, gate))

    def gates(self) -> list[Gate]:
        return [gate for _, gate in self.records]


def _pass_state(state: RoutingState, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs["routing"] = state
    return args, kwargs


def masked_mean(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over tokens `(n, t, d) -> (n, d)`, counting only positions where `mask` is non-zero.

    An image batch `(n, c, h, w)` (a CNN's input or a conv layer's output) is channels-first: mean over space.
    """
    if hidden.dim() == 2:
        return hidden
    if hidden.dim() > 3:
        return hidden.flatten(2).mean(-1)  # (n, c)
    if mask is None:
        return hidden.mean(1)
    if mask.shape != hidden.shape[:2]:
        raise RoutingError(
            f"attention_mask has shape {tuple(mask.shape)} but the router's input has (batch, tokens) = "
            f"{tuple(hidden.shape[:2])}"
        )
    weights = mask.to(hidden.dtype)[..., None]  # (n, t, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _run_sample_router(
    state: RoutingState, router: nn.Module, module: nn.Module, args: tuple, kwargs: dict, output: Any
) -> None:
    if state.keep_model_gate and state.model_gate is not None:
        return
    hidden = output[0] if isinstance(output, tuple) else output
    state.model_gate = router(hidden=masked_mean(hidden, state.attention_mask))
    state.add("model", state.model_gate)


def _run_sample_router_on_input(
    state: RoutingState, router: nn.Module, module: nn.Module, args: tuple, kwargs: dict
) -> None:
    hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
    if not torch.is_floating_point(hidden):
        raise RoutingError(
            "the sample router pools the model's input, but it is not a float tensor; set router_input to the "
            "name of a module (e.g. the embeddings) whose output it should pool"
        )
    state.model_gate = router(hidden=masked_mean(hidden, state.attention_mask))
    state.add("model", state.model_gate)


def check_task_ids(task_ids: Tensor, num_tasks: int) -> Tensor:
    """Task ids must be a 1-d integer tensor inside 0..num_tasks-1 (checked where it costs no device sync)."""
    if not isinstance(task_ids, Tensor):
        task_ids = torch.as_tensor(task_ids)
    if task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise RoutingError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.dim() != 1:
        raise RoutingError(f"task_ids must have shape (batch,), got {tuple(task_ids.shape)}")
    if task_ids.device.type == "cpu" and task_ids.numel():
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < 0 or high >= num_tasks:
            raise RoutingError(f"task_ids must lie in 0..{num_tasks - 1}, got values from {low} to {high}")
    return task_ids.long()


@contextmanager
def routing(
    model: nn.Module,
    *,
    task_ids: Tensor | list[int] | None = None,
    attention_mask: Tensor | None = None,
    record: bool = True,
) -> Iterator[RoutingState]:
    """Route every forward pass of `model` inside the block by these side inputs.

    `task_ids` `(n,)` is required when the model routes by task (routers 'task' and 'poly'); `attention_mask`
    `(n, t)` lets the sample router pool only real tokens. The hooks are removed when the block ends, even on error.
    """
    from loramix.inject import get_info  # local: inject imports this module

    info = get_info(model)
    config = info.config
    if config.router in ("task", "poly"):
        if task_ids is None:
            raise RoutingError(
                f"this model routes by task (router '{config.router}') but no task_ids were given: "
                "use loramix.routing(model, task_ids=...) or pass task_ids= to the wrapped model"
            )
        assert config.num_tasks is not None
        task_ids = check_task_ids(task_ids, config.num_tasks)
        device = info.layers[0].experts.A.device
        task_ids = task_ids.to(device, non_blocking=True)
    elif task_ids is not None:
        task_ids = torch.as_tensor(task_ids).long()
    state = RoutingState(task_ids=task_ids, attention_mask=attention_mask, record=record)  # type: ignore[arg-type]
    handles = []
    router = info.model_router
    try:
        if router is not None and router.needs_task_ids:
            state.model_gate = router(task_ids=task_ids)
            state.add("model", state.model_gate)
        elif router is not None:
            source = info.router_source(model)
            if source is None:
                handles.append(
                    model.register_forward_pre_hook(
                        partial(_run_sample_router_on_input, state, router), with_kwargs=True
                    )
                )
            else:
                handles.append(
                    source.register_forward_hook(partial(_run_sample_router, state, router), with_kwargs=True)
                )
        for layer in info.layers:
            handles.append(layer.register_forward_pre_hook(partial(_pass_state, state), with_kwargs=True))
        yield state
    finally:
        for handle in handles:
            handle.remove()
