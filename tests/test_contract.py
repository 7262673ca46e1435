"""The contract every router kind and every share mode keeps, on Linear (an MLP) and Conv2d (a CNN) layers:
output shapes, identity at init, gradient to every trainable adapter and router parameter, determinism in eval,
and recorded gates of the right shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loramix
from loramix.inject import adapter_state, get_info
from tests.models import (
    BATCH,
    ROUTER_CONFIGS,
    ROUTERS,
    SHARES,
    TOKENS,
    adapter_config,
    cnn_inputs,
    mlp_inputs,
    randomize_adapters,
    run,
    tiny_cnn,
    tiny_mlp,
)

CASES = [
    pytest.param(router, share, kind, id=f"{kind}-{router}-share{share}")
    for kind in ("linear", "conv2d")
    for router in ROUTERS
    for share in SHARES
    if not (kind == "conv2d" and router == "token")  # a per-token router cannot route a Conv2d
]


def build(router: str, share: str, kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An adapted toy model, its inputs, and the base model's output on them."""
    model = tiny_mlp() if kind == "linear" else tiny_cnn()
    inputs = mlp_inputs() if kind == "linear" else cnn_inputs()
    with torch.no_grad():
        base = model(inputs)
    targets = "all-linear" if kind == "linear" else ["conv1", "conv2"]
    config = adapter_config(router, share, targets=targets, dropout=0.1, shared_dropout=0.1)
    loramix.inject(model, config)
    return model, inputs, base


@pytest.mark.parametrize(("router", "share", "kind"), CASES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_identity_at_init_and_shapes(router: str, share: str, kind: str, training: bool) -> None:
    model, inputs, base = build(router, share, kind)
    out, _ = run(model.train(training), inputs)
    assert out.shape == base.shape
    assert out.dtype == base.dtype
    assert (out - base).abs().max() < 1e-6


@pytest.mark.parametrize(("router", "share", "kind"), CASES)
def test_gradient_reaches_every_trainable_adapter_parameter(router: str, share: str, kind: str) -> None:
    model, inputs, base = build(router, share, kind)
    randomize_adapters(model)
    out, _ = run(model.train(), inputs)
    assert not torch.allclose(out, base, atol=1e-4)
    (out * torch.randn_like(out)).sum().backward()
    adapter = adapter_state(model)
    assert adapter
    for name, param in adapter.items():
        assert param.requires_grad, name
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in model.named_parameters():
        if name not in adapter:
            assert not param.requires_grad and param.grad is None, name
    if router in ("poly", "token", "sample"):
        assert any("router" in name for name in adapter)


@pytest.mark.parametrize(("router", "share", "kind"), CASES)
def test_deterministic_in_eval(router: str, share: str, kind: str) -> None:
    model, inputs, _ = build(router, share, kind)
    randomize_adapters(model)
    model.eval()
    first, _ = run(model, inputs)
    second, _ = run(model, inputs)
    assert torch.equal(first, second)


@pytest.mark.parametrize(("router", "share", "kind"), CASES)
def test_records_hold_gates_of_the_right_shape(router: str, share: str, kind: str) -> None:
    model, inputs, _ = build(router, share, kind)
    _, state = run(model, inputs)
    num_experts = ROUTER_CONFIGS[router]["num_experts"]
    names = [name for name, _ in state.records]
    if router == "none":
        assert names == []
        return
    if router in ("task", "sample"):
        assert names == ["model"]  # one decision per forward, shared by every layer
    else:
        assert names == get_info(model).names  # one decision per layer
    expected = (BATCH, TOKENS, num_experts) if router == "token" else (BATCH, num_experts)
    for gate in state.gates():
        assert gate.weights.shape == expected
        assert gate.hard == (router == "task")
        sums = gate.weights.sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0)
