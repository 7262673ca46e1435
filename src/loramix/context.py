"""The routing context: side inputs (task ids, the attention mask, the model-wide gate) reach every adapted layer
through the model's list of open routing blocks, which each layer reads (the innermost wins), and through forward
hooks (the call's own mask, the model-wide router) installed for one block and always removed. No globals.

Example:
    >>> with loramix.routing(model, task_ids=batch["task_ids"]) as state:
    ...     out = model(**inputs)
    >>> state.records  # [(layer or "model", Gate), ...] for the losses
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from loramix.errors import RoutingError
from loramix.inject import get_info
from loramix.recompute import route_checkpoints
from loramix.routers.state import RoutingState


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


def _mask_from_call(state: RoutingState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a block opened without `attention_mask`: the model call's own `attention_mask` keyword,
    so that a sample router pools real tokens only, as with `routing(model, attention_mask=...)`."""
    mask = kwargs.get("attention_mask")
    state.attention_mask = mask if isinstance(mask, Tensor) else None
    state.mask_from_forward = True


def _pooling_mask(state: RoutingState, hidden: Tensor) -> Tensor | None:
    """The mask a model-wide router pools `hidden` with: the block's, or the call's own where it fits the router's
    input (a generation step's cached call passes the whole sequence's mask for one new token: no mask then)."""
    mask = state.attention_mask
    if state.mask_from_forward and mask is not None and (hidden.dim() != 3 or mask.shape != hidden.shape[:2]):
        return None
    return mask


def _set_model_gate(state: RoutingState, router: nn.Module, hidden: Tensor | None) -> None:
    state.model_gate = router(state, hidden).keep_base(state.keep_base)
    state.add("model", state.model_gate)


def reroute(
    model: nn.Module,
    state: RoutingState,
    task_ids: Tensor,
    keep_base: Tensor,
    attention_mask: Tensor | None = None,
    task_weights: Tensor | None = None,
) -> None:
    """Change the routes of an open routing block in the middle of a pass (an auto-selector that reads the states
    of blocks that hold no adapted layer): the task ids and keep-base mask, and the mask where given (the pass
    may go on with other rows than it began with), and the weights over the tasks (see :func:`routing`). A
    model-wide router that reads no input decides its gate again from them; one that reads the input has decided
    already and cannot be rerouted."""
    router = get_info(model).model_router
    if router is not None and router.pools_model_input:
        raise RoutingError(
            "a model-wide router that reads the model's input cannot be rerouted during the pass"
        )
    state.task_ids, state.keep_base, state.one_task = task_ids, keep_base, single_task(task_ids)
    state.task_weights = (
        None if task_weights is None else check_task_weights(model, task_weights, len(task_ids))
    )
    if attention_mask is not None:
        state.attention_mask = attention_mask
    if router is not None:
        _set_model_gate(state, router, None)


def _decides(state: RoutingState, active: list[RoutingState]) -> bool:
    """Whether this block's model-wide router runs now: its block is the innermost open one, and no gate is kept
    from an earlier step (generation decides on the prompt)."""
    return (
        bool(active) and active[-1] is state and not (state.keep_model_gate and state.model_gate is not None)
    )


def _run_router_on_output(
    state: RoutingState,
    active: list[RoutingState],
    router: nn.Module,
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    output: Any,
) -> None:
    if not _decides(state, active):
        return
    hidden = output[0] if isinstance(output, tuple) else output
    _set_model_gate(state, router, masked_mean(hidden, _pooling_mask(state, hidden)))


def _run_router_on_input(
    state: RoutingState,
    active: list[RoutingState],
    router: nn.Module,
    module: nn.Module,
    args: tuple,
    kwargs: dict,
) -> None:
    if not _decides(state, active):
        return
    hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
    if not torch.is_floating_point(hidden):
        raise RoutingError(
            "the sample router pools the model's input, but it is not a float tensor; set router_input to the "
            "name of a module (e.g. the embeddings) whose output it should pool"
        )
    _set_model_gate(state, router, masked_mean(hidden, _pooling_mask(state, hidden)))


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_output_layer(model: nn.Module) -> Any | None:
    """A hook that hands the output layer of a language model a contiguous input; its handle, or None.

    Generation computes the first step's logits on the last position alone, `hidden[:, -1:]`, a view that
    `torch.matmul` cannot fold into one matrix; with a frozen weight (every adapted model's) it then runs a batched
    matmul over a broadcast weight, which reads the whole vocabulary matrix once per row. Measured on GPT-2 small
    (vocab 50257), 16 rows, one CPU thread: 298 ms against 69 ms for the copy and one matmul.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    layer = get_output() if callable(get_output) else None
    return layer.register_forward_pre_hook(_contiguous_input) if isinstance(layer, nn.Linear) else None


def host_range(task_ids: Tensor) -> tuple[int, int] | None:
    """`(lowest, highest)` of task ids on the CPU; None for none, or for ids on an accelerator (reading them would
    wait for the device)."""
    if task_ids.device.type != "cpu" or not task_ids.numel():
        return None
    low, high = task_ids.aminmax()
    return int(low), int(high)


def single_task(task_ids: Tensor) -> int | None:
    """The one task id of a batch whose ids are all equal and on the CPU; None otherwise."""
    return _only(host_range(task_ids))


def _only(span: tuple[int, int] | None) -> int | None:
    return span[0] if span is not None and span[0] == span[1] else None


def check_task_ids(task_ids: Tensor, num_tasks: int) -> tuple[Tensor, int | None]:
    """Task ids must be a 1-d integer tensor inside 0..num_tasks-1 (checked where it costs no device sync); returns
    them as long, and the batch's one task where its ids are one and on the CPU (:func:`single_task`)."""
    if not isinstance(task_ids, Tensor):
        task_ids = torch.as_tensor(task_ids)
    if task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise RoutingError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.dim() != 1:
        raise RoutingError(f"task_ids must have shape (batch,), got {tuple(task_ids.shape)}")
    span = host_range(task_ids)
    if span is not None and (span[0] < 0 or span[1] >= num_tasks):
        raise RoutingError(f"task_ids must lie in 0..{num_tasks - 1}, got values from {span[0]} to {span[1]}")
    return task_ids.long(), _only(span)


def check_task_weights(model: nn.Module, weights: Tensor, batch: int) -> Tensor:
    """Weights over the tasks `(n, T')` need a model routed by task id alone (router 'task'), one row per sample and
    at most its T tasks (the tasks after the first T' weigh nothing); returned `(n, T)` on the experts' device."""
    info = get_info(model)
    if info.router_class.kind != "task":
        raise RoutingError(
            f"task_weights mix the experts of tasks routed by id (router 'task'); this model's router is "
            f"'{info.config.router}'"
        )
    tasks = int(info.config.num_tasks or 0)
    if not isinstance(weights, Tensor) or not weights.is_floating_point() or weights.dim() != 2:
        raise RoutingError(f"task_weights must be a 2-d float tensor, got {weights!r:.80}")
    if weights.shape[0] != batch or weights.shape[1] > tasks:
        raise RoutingError(
            f"task_weights must have shape (batch, at most num_tasks) = ({batch}, {tasks}), got "
            f"{tuple(weights.shape)}"
        )
    weights = torch.nn.functional.pad(weights, (0, tasks - weights.shape[1]))
    return weights.to(info.layers[0].experts.device)


def check_keep_base(keep_base: Tensor | list[bool], batch: int | None) -> Tensor:
    keep_base = torch.as_tensor(keep_base)
    if keep_base.dtype != torch.bool or keep_base.dim() != 1:
        raise RoutingError(
            f"keep_base must be a bool tensor of shape (batch,), got {keep_base.dtype} {tuple(keep_base.shape)}"
        )
    if batch is not None and keep_base.shape[0] != batch:
        raise RoutingError(f"keep_base has {keep_base.shape[0]} entries but task_ids has {batch}")
    return keep_base


@contextmanager
def routing(
    model: nn.Module,
    *,
    task_ids: Tensor | list[int] | None = None,
    attention_mask: Tensor | None = None,
    keep_base: Tensor | list[bool] | None = None,
    record: bool = True,
    noise: bool = True,
    task_weights: Tensor | None = None,
) -> Iterator[RoutingState]:
    """Route every forward pass of `model` inside the block by these side inputs.

    `task_ids` `(n,)` is required when the model routes by task (e.g. routers 'task', 'poly', 'per-task');
    `attention_mask` `(n, t)` lets the sample router pool only real tokens (without it, the model call's own
    `attention_mask` keyword serves); `keep_base` `(n,)` bool sends the
    marked samples to the untouched base model (their outputs equal the base model's bit for bit, in the same
    batched pass); `noise` False keeps noisy routers to their clean logits in training too; `task_weights` `(n, T)`
    (router 'task' only) mixes each sample's experts by its weights over the tasks, `sum_t w_t B_t A_t x` in every
    adapted layer, in the same pass (a row of zeros: its task's expert alone). The hooks are removed
    when the block ends, even on error. A routing block opened inside another on the same model takes over until it
    ends.
    """
    info = get_info(model)
    config = info.config
    device = info.layers[0].experts.device
    one_task = None
    if info.router_class.needs_task_ids:
        if task_ids is None:
            raise RoutingError(
                f"this model routes by task (router '{config.router}') but no task_ids were given: "
                "use loramix.routing(model, task_ids=...) or pass task_ids= to the wrapped model"
            )
        assert config.num_tasks is not None
        task_ids, one_task = check_task_ids(task_ids, config.num_tasks)
        task_ids = task_ids.to(device, non_blocking=True)
    elif task_ids is not None:
        task_ids = torch.as_tensor(task_ids).long()
    if keep_base is not None:
        keep_base = check_keep_base(keep_base, None if task_ids is None else len(task_ids)).to(device)
    if task_weights is not None:  # router 'task' has its task ids by now (it needs them); others are refused
        task_weights = check_task_weights(model, task_weights, 0 if task_ids is None else len(task_ids))
    state = RoutingState(
        task_ids=task_ids,  # type: ignore[arg-type]
        one_task=one_task,
        attention_mask=attention_mask,
        keep_base=keep_base,  # type: ignore[arg-type]
        task_weights=task_weights,
        record=record,
        noise=noise,
    )
    active = info.active_states
    handles = []
    router = info.model_router
    active.append(state)
    try:
        if attention_mask is None:  # the model call's own mask then; registered first, so routers read it
            handles.append(model.register_forward_pre_hook(partial(_mask_from_call, state), with_kwargs=True))
        if router is not None and not router.pools_model_input:
            _set_model_gate(state, router, None)
        elif router is not None:
            source = info.router_source(model)
            if source is None:
                hook = partial(_run_router_on_input, state, active, router)
                handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hook = partial(_run_router_on_output, state, active, router)
                handles.append(source.register_forward_hook(hook, with_kwargs=True))
        # recomputed blocks route as their first forward
        handles.append(route_checkpoints(info.routed_modules(model), active))
        output_hook = contiguous_output_layer(model)
        if output_hook is not None:
            handles.append(output_hook)
        yield state
    finally:
        for handle in handles:
            handle.remove()
        active.remove(state)
