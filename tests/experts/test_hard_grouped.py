"""The decoding form of the hard gate (`grouped.hard_grouped`: rows sorted by expert, grouped GEMMs, no weight copies)
against `ops.loop_reference`, alone, inside `ops.hard` and inside the fused `ops.linear`; and the cases where the
gather + `bmm` form must run instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loramix.experts import grouped, ops
from tests.experts.test_ops import make_weights

SCALING = 1.7
SHAPES = [  # (n, t, i, o, e, r): t <= r, every width a multiple of 4 (fp32 rows aligned to 16 bytes)
    (16, 1, 32, 48, 16, 8),  # one token per sample, one sample per expert: a decoding step
    (6, 1, 8, 12, 4, 4),  # more samples than experts
    (3, 4, 8, 4, 5, 4),  # a few tokens per sample, some experts unused
    (1, 2, 4, 8, 3, 4),
]


def inputs(n: int, t: int, i: int, o: int, e: int, r: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    A, B = make_weights(e, r, i, o, "none", seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, t, i, generator=generator)
    experts = torch.randint(0, e, (n,), generator=generator)
    return x, A, B, experts


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hard_grouped_equals_loop_reference(shape: tuple[int, ...]) -> None:
    x, A, B, experts = inputs(*shape)
    n, t, _, o, _, _ = shape
    want = ops.loop_reference(x, A, B, experts, SCALING)
    with torch.no_grad():
        assert grouped.prefers_hard_grouped(x, A, B)
        y, rows = grouped.hard_grouped(x, A, B, experts, SCALING)
        got = x.new_zeros(n * t, o).index_add_(0, rows, y).view(n, t, o)
        through_hard = ops.hard(x, A, B, experts, SCALING)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(through_hard, want, atol=1e-5, rtol=0)
    assert sorted(rows.tolist()) == list(range(n * t))  # every token row exactly once


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("input_major", [False, True], ids=["linear", "conv1d"])
def test_fused_linear_takes_the_grouped_form_in_inference(shape: tuple[int, ...], input_major: bool) -> None:
    """`ops.linear` without autograd equals the base layer plus the loop reference, and the autograd form."""
    x, A, B, experts = inputs(*shape)
    _, _, i, o, _, _ = shape
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn((i, o) if input_major else (o, i), generator=generator)
    bias = torch.randn(o, generator=generator)
    base = x @ weight + bias if input_major else F.linear(x, weight, bias)
    want = base + ops.loop_reference(x, A, B, experts, SCALING)
    args = (x, weight, bias, A, B, SCALING)
    with torch.no_grad():
        got = ops.linear(*args, gate=experts, input_major=input_major)
    with_autograd = ops.linear(*args, gate=experts, input_major=input_major)  # the gather + bmm form
    assert got.shape == (*x.shape[:-1], o)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, with_autograd.detach(), atol=1e-5, rtol=1e-5)


def test_bf16_grouped_close_to_fp32_reference() -> None:
    x, A, B, experts = inputs(8, 1, 16, 24, 4, 8)
    want = ops.loop_reference(x, A, B, experts, SCALING)
    with torch.no_grad():
        assert grouped.prefers_hard_grouped(x.bfloat16(), A.bfloat16(), B.bfloat16())
        got = ops.hard(x.bfloat16(), A.bfloat16(), B.bfloat16(), experts, SCALING)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 3e-2 * want.abs().max()


def test_gather_form_runs_where_the_grouped_one_does_not_apply() -> None:
    x, A, B, experts = inputs(4, 1, 8, 12, 3, 4)
    assert not grouped.prefers_hard_grouped(x, A, B)  # autograd on: training keeps the fused gather form
    with torch.no_grad():
        assert grouped.prefers_hard_grouped(x, A, B)
        assert not grouped.prefers_hard_grouped(x, A, B, keep=torch.tensor([True, False, False, True]))
        assert not grouped.prefers_hard_grouped(x.expand(4, 5, 8), A, B)  # t > r: prefill, gathers amortised
        assert not grouped.prefers_hard_grouped(x, A[:1], B)  # shared A: one plain matmul already
        assert not grouped.prefers_hard_grouped(x[..., :7], A[..., :7], B)  # rows not 16-byte aligned
        keep = torch.tensor([True, False, False, True])
        kept = ops.hard(x, A, B, experts, SCALING, keep=keep)
    assert torch.equal(kept[keep], torch.zeros_like(kept[keep]))
