"""Adapted layers (Linear, Conv1D, Conv2d): gradient isolation under a hard gate, Conv2d against a per-expert
loop of `F.conv2d`, merged equals unmerged, and the checks their constructors make."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramix import AdapterConfig, RoutingState
from loramix.errors import InjectionError, RoutingError
from loramix.experts import AdaptedLayer, Conv1DExperts, Conv2dExperts, LinearExperts, ops
from loramix.inject import build_layer
from loramix.routers import Gate, TaskRouter

SHARES = ["none", "A", "B"]
LAYER_KINDS = ["linear", "conv1d", "conv2d"]
NUM_EXPERTS = 3


def make_layer(kind: str, config: AdapterConfig, seed: int = 0) -> AdaptedLayer:
    torch.manual_seed(seed)
    if kind == "linear":
        layer: AdaptedLayer = build_layer(LinearExperts, nn.Linear(6, 5), config, "layer")
    elif kind == "conv1d":
        base = Conv1D(5, 6)  # nf=out, nx=in: weight (6, 5)
        nn.init.normal_(base.weight, std=0.3)
        layer = build_layer(Conv1DExperts, base, config, "layer")
    else:
        layer = build_layer(Conv2dExperts, nn.Conv2d(3, 5, 3, padding=1), config, "layer")
    with torch.no_grad():
        layer.experts.B.normal_(std=0.5)
    return layer


def make_input(kind: str, n: int = 4, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (n, 3, 7, 7) if kind == "conv2d" else (n, 5, 6)
    return torch.randn(shape, generator=generator)


def task_state(task_ids: list[int], task_to_expert: list[int] | None = None) -> RoutingState:
    ids = torch.tensor(task_ids)
    num_tasks = len(task_to_expert) if task_to_expert else NUM_EXPERTS
    router = TaskRouter(num_tasks, NUM_EXPERTS, task_to_expert=task_to_expert)
    return RoutingState(task_ids=ids, model_gate=router(RoutingState(task_ids=ids), None))


# ---- gradient isolation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize(
    ("task_ids", "task_to_expert", "routed"),
    [([0, 2, 0, 2], None, {0, 2}), ([1, 3, 3, 1], [0, 0, 1, 2], {0, 2}), ([1, 1, 1, 1], None, {1})],
    ids=["identity-map", "shared-map", "one-expert"],
)
def test_hard_gate_isolates_gradients(
    kind: str, share: str, task_ids: list[int], task_to_expert: list[int] | None, routed: set[int]
) -> None:
    num_tasks = len(task_to_expert) if task_to_expert else NUM_EXPERTS
    config = AdapterConfig(
        num_experts=NUM_EXPERTS,
        num_tasks=num_tasks,
        task_to_expert=task_to_expert,
        router="task",
        share=share,
        dropout=0.2,
        shared_dropout=0.2,
    )
    layer = make_layer(kind, config).train()
    out = layer(make_input(kind), routing=task_state(task_ids, task_to_expert))
    (out * torch.randn_like(out)).sum().backward()
    for name, grad in (("A", layer.experts.A.grad), ("B", layer.experts.B.grad)):
        assert grad is not None
        if grad.shape[0] == 1:  # the shared matrix: every routed sample reaches it
            assert grad.abs().sum() > 0, name
            continue
        for expert in range(NUM_EXPERTS):
            if expert in routed:
                assert grad[expert].abs().sum() > 0, (name, expert)
            else:
                assert torch.equal(grad[expert], torch.zeros_like(grad[expert])), (name, expert)


# ---- Conv2d against a per-expert loop ----------------------------------------------------------------------------


def conv_loop_reference(layer: Conv2dExperts, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """`sum_e g_e * s * conv2d(x, (B_e @ A_e).view(o, c, k, k))`, one expert at a time."""
    conv = layer.base_layer
    A, B = layer.experts.weights()
    num_experts = layer.experts.num_experts
    out = 0
    for e in range(num_experts):
        A_e, B_e = A[0 if A.shape[0] == 1 else e], B[0 if B.shape[0] == 1 else e]
        kernel = (B_e @ A_e).view(conv.out_channels, conv.in_channels, *conv.kernel_size)
        y = F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation)
        weight = 1.0 if gate is None else gate[:, e, None, None, None]
        out = out + weight * layer.scaling * y
    return out


CONV_GEOMETRIES = [  # (kernel, stride, padding, dilation)
    ((3, 3), 1, 1, 1),
    ((1, 1), 1, 0, 1),
    ((3, 2), 2, (1, 0), 1),
    ((3, 3), 1, 2, 2),
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: str(g))
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("gate_kind", ["none", "hard", "sample"])
def test_conv2d_delta_equals_per_expert_loop(geometry: tuple, share: str, gate_kind: str) -> None:
    kernel, stride, padding, dilation = geometry
    num_experts = 1 if gate_kind == "none" else NUM_EXPERTS
    router = "none" if gate_kind == "none" else ("task" if gate_kind == "hard" else "sample")
    config = AdapterConfig(
        num_experts=num_experts,
        num_tasks=NUM_EXPERTS if router == "task" else None,
        router=router,
        share=share,
    )
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    layer = build_layer(Conv2dExperts, base, config, "conv").eval()
    with torch.no_grad():
        layer.experts.B.normal_()
    x = torch.randn(4, 3, 8, 7)
    if gate_kind == "none":
        gate, weights = None, None
    elif gate_kind == "hard":
        gate = TaskRouter(NUM_EXPERTS, NUM_EXPERTS)(RoutingState(task_ids=torch.tensor([2, 0, 2, 1])), None)
        weights = gate.weights
    else:
        weights = torch.softmax(torch.randn(4, NUM_EXPERTS), dim=-1)
        gate = Gate(weights=weights)
    out = layer.delta(x, gate)
    want = conv_loop_reference(layer, x, weights)
    assert out.shape == base(x).shape
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


# ---- Linear wiring: any number of middle dimensions, per-token gates ----------------------------------------------


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("shape", [(4, 6), (4, 5, 6), (4, 2, 3, 6)])
def test_linear_delta_with_token_router_equals_loop(share: str, shape: tuple[int, ...]) -> None:
    config = AdapterConfig(num_experts=NUM_EXPERTS, router="token", share=share)
    layer = make_layer("linear", config).eval()
    x = torch.randn(shape)
    out = layer(x)
    gate = layer.router(None, x)
    assert gate.weights.shape == (*shape[:-1], NUM_EXPERTS)
    A, B = layer.experts.weights()
    x3 = x.reshape(shape[0], -1, 6)
    weights = gate.weights.reshape(shape[0], -1, NUM_EXPERTS)
    want = layer.base_layer(x) + ops.loop_reference(x3, A, B, weights, layer.scaling).reshape(*shape[:-1], 5)
    assert out.shape == (*shape[:-1], 5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_gate_for_another_batch_size_is_a_routing_error() -> None:
    config = AdapterConfig(num_experts=NUM_EXPERTS, num_tasks=NUM_EXPERTS, router="task")
    layer = make_layer("linear", config)
    with pytest.raises(RoutingError, match="batch size 4"):
        layer(make_input("linear"), routing=task_state([0, 1]))


def test_task_layer_outside_routing_is_a_routing_error() -> None:
    layer = make_layer("linear", AdapterConfig(num_experts=2, num_tasks=2, router="task"))
    with pytest.raises(RoutingError, match="task_ids"):
        layer(make_input("linear"))


# ---- merging --------------------------------------------------------------------------------------------------


def fixed_mixture_forward(layer: AdaptedLayer, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    state = RoutingState(model_gate=Gate(weights=gate.expand(n, -1)))
    return layer(x, routing=state)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("share", SHARES)
def test_merged_equals_unmerged_and_unmerge_restores(kind: str, share: str) -> None:
    config = AdapterConfig(num_experts=NUM_EXPERTS, router="sample", share=share, rank=2, alpha=3.0)
    layer = make_layer(kind, config).eval()
    x = make_input(kind)
    gate = torch.tensor([0.5, 0.2, 0.3])
    original = layer.base_layer.weight.detach().clone()
    unmerged = fixed_mixture_forward(layer, x, gate)
    assert not torch.allclose(unmerged, layer.base_layer(x), atol=1e-3)  # the experts matter

    layer.merge(gate)
    assert not torch.allclose(layer.base_layer.weight, original, atol=1e-3)
    merged_base_only = layer.base_layer(x)
    merged = layer(x)  # a merged layer runs as its base and needs no routing
    torch.testing.assert_close(merged_base_only, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RoutingError, match="already merged"):
        layer.merge(gate)

    layer.unmerge()
    assert layer.merged_gate is None
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(fixed_mixture_forward(layer, x, gate), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merged_plain_lora_equals_unmerged(kind: str) -> None:
    layer = make_layer(kind, AdapterConfig(rank=2, rslora=True)).eval()
    x = make_input(kind)
    unmerged = layer(x)
    layer.merge(torch.ones(1))
    torch.testing.assert_close(layer.base_layer(x), unmerged, atol=1e-5, rtol=0)


# ---- constructor checks, devices and dtypes ------------------------------------------------------------------


def test_conv2d_refuses_groups_and_token_router() -> None:
    with pytest.raises(InjectionError, match="groups"):
        build_layer(Conv2dExperts, nn.Conv2d(4, 4, 3, groups=2), AdapterConfig(), "conv")
    with pytest.raises(InjectionError, match="per-token"):
        build_layer(Conv2dExperts, nn.Conv2d(4, 4, 3), AdapterConfig(num_experts=2, router="token"), "conv")


@pytest.mark.parametrize("router", ["token", "poly"])
def test_adapter_parameters_follow_the_base_device(router: str) -> None:
    config = AdapterConfig(num_experts=2, num_tasks=2 if router == "poly" else None, router=router)
    layer = build_layer(LinearExperts, nn.Linear(6, 5, device="meta"), config, "layer")
    assert {p.device.type for p in layer.parameters()} == {"meta"}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_bf16_base_layer(kind: str) -> None:
    config = AdapterConfig(num_experts=NUM_EXPERTS, router="sample")
    layer = make_layer(kind, config).eval()
    x = make_input(kind)
    gate = torch.softmax(torch.randn(NUM_EXPERTS), dim=-1)
    want = fixed_mixture_forward(layer, x, gate)
    layer.base_layer.to(torch.bfloat16)
    out = fixed_mixture_forward(layer, x.bfloat16(), gate)
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).abs().max() <= 3e-2 * want.abs().max()
