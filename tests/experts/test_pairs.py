"""A per-sample gate whose rows name few experts (router 'task' blending the tasks' experts): each sample's first
expert as `ops.hard` with its weight, the further (sample, expert) pairs by `ops.add_pairs`, against
`ops.loop_reference` and the dense op, in outputs and gradients, alone, fused with the base (`ops.linear`) and in a
LoRA layer fed by router 'task'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loramix.experts import ops
from loramix.routers.state import RoutingState
from loramix.routers.task import TaskRouter
from tests.experts.test_ops import make_weights

SCALING = 1.7
SHAPES = [  # (n, t, i, o, e, r)
    (6, 5, 8, 12, 4, 4),  # t > r: the gather form
    (8, 1, 16, 24, 5, 8),  # t <= r, widths 16-byte aligned: the grouped form without autograd
    (3, 2, 4, 8, 3, 4),
]


def sparse_gate(n: int, e: int, seed: int = 1) -> torch.Tensor:
    """`(n, e)` rows summing to 1 that name one to three experts (most name one), and a row of two equal ones."""
    generator = torch.Generator().manual_seed(seed)
    gate = torch.zeros(n, e)
    for row in range(n):
        named = torch.randperm(e, generator=generator)[: [1, 1, 2, 3][row % 4] if e > 2 else 1 + row % 2]
        gate[row, named] = torch.rand(len(named), generator=generator) + 0.1
    gate[0, :2] = 1.0
    return gate / gate.sum(-1, keepdim=True)


def first_and_pairs(gate: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The plain form: each row's heaviest expert, then every other named expert as a (row, expert) pair."""
    first = gate.argmax(-1)
    pairs = [(row, e) for row in range(gate.shape[0]) for e in range(gate.shape[1]) if gate[row, e] > 0]
    pairs = torch.tensor([p for p in pairs if p[1] != first[p[0]]], dtype=torch.long).view(-1, 2)
    return first, gate.gather(-1, first[:, None])[:, 0], pairs, gate[pairs[:, 0], pairs[:, 1]]


def by_pairs(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    first, first_weight, pairs, pair_weight = first_and_pairs(gate)
    out = ops.hard(x, A, B, first, SCALING, sample_weight=first_weight)
    return ops.add_pairs(out, x, A, B, pairs, pair_weight, SCALING)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("share", ["none", "A", "B"])
def test_first_expert_and_pairs_equal_the_loop_reference_and_the_dense_gradients(
    shape: tuple[int, ...], share: str
) -> None:
    n, t, i, o, e, r = shape
    A, B = make_weights(e, r, i, o, share)
    x = torch.randn(n, t, i, generator=torch.Generator().manual_seed(3))
    gate = sparse_gate(n, e)
    want = ops.loop_reference(x, A, B, gate, SCALING)
    with torch.no_grad():
        torch.testing.assert_close(by_pairs(x, A, B, gate), want, atol=1e-5, rtol=1e-5)
    leaves = [tensor.clone().requires_grad_() for tensor in (x, A, B)]
    got = by_pairs(*leaves, gate)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dense = [tensor.clone().requires_grad_() for tensor in (x, A, B)]
    upstream = torch.randn_like(want)
    (got * upstream).sum().backward()
    (ops.dense(*dense, gate, SCALING) * upstream).sum().backward()
    for mine, theirs in zip(leaves, dense, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("input_major", [False, True], ids=["linear", "conv1d"])
def test_fused_linear_with_weighed_first_experts_plus_pairs_equals_base_plus_loop(input_major: bool) -> None:
    n, t, i, o, e, r = SHAPES[1]
    A, B = make_weights(e, r, i, o, "none")
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(n, t, i, generator=generator)
    weight = torch.randn((i, o) if input_major else (o, i), generator=generator)
    bias = torch.randn(o, generator=generator)
    gate = sparse_gate(n, e)
    want = (x @ weight + bias if input_major else F.linear(x, weight, bias)) + ops.loop_reference(
        x, A, B, gate, SCALING
    )
    first, first_weight, pairs, pair_weight = first_and_pairs(gate)
    for grad in (False, True):  # the grouped form, then the gather form under autograd
        with torch.set_grad_enabled(grad):
            out = ops.linear(
                x,
                weight,
                bias,
                A,
                B,
                SCALING,
                gate=first,
                sample_weight=first_weight,
                input_major=input_major,
            )
            out = ops.add_pairs(out, x, A, B, pairs, pair_weight, SCALING)
        torch.testing.assert_close(out.detach(), want, atol=1e-4, rtol=1e-5)


def test_router_task_names_each_samples_further_experts_as_pairs() -> None:
    """The gate router 'task' makes from weights over the tasks: its first index is each row's heaviest expert
    and its pairs are exactly the other experts with a weight; tasks sharing an expert add up."""
    router = TaskRouter(4, 3, task_to_expert=[0, 1, 2, 2])
    weights = torch.tensor(
        [[0.0, 1.0, 0.0, 0.0], [0.2, 0.0, 0.5, 0.3], [0.0, 0.0, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0]]
    )
    gate = router(RoutingState(task_ids=torch.tensor([1, 0, 3, 2]), task_weights=weights), None)
    assert gate.pairs is not None and gate.indices is not None
    assert gate.indices[:, 0].tolist() == [
        1,
        2,
        2,
        0,
    ]  # a row of zeros keeps its task's expert (task 3: expert 2)
    assert sorted(map(tuple, gate.pairs.tolist())) == [(1, 0), (3, 1)]
    torch.testing.assert_close(gate.weights[1], torch.tensor([0.2, 0.0, 0.8]))
