"""TwD (MoLA, Zhou et al. 2024) against a literal double-loop reference, plus its behaviour and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramix.errors import ConfigError, RoutingError
from loramix.losses import TwDProjection, twd_loss


def twd_reference(
    router_logits: torch.Tensor,
    task_ids: torch.Tensor,
    projection: torch.nn.Module | None = None,
    tau: float = 1.0,
    mask: torch.Tensor | None = None,
) -> float:
    """The definition, literally: average tokens, project, normalise, then loop over every ordered pair."""
    n = router_logits.shape[0]
    logits = router_logits.detach().float()
    samples = []
    for i in range(n):
        if logits.dim() == 3:
            tokens = [
                logits[i, s].tolist() for s in range(logits.shape[1]) if mask is None or bool(mask[i, s])
            ]
            num_experts = logits.shape[2]
            z = [sum(tok[e] for tok in tokens) / len(tokens) if tokens else 0.0 for e in range(num_experts)]
        else:
            z = logits[i].tolist()
        if projection is not None:
            with torch.no_grad():
                z = projection(torch.tensor(z, dtype=torch.float32)).tolist()
        norm = max(math.sqrt(sum(v * v for v in z)), 1e-12)
        samples.append([v / norm for v in z])

    def similarity(i: int, j: int) -> float:
        if i == j:
            return 0.0
        return math.exp(sum(a * b for a, b in zip(samples[i], samples[j])) / tau)

    terms = []
    for i in range(n):
        denominator = sum(similarity(i, k) for k in range(n) if k != i)
        for j in range(n):
            if i != j and int(task_ids[i]) == int(task_ids[j]):
                terms.append(-math.log(similarity(i, j) / denominator))
    return sum(terms) / len(terms) if terms else 0.0


LAYOUTS = {
    "mixed_with_singletons": [0, 0, 1, 2, 2, 2, 3, 0],
    "all_one_task": [5] * 7,
    "each_its_own_task": list(range(6)),
    "two_tasks": [1, 0, 1, 0, 1, 0, 0, 1, 1],
    "one_sample": [3],
    "two_samples_same_task": [2, 2],
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
@pytest.mark.parametrize("num_experts", [1, 3, 8])
@pytest.mark.parametrize("use_projection", [False, True])
@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_matches_loop_reference(
    layout: list[int], num_experts: int, use_projection: bool, tau: float
) -> None:
    torch.manual_seed(len(layout) * 100 + num_experts)
    task_ids = torch.tensor(layout)
    logits = torch.randn(len(layout), num_experts) * 2
    projection = TwDProjection(num_experts=num_experts, proj_dim=5) if use_projection else None
    got = twd_loss(logits, task_ids, projection=projection, tau=tau)
    want = twd_reference(logits, task_ids, projection, tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("use_mask", [False, True])
def test_per_token_logits_match_reference(use_mask: bool) -> None:
    torch.manual_seed(1)
    n, t, e = 7, 5, 4
    logits = torch.randn(n, t, e)
    task_ids = torch.tensor([0, 1, 0, 1, 2, 0, 1])
    mask = torch.rand(n, t) > 0.4 if use_mask else None
    if mask is not None:
        mask[:, 0] = True
        mask[3] = False  # a sample with no real token at all
    got = twd_loss(logits, task_ids, mask=mask, tau=0.7)
    assert got.item() == pytest.approx(twd_reference(logits, task_ids, tau=0.7, mask=mask), abs=1e-5)


def test_mask_ignores_padding_values() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 4, 3)
    task_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[:, 3] = False
    noisy = logits.clone()
    noisy[:, 3] = 1e3
    assert torch.allclose(twd_loss(logits, task_ids, mask=mask), twd_loss(noisy, task_ids, mask=mask))
    assert torch.allclose(twd_loss(logits[:, :3], task_ids), twd_loss(noisy, task_ids, mask=mask))


@settings(max_examples=40, deadline=None)
@given(
    layout=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=12),
    num_experts=st.integers(min_value=1, max_value=6),
    tau=st.floats(min_value=0.2, max_value=3.0),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_property_matches_reference(layout: list[int], num_experts: int, tau: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(layout), num_experts, generator=generator)
    task_ids = torch.tensor(layout)
    got = twd_loss(logits, task_ids, tau=tau).item()
    assert got == pytest.approx(twd_reference(logits, task_ids, tau=tau), abs=1e-5, rel=1e-5)
    permutation = torch.randperm(len(layout), generator=generator)
    assert twd_loss(logits[permutation], task_ids[permutation], tau=tau).item() == pytest.approx(
        got, abs=1e-5
    )


def test_lower_when_tasks_are_separated() -> None:
    torch.manual_seed(3)
    task_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    centres = torch.eye(3) * 4  # one well-separated direction per task
    noise = 0.1 * torch.randn(9, 3)
    separated = centres[task_ids] + noise  # same task close, different tasks far
    mixed = centres[torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])] + noise  # the reverse
    assert twd_loss(separated, task_ids) < twd_loss(mixed, task_ids)
    assert twd_loss(separated, task_ids, tau=0.1) < twd_loss(mixed, task_ids, tau=0.1)


def test_gradient_reaches_logits_and_projection() -> None:
    torch.manual_seed(4)
    logits = torch.randn(8, 3, 4, requires_grad=True)
    projection = TwDProjection(num_experts=4)
    task_ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])  # task 2 has one sample
    twd_loss(logits, task_ids, projection=projection, tau=0.5).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    weight_grad = projection.linear.weight.grad
    assert weight_grad is not None and torch.isfinite(weight_grad).all() and weight_grad.abs().sum() > 0


@pytest.mark.parametrize("layout", [[0, 1, 2, 3], [7]], ids=["each_its_own_task", "one_sample"])
def test_no_pairs_gives_connected_zero(layout: list[int]) -> None:
    logits = torch.randn(len(layout), 4, requires_grad=True)
    loss = twd_loss(logits, torch.tensor(layout), projection=TwDProjection(num_experts=4))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_low_precision_input_is_computed_in_fp32() -> None:
    torch.manual_seed(5)
    logits = torch.randn(6, 4)
    task_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    got = twd_loss(logits.to(torch.bfloat16), task_ids)
    assert got.dtype == torch.float32
    want = twd_reference(logits.to(torch.bfloat16), task_ids)
    assert got.item() == pytest.approx(want, abs=1e-5)


def test_bad_inputs_raise() -> None:
    logits = torch.randn(4, 3)
    with pytest.raises(RoutingError, match="task_ids"):
        twd_loss(logits, torch.tensor([0, 1, 0]))
    with pytest.raises(RoutingError, match="mask"):
        twd_loss(logits, torch.tensor([0, 1, 0, 1]), mask=torch.ones(4, 2))
    with pytest.raises(RoutingError, match="mask"):
        twd_loss(torch.randn(4, 2, 3), torch.tensor([0, 1, 0, 1]), mask=torch.ones(4, 3))
    with pytest.raises(RoutingError, match="shape"):
        twd_loss(torch.randn(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="tau"):
        twd_loss(logits, torch.tensor([0, 1, 0, 1]), tau=0.0)
    with pytest.raises(ConfigError):
        TwDProjection(num_experts=0)


def test_gates_space_is_the_loss_on_the_softmax() -> None:
    torch.manual_seed(6)
    logits, task_ids = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    got = twd_loss(logits, task_ids, space="gates", tau=0.1)
    assert got.item() == pytest.approx(twd_reference(logits.softmax(-1), task_ids, tau=0.1), abs=1e-5)


def test_gates_space_asks_for_different_top_experts() -> None:
    """Two tasks whose logits point apart but share their top expert fool TwD on logits, not on gates."""
    task_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    shared_top = torch.tensor([[3.0, 3.0, -3.0]] * 3 + [[3.0, -3.0, 3.0]] * 3)  # cosine -1/3, both expert 0
    own_expert = torch.tensor([[4.0, 0.0, 0.0]] * 3 + [[0.0, 4.0, 0.0]] * 3)  # cosine 0, experts 0 and 1
    assert twd_loss(shared_top, task_ids, tau=0.5) < twd_loss(own_expert, task_ids, tau=0.5) - 0.05
    gates_shared = twd_loss(shared_top, task_ids, tau=0.5, space="gates")
    assert twd_loss(own_expert, task_ids, tau=0.5, space="gates") < gates_shared - 0.2


def test_unknown_space_raises() -> None:
    with pytest.raises(ConfigError, match="space"):
        twd_loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), space="probs")  # type: ignore[arg-type]
