"""Routing under activation checkpointing: a recomputed block sees the gates of its first forward.

Activation (gradient) checkpointing runs a block's forward again during backward, when the routing block that
passed the side inputs has usually ended and its hooks are gone. Hugging Face models checkpoint each block through
the function in the block's `_gradient_checkpointing_func` attribute (set by `gradient_checkpointing_enable`), so
while a routing block is open that function is wrapped: what it checkpoints is bound to the open block's routing
state, and runs with that state pushed onto the model's list of open routing blocks, both the first time and when
it is recomputed, so that every adapted layer in it reads that state (the one its first forward read, even where
backward runs after the routing block has ended or inside another). A recomputation runs with the state's
`recomputing` set and records nothing: the routers' decisions were recorded once, by the first forward.

Everything a recomputed layer reads is the state's: the task ids, the keep-base mask and the model-wide gate, the
very tensor the first forward used (computed outside the checkpointed block, e.g. on the embeddings). A router that
lives in a layer runs again on the recomputed input, with the random state torch's checkpointing restores
(`preserve_rng_state`, its default), so noise and dropout repeat too.

With reentrant checkpointing (`use_reentrant=True`) the first forward of a block runs without gradients: the gates
it records for auxiliary losses carry none, so those losses cannot train the routers (a warning says so), and a
learned model-wide gate (the sample router's), a tensor from outside the block, cannot reach it (refused). Use the
non-reentrant form, transformers' default since version 5.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loramix.errors import ConfigError, RoutingError

if TYPE_CHECKING:
    from loramix.routers.state import RoutingState

CHECKPOINT_ATTR = "_gradient_checkpointing_func"  # where transformers keeps a block's checkpoint function


@contextmanager
def _pushed(active: list[RoutingState], state: RoutingState, recomputing: bool) -> Iterator[None]:
    """`state` on top of the model's open routing blocks while a checkpointed block runs, marked as recomputing
    or not."""
    before = state.recomputing
    state.recomputing = recomputing
    active.append(state)
    try:
        yield
    finally:
        active.pop()
        state.recomputing = before


def _run_routed(
    active: list[RoutingState],
    state: RoutingState,
    grad_outside: bool,
    runs: list[int],
    refused: list[str],
    function: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Run the checkpointed `function` with `state` current; `runs` counts the runs (the first forward, then each
    recomputation). Reentrant checkpointing runs the first forward without gradients (`grad_outside` says whether
    the caller had them). What cannot run checkpointed is put in `refused`, raised once the checkpoint has returned
    (an error raised inside torch's non-reentrant checkpoint leaves its saved-tensor hooks on until garbage
    collection, in torch before 2.13, and a later unrelated backward then fails)."""
    recomputing = runs[0] > 0
    runs[0] += 1
    reentrant_first = not recomputing and grad_outside and not torch.is_grad_enabled()
    gate = state.model_gate
    if reentrant_first and gate is not None and gate.weights.requires_grad:
        refused.append(
            "reentrant activation checkpointing cannot hand the model-wide router's gate to a checkpointed block "
            "(it is computed outside the block, so backward would run through it once per block): enable "
            "checkpointing with gradient_checkpointing_kwargs={'use_reentrant': False}"
        )
    recorded = len(state.records)
    with _pushed(active, state, recomputing):
        out = function(*args, **kwargs)
    # A router that pooled a module inside the block ran in the first forward; its recomputation would not run it
    # again once the routing block has ended (and reentrant checkpointing ran it without gradients).
    if not recomputing and state.model_gate is not gate:
        refused.append(
            "router_input lies inside a block that activation checkpointing recomputes: pool a module outside "
            "the checkpointed blocks (the input embeddings, the default, or a whole block's output where "
            "transformers checkpoints the block's forward rather than its __call__) or turn checkpointing off"
        )
    if (
        reentrant_first
        and not refused
        and any(made.logits is not None for _, made in state.records[recorded:])
    ):
        warnings.warn(
            "reentrant activation checkpointing runs a block's first forward without gradients, so the router "
            "decisions it records carry none: auxiliary router losses (load balance, z-loss, TwD) will not train "
            "the routers; use gradient_checkpointing_kwargs={'use_reentrant': False}",
            RuntimeWarning,
            stacklevel=2,
        )
    return out


class RoutedCheckpoint:
    """A block's checkpoint function, wrapped: what it checkpoints runs with the innermost open routing block's
    state current, the first time and when backward recomputes it."""

    def __init__(self, original: Callable[..., Any], active: list[RoutingState]) -> None:
        self.original, self.active = original, active

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self.original(function, *args, **kwargs)
        refused: list[str] = []
        routed = partial(
            _run_routed, self.active, self.active[-1], torch.is_grad_enabled(), [0], refused, function
        )
        out = self.original(routed, *args, **kwargs)
        if refused:
            raise RoutingError(refused[0])
        return out


class _Unwrap:
    """Puts the original checkpoint functions back (a handle like a hook's)."""

    def __init__(self, wrapped: list[tuple[nn.Module, RoutedCheckpoint]]) -> None:
        self.wrapped = wrapped

    def remove(self) -> None:
        for module, routed in self.wrapped:
            if vars(module).get(CHECKPOINT_ATTR) is routed:  # untouched since: restore what was there
                setattr(module, CHECKPOINT_ATTR, routed.original)
        self.wrapped = []


def route_checkpoints(modules: Iterable[nn.Module], active: list[RoutingState]) -> _Unwrap:
    """Wrap the checkpoint function of every one of `modules` that has one (and is not wrapped by an outer open
    routing block already); `remove()` on the result undoes it."""
    wrapped = []
    for module in modules:
        original = vars(module).get(CHECKPOINT_ATTR)
        if original is None or isinstance(original, RoutedCheckpoint):
            continue
        routed = RoutedCheckpoint(original, active)
        setattr(module, CHECKPOINT_ATTR, routed)
        wrapped.append((module, routed))
    return _Unwrap(wrapped)


def enable_checkpointing(model: nn.Module, *, reentrant: bool = False) -> None:
    """Turn on a Hugging Face model's activation checkpointing, in the non-reentrant form unless `reentrant` (in
    which every router trains exactly as without checkpointing); a ConfigError when the model cannot.

    Example:
        >>> enable_checkpointing(model)  # then inject, route and train as usual
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"gradient_checkpointing: {type(model).__name__} does not support activation checkpointing (a "
            "transformers model whose supports_gradient_checkpointing is true does); set it to false"
        )
    kwargs = {"use_reentrant": reentrant}
    # transformers 5 names it activation_checkpointing_enable (the older name warns there)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        # reentrant checkpointing passes gradients only to block inputs that need them: with a frozen base (as
        # after inject) nothing would, and the experts inside the blocks would get no gradient
        model.enable_input_require_grads()
