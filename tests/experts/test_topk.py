"""`ops.topk` (per-sample gather + bmm, per-token sort + grouped GEMM) against `ops.loop_reference`, and the layer
dispatch to it for top-k routers (proposed for tests/experts/)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramix import AdapterConfig, RoutingState
from loramix.experts import LinearExperts, ops
from loramix.inject import build_layer
from loramix.routers import Gate


def _topk_gate(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, top_i, top_p), top_i, top_p


@pytest.mark.parametrize("per", ["sample", "token"])
@pytest.mark.parametrize(
    ("n", "t", "i", "o", "e", "r", "k"), [(3, 5, 12, 8, 6, 4, 2), (2, 7, 8, 16, 9, 4, 3)]
)
def test_topk_equals_loop_reference(per: str, n: int, t: int, i: int, o: int, e: int, r: int, k: int) -> None:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, t, i, generator=generator)
    A0 = torch.randn(e, r, i, generator=generator) / i**0.5
    B0 = torch.randn(e, o, r, generator=generator)
    logits0 = torch.randn((n, e) if per == "sample" else (n, t, e), generator=generator)
    w = torch.randn(n, t, o, generator=generator)
    results = []
    for fast in (True, False):
        x, A, B, logits = (v.clone().requires_grad_(True) for v in (x0, A0, B0, logits0))
        gate, top_i, top_p = _topk_gate(logits, k)
        out = ops.topk(x, A, B, top_i, top_p, 1.7) if fast else ops.loop_reference(x, A, B, gate, 1.7)
        (out * w).sum().backward()
        results.append([out.detach(), x.grad, A.grad, B.grad, logits.grad])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_topk_gives_unchosen_experts_zero_gradient() -> None:
    x = torch.randn(2, 3, 8)
    A = torch.randn(6, 4, 8, requires_grad=True)
    B = torch.randn(6, 8, 4, requires_grad=True)
    indices = torch.tensor([[[0, 2]] * 3, [[2, 0]] * 3])
    ops.topk(x, A, B, indices, torch.full((2, 3, 2), 0.5), 1.0).pow(2).sum().backward()
    for grad in (A.grad, B.grad):
        assert torch.equal(grad[[1, 3, 4, 5]], torch.zeros_like(grad[[1, 3, 4, 5]]))
        assert grad[[0, 2]].abs().sum() > 0


@pytest.mark.parametrize("router", ["token", "sample"])
def test_layer_with_top_k_router_equals_loop(router: str) -> None:
    """A layer whose top-k gate makes `prefers_topk` choose the sparse op still equals base + loop reference."""
    torch.manual_seed(0)
    config = AdapterConfig(num_experts=32, rank=4, router=router, top_k=2)
    assert 32 * 4 >= 64 * 2  # the per-token rule in ops.prefers_topk picks ops.topk here
    layer = build_layer(LinearExperts, nn.Linear(16, 8), config, "layer").train()
    with torch.no_grad():
        layer.experts.B.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    if router == "sample":
        logits = torch.randn(3, 32)
        gate_weights, top_i, _ = _topk_gate(logits, 2)
        state = RoutingState(model_gate=Gate(weights=gate_weights, indices=top_i, logits=logits))
        out = layer(x, routing=state)
    else:
        out = layer(x)
        gate_weights = layer.router(None, x).weights
    indices_shape = (3, 2) if router == "sample" else (3, 5, 2)
    assert ops.prefers_topk(x, *layer.experts.weights(), torch.zeros(indices_shape, dtype=torch.long))
    A, B = layer.experts.weights()
    want = layer.base_layer(x) + ops.loop_reference(x, A, B, gate_weights, layer.scaling)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    out.sum().backward()
    assert layer.experts.A.grad is not None
