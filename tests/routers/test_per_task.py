"""The per-task router bank (MoE-Adapters): each sample scored by its own task's router, noisy top-k, zero init,
old routers frozen bit for bit, new tasks and experts added without changing old decisions."""

from __future__ import annotations

import pytest
import torch

from loramix.context import RoutingState
from loramix.routers import PerTaskRouter

FEATURES, EXPERTS, TASKS = 8, 6, 3


def hidden(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, FEATURES, generator=torch.Generator().manual_seed(seed))  # (n, t, d)


def trained_router(**kwargs) -> PerTaskRouter:
    torch.manual_seed(0)
    router = PerTaskRouter(FEATURES, EXPERTS, num_tasks=TASKS, top_k=2, **kwargs)
    with torch.no_grad():
        router.weight.normal_()
    return router


def state(task_ids: list[int]) -> RoutingState:
    return RoutingState(task_ids=torch.tensor(task_ids))


def test_zero_initialised_routers_give_a_uniform_choice() -> None:
    """Before training every task's logits are zero: the kept experts share the gate equally."""
    router = PerTaskRouter(FEATURES, EXPERTS, num_tasks=TASKS, top_k=2).eval()
    gate = router(state([0, 1, 2, 0, 1]), hidden())
    assert torch.equal(gate.logits, torch.zeros(5, EXPERTS))
    assert torch.allclose(gate.weights.sum(-1), torch.ones(5))
    assert ((gate.weights > 0).sum(-1) == 2).all()


@pytest.mark.parametrize("training", [False, True])
def test_exactly_k_experts_per_sample(training: bool) -> None:
    router = trained_router(noisy=True).train(training)
    gate = router(state([0, 1, 2, 2, 1]), hidden())
    assert ((gate.weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gate.weights.sum(-1), torch.ones(5))


def test_each_sample_is_scored_by_its_own_tasks_router_on_the_first_token() -> None:
    router = trained_router().eval()
    x = hidden()
    gate = router(state([2, 0, 1, 1, 0]), x)
    for i, task in enumerate([2, 0, 1, 1, 0]):
        torch.testing.assert_close(gate.logits[i], router.weight[task] @ x[i, 0])


def test_noise_only_in_training() -> None:
    router = trained_router(noisy=True)
    with torch.no_grad():
        router.noise_weight.normal_()
    x, s = hidden(), state([0, 1, 2, 0, 1])
    assert torch.equal(router.eval()(s, x).weights, router.eval()(s, x).weights)
    assert not torch.equal(router.train()(s, x).weights, router.train()(s, x).weights)


def test_a_routing_block_without_noise_routes_by_the_clean_logits_in_training() -> None:
    """`noise=False` in the routing state (a label-prompt head's class texts with `texts_noise` off): a router in
    training decides as in eval, while the inputs' blocks stay noisy."""
    router = trained_router(noisy=True).train()
    with torch.no_grad():
        router.noise_weight.normal_()
    x, quiet = hidden(), RoutingState(task_ids=torch.tensor([0, 1, 2, 0, 1]), noise=False)
    assert torch.equal(router(quiet, x).weights, router.eval()(quiet, x).weights)
    noisy = state([0, 1, 2, 0, 1])
    assert not torch.equal(router.train()(noisy, x).weights, router.eval()(noisy, x).weights)


def test_frozen_task_routers_stay_bit_identical_through_adamw() -> None:
    router = trained_router(noisy=True).train()
    router.freeze_tasks([0, 2])
    before = router.effective()["weight"].detach().clone()
    optimizer = torch.optim.AdamW(router.parameters(), lr=0.1, weight_decay=0.1)
    for step in range(5):
        gate = router(state([0, 1, 2, 1, 0]), hidden(seed=step))
        loss = (gate.weights * torch.arange(EXPERTS)).sum() + gate.logits.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = router.effective()["weight"]
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    assert not torch.equal(after[1], before[1])


def test_growth_keeps_old_tasks_decisions_and_adds_zero_routers() -> None:
    router = trained_router().eval()
    router.freeze_tasks([1])
    x, old = hidden(), state([0, 1, 2, 1, 0])
    before = router(old, x)
    router.grow(EXPERTS + 3, TASKS + 2)
    after = router(old, x)
    assert torch.equal(after.weights[:, :EXPERTS], before.weights)
    assert torch.equal(
        after.weights[:, EXPERTS:], torch.zeros(5, 3)
    )  # new experts are not old tasks' to choose
    assert router.frozen_rows == [1]
    new = router(state([TASKS, TASKS + 1]), x[:2])
    assert torch.equal(new.logits, torch.zeros(2, EXPERTS + 3))  # a new task's router starts at zero
    assert ((new.weights > 0).sum(-1) == 2).all()


def test_frozen_task_routers_stay_frozen_after_save_and_load(tmp_path) -> None:
    import loramix
    from loramix.inject import get_info
    from tests.models import tiny_bert

    model = tiny_bert()
    loramix.inject(
        model, {"num_experts": 4, "num_tasks": 2, "router": "per-task", "top_k": 2, "targets": ["query"]}
    )
    get_info(model).layers[0].router.freeze_tasks([1])
    loramix.save(model, tmp_path / "saved")
    loaded = loramix.load(tiny_bert(), tmp_path / "saved")
    assert get_info(loaded).layers[0].router.frozen_rows == [1]
    assert get_info(loaded).layers[1].router.frozen_rows == []
