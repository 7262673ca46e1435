"""Routers: gates sum to one, top-k keeps exactly k, noise only in training, Poly's relaxed Bernoulli, fp32."""

from __future__ import annotations

import pytest
import torch

from loramix import AdapterConfig, ConfigError
from loramix.context import RoutingState
from loramix.kinds import check_kinds
from loramix.routers import (
    Gate,
    PerTaskRouter,
    PolyRouter,
    Router,
    SampleRouter,
    TaskRouter,
    TokenRouter,
    router_class,
)

NUM_EXPERTS = 5
FEATURES = 8


def hidden(per_token: bool, seed: int = 0) -> torch.Tensor:
    shape = (4, 6, FEATURES) if per_token else (4, FEATURES)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def make_router(kind: str, **kwargs) -> Router:
    torch.manual_seed(0)
    if kind == "task":
        return TaskRouter(NUM_EXPERTS, NUM_EXPERTS)
    if kind == "poly":
        router = PolyRouter(3, NUM_EXPERTS)
        with torch.no_grad():
            router.table.normal_()
        return router
    if kind == "token":
        return TokenRouter(FEATURES, NUM_EXPERTS, **kwargs)
    return SampleRouter(FEATURES, NUM_EXPERTS, hidden=16, **kwargs)


def route(router: Router, kind: str) -> Gate:
    if kind in ("task", "poly"):
        return router(RoutingState(task_ids=torch.tensor([0, 2, 1, 2])), None)
    return router(None, hidden(per_token=kind == "token"))


ALL = ["task", "poly", "token", "sample"]


def assert_rows_sum_to_one(gate: Gate) -> None:
    sums = gate.weights.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0)
    assert (gate.weights >= 0).all()


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("training", [False, True])
def test_gates_sum_to_one(kind: str, training: bool) -> None:
    router = make_router(kind, noisy=True) if kind in ("token", "sample") else make_router(kind)
    gate = route(router.train(training), kind)
    assert gate.weights.dtype == torch.float32
    assert gate.weights.shape == ((4, 6, NUM_EXPERTS) if kind == "token" else (4, NUM_EXPERTS))
    assert gate.per_token == (kind == "token")
    assert_rows_sum_to_one(gate)


@pytest.mark.parametrize("kind", ["token", "sample"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("noisy", [False, True])
def test_top_k_keeps_exactly_k(kind: str, k: int, noisy: bool) -> None:
    router = make_router(kind, top_k=k, noisy=noisy).train()
    gate = route(router, kind)
    assert_rows_sum_to_one(gate)
    assert ((gate.weights != 0).sum(-1) == k).all()
    assert gate.indices is not None and gate.indices.shape == (*gate.weights.shape[:-1], k)
    kept = torch.zeros_like(gate.weights, dtype=torch.bool).scatter(-1, gate.indices, True)
    assert torch.equal(kept, gate.weights != 0)
    # the kept experts are the k largest logits (without noise, in eval)
    gate = route(router.eval(), kind)
    assert gate.logits is not None and gate.indices is not None
    want = gate.logits.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(gate.indices.sort(-1).values, want)


def test_top_k_renormalises_the_kept_probabilities() -> None:
    router = make_router("token", top_k=2).eval()
    gate = route(router, "token")
    probs = torch.softmax(gate.logits, dim=-1)
    kept = probs.gather(-1, gate.indices)
    torch.testing.assert_close(gate.weights.gather(-1, gate.indices), kept / kept.sum(-1, keepdim=True))


@pytest.mark.parametrize("kind", ["token", "sample"])
def test_noise_only_in_training(kind: str) -> None:
    router = make_router(kind, noisy=True)
    x = hidden(per_token=kind == "token")
    clean = torch.softmax(router.eval()(None, x).logits, dim=-1)
    eval_1, eval_2 = router.eval()(None, x), router(None, x)
    assert torch.equal(eval_1.weights, clean)
    assert torch.equal(eval_1.weights, eval_2.weights)
    train_1, train_2 = router.train()(None, x), router(None, x)
    assert not torch.allclose(train_1.weights, clean, atol=1e-4)
    assert not torch.allclose(train_1.weights, train_2.weights, atol=1e-4)
    assert torch.equal(train_1.logits, eval_1.logits)  # logits stay clean: the losses see them


@pytest.mark.parametrize("kind", ["token", "sample"])
def test_without_noise_training_equals_eval(kind: str) -> None:
    router = make_router(kind)
    x = hidden(per_token=kind == "token")
    assert torch.equal(router.train()(None, x).weights, router.eval()(None, x).weights)


def test_temperature_divides_the_logits() -> None:
    x = hidden(per_token=True)
    hot, cold = make_router("token", temperature=2.0), make_router("token", temperature=1.0)
    gate = hot(None, x)
    torch.testing.assert_close(gate.weights, torch.softmax(cold(None, x).logits / 2.0, dim=-1))


def test_poly_relaxed_bernoulli_in_training_sigmoid_in_eval() -> None:
    router = make_router("poly")
    task_ids = torch.tensor([0, 2, 1, 2])
    scores = torch.sigmoid(router.table[task_ids].detach())
    want = scores / scores.sum(-1, keepdim=True)
    eval_1, eval_2 = (
        router.eval()(RoutingState(task_ids=task_ids), None),
        router(RoutingState(task_ids=task_ids), None),
    )
    torch.testing.assert_close(eval_1.weights, want)
    assert torch.equal(eval_1.weights, eval_2.weights)
    torch.testing.assert_close(router.weights_for_task(2), want[1])
    torch.manual_seed(1)
    train_1, train_2 = (
        router.train()(RoutingState(task_ids=task_ids), None),
        router(RoutingState(task_ids=task_ids), None),
    )
    assert not torch.allclose(train_1.weights, want, atol=1e-3)
    assert not torch.allclose(train_1.weights, train_2.weights, atol=1e-3)
    # samples of the same task get independent draws
    assert not torch.allclose(train_1.weights[1], train_1.weights[3], atol=1e-3)
    # the relaxed Bernoulli is centred on the table: its mean over many draws is close to the sigmoid
    many = torch.stack(
        [router(RoutingState(task_ids=torch.tensor([0])), None).weights[0] for _ in range(2000)]
    )
    relaxed = torch.sigmoid(router.table[0].detach() + torch.logit(torch.rand(20000, NUM_EXPERTS)))
    torch.testing.assert_close(
        many.mean(0), (relaxed / relaxed.sum(-1, keepdim=True)).mean(0), atol=0.02, rtol=0
    )


def test_poly_gate_is_differentiable_in_training() -> None:
    router = make_router("poly").train()
    router(RoutingState(task_ids=torch.tensor([0, 1])), None).weights[:, 0].sum().backward()
    assert router.table.grad is not None
    assert router.table.grad[:2].abs().sum() > 0
    assert torch.equal(router.table.grad[2], torch.zeros(NUM_EXPERTS))  # task 2 was not in the batch


def test_task_router_maps_tasks_to_experts() -> None:
    router = TaskRouter(4, 3, task_to_expert=[0, 2, 2, 1])
    gate = router(RoutingState(task_ids=torch.tensor([3, 1, 0, 2])), None)
    assert gate.hard
    assert torch.equal(gate.indices, torch.tensor([1, 2, 0, 2]))
    assert torch.equal(gate.weights, torch.nn.functional.one_hot(torch.tensor([1, 2, 0, 2]), 3).float())


@pytest.mark.parametrize("kind", ["token", "sample"])
def test_routing_maths_runs_in_fp32(kind: str) -> None:
    router = make_router(kind, top_k=2)
    if kind == "sample":
        router.network.to(torch.bfloat16)
    gate = router(None, hidden(per_token=kind == "token").bfloat16())
    assert gate.weights.dtype == torch.float32
    assert gate.logits is not None and gate.logits.dtype == torch.float32
    assert_rows_sum_to_one(gate)


def test_sample_router_accepts_a_custom_network() -> None:
    network = torch.nn.Linear(FEATURES, NUM_EXPERTS)
    router = SampleRouter(FEATURES, NUM_EXPERTS, network=network)
    x = hidden(per_token=False)
    torch.testing.assert_close(router(None, x).logits, network(x))


@pytest.mark.parametrize(
    ("router", "router_type", "scope"),
    [
        ("none", None, None),
        ("task", TaskRouter, "model"),
        ("poly", PolyRouter, "layer"),
        ("token", TokenRouter, "layer"),
        ("sample", SampleRouter, "model"),
        ("per-task", PerTaskRouter, "layer"),
    ],
)
def test_the_registry_builds_each_router_kind(
    router: str, router_type: type | None, scope: str | None
) -> None:
    config = AdapterConfig(
        num_experts=1 if router == "none" else 3,
        num_tasks=3 if router in ("task", "poly", "per-task") else None,
        router=router,
    )
    cls = router_class(router)
    built = cls.from_config(config, FEATURES)
    assert cls.scope == scope
    assert (built is None) == (router_type is None)
    if router_type is not None:
        assert type(built) is router_type and built.kind == router


def test_an_unknown_router_kind_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="router: router 'magic' is not one of: .*per-task"):
        check_kinds(AdapterConfig.from_dict({"router": "magic"}))


def test_task_ids_of_another_batch_size_are_a_routing_error_for_per_task_routers() -> None:
    import loramix
    from loramix.errors import RoutingError
    from tests.models import mlp_inputs, tiny_mlp

    model = tiny_mlp()
    loramix.inject(
        model, {"router": "per-task", "num_experts": 3, "num_tasks": 3, "top_k": 2, "targets": ["fc1"]}
    )
    with pytest.raises(RoutingError, match="got 4 inputs but task_ids for 2"):
        with loramix.routing(model, task_ids=torch.tensor([0, 1])):
            model(mlp_inputs())
