"""Routing under transformers' activation checkpointing: the blocks recomputed in backward route as their first
forward did, so every trainable parameter gets the gradient it gets without checkpointing, with dropout and router
noise too (torch's checkpointing restores the random state), and with the routers' auxiliary losses where the
checkpointing form lets them have gradients (non-reentrant). Reentrant checkpointing refuses a model-wide learned
gate, which it cannot carry into a block."""

from __future__ import annotations

import gc
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import loramix
from loramix.errors import ConfigError, RoutingError
from loramix.recompute import CHECKPOINT_ATTR, RoutedCheckpoint, enable_checkpointing
from loramix.tiny_lm import tiny_causal_lm
from tests.models import (
    adapter_config,
    call,
    randomize_adapters,
    task_ids_for,
    text_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_mlp,
)

MODELS = {
    "llama": lambda: tiny_causal_lm("llama", vocab_size=99, hidden_size=32, num_layers=2, num_heads=2),
    "gpt2": lambda: tiny_gpt2(lm_head=True),
    "bert": lambda: tiny_bert(),
}
ROUTERS = ["none", "task", "poly", "sample", "token"]
LEARNED = ("sample", "token")  # the routers that may add noise
KEEP = torch.tensor([False, True, False, False])


def build(kind: str, router: str, checkpointing: str | None, **overrides: Any) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[kind]()
    loramix.inject(model, adapter_config(router, **overrides))
    randomize_adapters(model)
    if checkpointing is not None:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # transformers 5 renamed it activation_checkpointing_*
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
    return model.train()


def gradients(
    kind: str,
    router: str,
    checkpointing: str | None,
    *,
    aux: bool,
    backward_inside: bool = False,
    **overrides: Any,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Every trainable parameter's gradient after one routed forward and backward (the output's square, plus the
    recorded router logits' when `aux`; backward inside the routing block or after it), and how many gates were
    recorded before and after backward."""
    model = build(kind, router, checkpointing, **overrides)
    inputs = text_inputs()
    torch.manual_seed(5)  # the same dropout masks and router noise in every run
    with loramix.routing(
        model, task_ids=task_ids_for(model, 4), attention_mask=inputs["attention_mask"], keep_base=KEEP
    ) as state:
        out = call(model, inputs)
        loss = out.float().pow(2).mean()
        if aux:
            loss = loss + sum(g.logits.pow(2).mean() for g in state.gates() if g.logits is not None)
        recorded = len(state.records)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, recorded, len(state.records)


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    assert any(g is not None for g in want.values())
    for name, grad in want.items():
        if grad is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)


NOISE = [
    pytest.param({"dropout": 0.0}, id="no-dropout"),
    pytest.param({"dropout": 0.2, "noisy": True}, id="dropout-noise"),
]


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_non_reentrant_checkpointing_gives_the_same_gradients(kind: str, router: str, noise: dict) -> None:
    noise = {
        k: v for k, v in noise.items() if k != "noisy" or router != "task"
    }  # the task router has no noise
    want, recorded, _ = gradients(kind, router, None, aux=True, **noise)
    got, recorded_checkpointed, after_backward = gradients(kind, router, "non-reentrant", aux=True, **noise)
    assert_same_gradients(got, want)
    assert recorded_checkpointed == recorded == after_backward  # recomputation records nothing more


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("router", [r for r in ROUTERS if r != "sample"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_reentrant_checkpointing_gives_the_same_gradients(kind: str, router: str, noise: dict) -> None:
    noise = {k: v for k, v in noise.items() if k != "noisy" or router in LEARNED}
    want, _, _ = gradients(kind, router, None, aux=False, **noise)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _, _ = gradients(kind, router, "reentrant", aux=False, **noise)
    assert_same_gradients(got, want)
    told = [w for w in caught if issubclass(w.category, RuntimeWarning) and "reentrant" in str(w.message)]
    assert bool(told) == (router in ("poly", "token"))  # learned gates recorded without gradient: told


@pytest.mark.parametrize("kind", list(MODELS))
def test_reentrant_checkpointing_refuses_a_learned_model_wide_gate(kind: str) -> None:
    with pytest.raises(RoutingError, match="use_reentrant': False"):
        gradients(kind, "sample", "reentrant", aux=False)


def test_the_checkpoint_functions_are_wrapped_only_inside_a_routing_block() -> None:
    model = build("llama", "task", "non-reentrant")
    layers = [m for m in model.modules() if CHECKPOINT_ATTR in vars(m)]
    originals = [vars(m)[CHECKPOINT_ATTR] for m in layers]
    assert layers and not any(isinstance(f, RoutedCheckpoint) for f in originals)
    inputs = text_inputs()
    with loramix.routing(model, task_ids=task_ids_for(model, 4)):
        assert all(isinstance(vars(m)[CHECKPOINT_ATTR], RoutedCheckpoint) for m in layers)
        with loramix.routing(model, task_ids=task_ids_for(model, 4)):  # an inner block wraps nothing again
            assert all(vars(m)[CHECKPOINT_ATTR].original is f for m, f in zip(layers, originals))
        out = call(model, inputs)
    assert [vars(m)[CHECKPOINT_ATTR] for m in layers] == originals
    out.pow(2).mean().backward()  # recomputed after the block ended


def test_a_block_recomputed_without_the_routing_block_says_so() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    loramix.inject(model, {"num_experts": 2, "num_tasks": 2, "router": "task", "targets": ["0"]})
    x = torch.randn(3, 6)
    with loramix.routing(model, task_ids=torch.tensor([0, 1, 0])):  # torch's own checkpoint: not wrapped
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    with pytest.raises(RoutingError, match="checkpointed by other means"):
        out.sum().backward()


def test_enable_checkpointing_turns_on_the_non_reentrant_form() -> None:
    model = MODELS["llama"]()
    enable_checkpointing(model)
    functions = [vars(m)[CHECKPOINT_ATTR] for m in model.modules() if CHECKPOINT_ATTR in vars(m)]
    assert functions and all(f.keywords == {"use_reentrant": False} for f in functions)
    with pytest.raises(ConfigError, match="gradient_checkpointing: MLP does not support"):
        enable_checkpointing(tiny_mlp())


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_a_router_input_inside_a_checkpointed_block_is_refused(checkpointing: str) -> None:
    """The router would run in the first forward but not in the recomputation (reentrant: without gradients).
    The refusal leaves autograd clean: raised inside torch's non-reentrant checkpoint, it would leave that
    checkpoint's saved-tensor hooks on until the garbage collector ran, and a later backward through an unrelated
    model would fail."""
    source = {"router_input": "transformer.h.0.ln_1"}  # inside block 0, before its adapted layers
    gradients("gpt2", "sample", None, aux=True, **source)  # fine without checkpointing
    gc.disable()
    try:
        with pytest.raises(
            RoutingError, match="router_input lies inside a block that activation checkpointing"
        ):
            gradients("gpt2", "sample", checkpointing, aux=False, **source)
        layer = nn.Linear(3, 2)
        layer(torch.randn(4, 3)).pow(2).sum().backward()
    finally:
        gc.enable()


def block_hooks_run_inside_the_checkpoint() -> bool:
    """Whether this transformers checkpoints a block's `__call__` (its forward hooks inside the checkpoint, as in
    5.17 and before) rather than its `forward` (later 5.x)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older releases checkpoint each block's __call__ from the model's own loop
        return True
    return "__call__" in vars(GradientCheckpointingLayer)


def test_a_router_input_on_a_whole_block_runs_outside_the_checkpoint() -> None:
    """A block's own forward hooks run outside its checkpoint where transformers checkpoints `forward`; where it
    checkpoints `__call__`, the hooks run inside and the router input is refused like one inside the block."""
    source = {"router_input": "transformer.h.0", "targets": ["h.1.attn.c_attn", "h.1.mlp.c_fc"]}
    want, _, _ = gradients("gpt2", "sample", None, aux=True, **source)
    if block_hooks_run_inside_the_checkpoint():
        with pytest.raises(RoutingError, match="router_input lies inside a block"):
            gradients("gpt2", "sample", "non-reentrant", aux=True, **source)
        return
    got, _, _ = gradients("gpt2", "sample", "non-reentrant", aux=True, **source)
    assert_same_gradients(got, want)


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_backward_inside_the_routing_block_records_nothing_more(checkpointing: str) -> None:
    """Then the routing hooks are still there when the blocks are recomputed."""
    want, recorded, _ = gradients("llama", "token", None, aux=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got, recorded_checkpointed, after = gradients(
            "llama", "token", checkpointing, aux=False, backward_inside=True
        )
    assert_same_gradients(got, want)
    assert recorded_checkpointed == recorded == after
