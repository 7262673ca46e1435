"""Load balancing (Switch Transformer) and router z-loss (ST-MoE) against literal loop references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramix.errors import RoutingError
from loramix.losses import load_balance_loss, router_z_loss


def _items(lead_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if len(lead_shape) == 1:
        return [(i,) for i in range(lead_shape[0])]
    return [(i, s) for i in range(lead_shape[0]) for s in range(lead_shape[1])]


def load_balance_reference(
    probs: torch.Tensor,
    indices: torch.Tensor | None,
    num_experts: int,
    mask: torch.Tensor | None = None,
) -> float:
    """E * sum_e f_e * P_e, counting every item and every one of its k choices in a loop."""
    lead_shape = tuple(probs.shape[:-1])
    fraction = [0.0] * num_experts
    mean_prob = [0.0] * num_experts
    count = 0
    for item in _items(lead_shape):
        if mask is not None and not bool(mask[item]):
            continue
        count += 1
        row = probs[item].tolist()
        if indices is None:
            choices = [max(range(num_experts), key=lambda e, row=row: row[e])]
        elif tuple(indices.shape) == lead_shape:
            choices = [int(indices[item])]
        else:
            choices = [int(c) for c in indices[item].tolist()]
        for choice in choices:
            fraction[choice] += 1.0 / len(choices)
        for e in range(num_experts):
            mean_prob[e] += row[e]
    if count == 0:
        return 0.0
    return num_experts * sum((fraction[e] / count) * (mean_prob[e] / count) for e in range(num_experts))


def z_loss_reference(logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    terms = []
    for item in _items(tuple(logits.shape[:-1])):
        if mask is not None and not bool(mask[item]):
            continue
        terms.append(math.log(sum(math.exp(v) for v in logits[item].tolist())) ** 2)
    return sum(terms) / len(terms) if terms else 0.0


def _random_routing(lead_shape: tuple[int, ...], num_experts: int, k: int | None, generator: torch.Generator):
    probs = torch.softmax(torch.randn(*lead_shape, num_experts, generator=generator) * 2, dim=-1)
    if k is None:
        return probs, None
    if k == 0:  # top-1 indices without a k axis
        return probs, torch.randint(num_experts, lead_shape, generator=generator)
    return probs, torch.randint(num_experts, (*lead_shape, k), generator=generator)


@pytest.mark.parametrize("lead_shape", [(1,), (9,), (4, 6)], ids=["one", "per_sample", "per_token"])
@pytest.mark.parametrize("k", [None, 0, 1, 2, 3], ids=["argmax", "top1_flat", "k1", "k2", "k3"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_load_balance_matches_reference(lead_shape: tuple[int, ...], k: int | None, use_mask: bool) -> None:
    generator = torch.Generator().manual_seed(sum(lead_shape) * 10 + (k or 0))
    num_experts = 5
    probs, indices = _random_routing(lead_shape, num_experts, k, generator)
    mask = torch.rand(lead_shape, generator=generator) > 0.3 if use_mask else None
    got = load_balance_loss(probs, indices, num_experts=num_experts, mask=mask)
    want = load_balance_reference(probs, indices, num_experts, mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, abs=1e-5, rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=6),
    tokens=st.one_of(st.none(), st.integers(min_value=1, max_value=5)),
    num_experts=st.integers(min_value=1, max_value=6),
    k=st.one_of(st.none(), st.integers(min_value=0, max_value=3)),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_load_balance_property(
    n: int, tokens: int | None, num_experts: int, k: int | None, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    lead_shape = (n,) if tokens is None else (n, tokens)
    probs, indices = _random_routing(lead_shape, num_experts, k, generator)
    mask = torch.rand(lead_shape, generator=generator) > 0.3
    got = load_balance_loss(probs, indices, num_experts=num_experts, mask=mask).item()
    assert got == pytest.approx(load_balance_reference(probs, indices, num_experts, mask), abs=1e-5, rel=1e-5)
    # f and P are distributions over experts, so the loss lies in [0, E].
    assert -1e-6 <= got <= num_experts + 1e-5


@pytest.mark.parametrize("k", [1, 2])
def test_uniform_routing_gives_one(k: int) -> None:
    num_experts, n, t = 4, 2, 8
    probs = torch.full((n, t, num_experts), 1.0 / num_experts)
    # every expert chosen equally often: token s picks experts s, s+1, ..., s+k-1 (mod E)
    indices = (torch.arange(t)[:, None] + torch.arange(k)[None, :]) % num_experts  # (t, k)
    indices = indices.expand(n, t, k)
    loss = load_balance_loss(probs, indices, num_experts=num_experts)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_collapsed_routing_is_penalised() -> None:
    num_experts = 4
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(16, num_experts)
    loss = load_balance_loss(collapsed, num_experts=num_experts)
    assert loss.item() > 1.0
    assert loss.item() == pytest.approx(num_experts * 0.97, abs=1e-5)
    one_hot = torch.nn.functional.one_hot(torch.zeros(16, dtype=torch.long), num_experts).float()
    assert load_balance_loss(one_hot, num_experts=num_experts).item() == pytest.approx(num_experts)


def test_load_balance_mask_excludes_padding() -> None:
    generator = torch.Generator().manual_seed(7)
    num_experts = 4
    probs, indices = _random_routing((3, 5), num_experts, 2, generator)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 3:] = False
    padded_probs, padded_indices = probs.clone(), indices.clone()
    padded_probs[:, 3:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # padding collapsed onto expert 0
    padded_indices[:, 3:] = 0
    masked = load_balance_loss(padded_probs, padded_indices, num_experts=num_experts, mask=mask)
    trimmed = load_balance_loss(probs[:, :3], indices[:, :3], num_experts=num_experts)
    assert masked.item() == pytest.approx(trimmed.item(), abs=1e-6)
    per_sample = load_balance_loss(
        probs[:, 0], num_experts=num_experts, mask=torch.tensor([True, False, True])
    )
    assert per_sample.item() == pytest.approx(
        load_balance_loss(probs[[0, 2], 0], num_experts=num_experts).item(), abs=1e-6
    )


def test_load_balance_gradient_reaches_logits() -> None:
    logits = torch.randn(4, 6, 3, requires_grad=True)
    load_balance_loss(torch.softmax(logits, dim=-1), num_experts=3).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_load_balance_bad_inputs_raise() -> None:
    probs = torch.softmax(torch.randn(4, 5, 3), dim=-1)
    with pytest.raises(RoutingError, match="num_experts"):
        load_balance_loss(probs, num_experts=4)
    with pytest.raises(RoutingError, match="expert_indices"):
        load_balance_loss(probs, torch.zeros(4, dtype=torch.long), num_experts=3)
    with pytest.raises(RoutingError, match="mask"):
        load_balance_loss(probs, num_experts=3, mask=torch.ones(4))
    with pytest.raises(RoutingError, match="shape"):
        load_balance_loss(torch.rand(2, 3, 4, 5), num_experts=5)


@pytest.mark.parametrize("shape", [(1, 3), (7, 5), (3, 4, 6)])
@pytest.mark.parametrize("use_mask", [False, True])
def test_z_loss_matches_reference(shape: tuple[int, ...], use_mask: bool) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=generator) * 3
    mask = torch.rand(shape[:-1], generator=generator) > 0.3 if use_mask else None
    got = router_z_loss(logits, mask=mask)
    assert got.item() == pytest.approx(z_loss_reference(logits, mask), abs=1e-5, rel=1e-5)


def test_z_loss_values_mask_and_gradient() -> None:
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False
    padded = logits.clone()
    padded[1, 2:] = 100.0
    assert router_z_loss(padded, mask=mask).item() == pytest.approx(router_z_loss(logits, mask=mask).item())
    large = torch.randn(8, 4, requires_grad=True)
    loss = router_z_loss(large.to(torch.bfloat16))
    assert loss.dtype == torch.float32
    loss.backward()
    assert large.grad is not None and large.grad.abs().sum() > 0
    with pytest.raises(RoutingError, match="mask"):
        router_z_loss(logits, mask=torch.ones(2))
