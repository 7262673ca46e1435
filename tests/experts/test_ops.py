"""Every fast op in `experts/ops.py` against `ops.loop_reference`: outputs and gradients, every gate kind, every
share mode, a few shapes (parametrised and drawn by hypothesis), fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramix.experts import ops

GATE_KINDS = ["hard", "sample", "token", "topk"]
SHARES = ["none", "A", "B"]
SHAPES = [  # (n, t, i, o, e, r)
    (1, 1, 1, 1, 1, 1),
    (3, 4, 6, 5, 3, 2),
    (2, 7, 9, 4, 4, 3),
    (5, 1, 3, 8, 2, 4),
]
SCALING = 1.7


def make_weights(
    num_experts: int, rank: int, in_features: int, out_features: int, share: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    num_a = 1 if share == "A" else num_experts
    num_b = 1 if share == "B" else num_experts
    A = torch.randn(num_a, rank, in_features, generator=generator) / in_features**0.5
    B = torch.randn(num_b, out_features, rank, generator=generator) / rank**0.5
    return A, B


def make_gate(kind: str, n: int, t: int, num_experts: int, seed: int = 1) -> torch.Tensor:
    """A long `(n,)` tensor of experts (hard), or float gates `(n, e)` / `(n, t, e)` whose rows sum to 1."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "hard":
        return torch.randint(0, num_experts, (n,), generator=generator)
    shape = (n, num_experts) if kind == "sample" else (n, t, num_experts)
    probs = torch.softmax(torch.randn(shape, generator=generator), dim=-1)
    if kind != "topk":
        return probs
    k = min(2, num_experts)
    top_p, top_i = probs.topk(k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))


def fast(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if gate.dtype == torch.long:
        return ops.hard(x, A, B, gate, SCALING)
    return ops.dense(x, A, B, gate, SCALING)


def assert_matches_reference(
    n: int,
    t: int,
    i: int,
    o: int,
    e: int,
    r: int,
    share: str,
    kind: str,
    seed: int = 0,
    *,
    device: str = "cpu",
    atol: float = 1e-5,
    rtol: float = 0.0,
) -> None:
    """The fast op on `device` against the loop reference on CPU: outputs and every input's gradient."""
    A, B = make_weights(e, r, i, o, share, seed)
    x = torch.randn(n, t, i, generator=torch.Generator().manual_seed(seed + 7))
    gate = make_gate(kind, n, t, e, seed + 3)
    w = torch.randn(n, t, o, generator=torch.Generator().manual_seed(seed + 11))

    leaves = [x, A, B] + ([gate] if gate.is_floating_point() else [])
    grads = []
    outputs = []
    for op, where in ((fast, device), (lambda *args: ops.loop_reference(*args, SCALING), "cpu")):
        inputs = [leaf.to(where, copy=True).requires_grad_(True) for leaf in leaves]  # fresh leaves per op
        g = inputs[3] if len(inputs) == 4 else gate.to(where)
        out = op(inputs[0], inputs[1], inputs[2], g)
        (out * w.to(where)).sum().backward()
        outputs.append(out.detach().cpu())
        grads.append([leaf.grad.cpu() for leaf in inputs])

    assert outputs[0].shape == (n, t, o)
    torch.testing.assert_close(outputs[0], outputs[1], atol=atol, rtol=rtol)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("kind", GATE_KINDS)
def test_fast_op_equals_loop_reference(shape: tuple[int, ...], share: str, kind: str) -> None:
    assert_matches_reference(*shape, share=share, kind=kind)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 4),
    t=st.integers(1, 5),
    i=st.integers(1, 8),
    o=st.integers(1, 8),
    e=st.integers(1, 5),
    r=st.integers(1, 4),
    share=st.sampled_from(SHARES),
    kind=st.sampled_from(GATE_KINDS),
    seed=st.integers(0, 1000),
)
def test_fast_op_equals_loop_reference_drawn(
    n: int, t: int, i: int, o: int, e: int, r: int, share: str, kind: str, seed: int
) -> None:
    assert_matches_reference(n, t, i, o, e, r, share, kind, seed)


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("kind", GATE_KINDS)
def test_bf16_close_to_fp32_reference(share: str, kind: str) -> None:
    n, t, i, o, e, r = 3, 6, 16, 12, 4, 4
    A, B = make_weights(e, r, i, o, share)
    x = torch.randn(n, t, i, generator=torch.Generator().manual_seed(5))
    gate = make_gate(kind, n, t, e)
    x16, A16, B16 = x.bfloat16(), A.bfloat16(), B.bfloat16()
    g16 = gate if kind == "hard" else gate.bfloat16()
    out = fast(x16, A16, B16, g16)
    assert out.dtype == torch.bfloat16
    want = ops.loop_reference(x16.float(), A16.float(), B16.float(), gate, SCALING)
    error = (out.float() - want).abs().max()
    assert error <= 3e-2 * want.abs().max()


@pytest.mark.parametrize("batch_shape", [(4,), (3, 5), (2, 3, 4)])
def test_single_equals_loop_reference_with_gate_of_ones(batch_shape: tuple[int, ...]) -> None:
    A, B = make_weights(1, 3, 6, 5, "none")
    x = torch.randn(*batch_shape, 6)
    out = ops.single(x, A, B, SCALING)
    x3 = x.reshape(batch_shape[0], -1, 6)
    want = ops.loop_reference(x3, A, B, torch.ones(batch_shape[0], 1), SCALING)
    assert out.shape == (*batch_shape, 5)
    torch.testing.assert_close(out.reshape(want.shape), want, atol=1e-5, rtol=0)


def test_hard_equals_dense_with_one_hot_gate() -> None:
    A, B = make_weights(3, 2, 6, 5, "none")
    x = torch.randn(4, 3, 6)
    experts = torch.tensor([2, 0, 2, 1])
    one_hot = torch.nn.functional.one_hot(experts, 3).float()
    torch.testing.assert_close(
        ops.hard(x, A, B, experts, SCALING), ops.dense(x, A, B, one_hot, SCALING), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("kind", GATE_KINDS)
def test_dropout_acts_on_the_rank_hidden(share: str, kind: str) -> None:
    """The dropout callable sees the r-wide (or e*r-wide) hidden, never x, and zeroing it zeroes the delta."""
    A, B = make_weights(3, 2, 6, 5, share)
    x = torch.randn(4, 3, 6)
    gate = make_gate(kind, 4, 3, 3)
    seen: list[int] = []

    def drop_all(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape[-1])
        return h * 0

    args = (x, A, B, gate, SCALING, drop_all)
    out = ops.hard(*args) if kind == "hard" else ops.dense(*args)
    assert torch.equal(out, torch.zeros_like(out))
    assert seen and all(width in (2, 3 * 2) for width in seen)


def test_stacked_B_layout() -> None:
    B = torch.randn(3, 5, 2)
    stacked = ops.stacked_B(B)
    assert stacked.shape == (5, 6)
    for e in range(3):
        assert torch.equal(stacked[:, e * 2 : (e + 1) * 2], B[e])


@pytest.mark.parametrize("kind", ["single", *GATE_KINDS])
@pytest.mark.parametrize("input_major", [False, True], ids=["linear", "conv1d"])
def test_fused_linear_without_a_graph_skips_the_custom_nodes_and_equals_their_forward(
    kind: str, input_major: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ops.linear` with nothing to record (no_grad, or frozen weights) runs the custom nodes' forward as plain
    functions: the same output, bit for bit, as the recorded form; with a gradient to take it records them."""
    n, t, i, o, e, r = 3, 4, 6, 5, 3, 2
    A, B = make_weights(e, r, i, o, "none")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(n, t, i, generator=generator)
    weight = torch.randn((i, o) if input_major else (o, i), generator=generator)
    bias = torch.randn(o, generator=generator)
    options: dict = {"input_major": input_major}
    if kind == "single":
        A, B = A[:1], B[:1]
    elif kind == "hard":
        options |= {"gate": make_gate(kind, n, t, e), "keep": torch.tensor([False, True, False])}
    elif kind == "topk":
        weights, indices = (
            torch.softmax(torch.randn(n, 2, generator=generator), -1),
            torch.tensor([[0, 2]] * n),
        )
        options |= {"gate": weights, "indices": indices}
    else:
        options |= {"gate": make_gate(kind, n, t, e)}
    recorded = ops.linear(x, weight, bias, A.requires_grad_(), B, SCALING, **options)  # A trains: recorded
    assert recorded.grad_fn is not None
    applied = []
    for node in (ops._BaseAndProjectIn, ops._AddProjectOut):
        monkeypatch.setattr(node, "apply", lambda *args, node=node: applied.append(node) or None)
    with torch.no_grad():
        plain = ops.linear(x, weight, bias, A, B, SCALING, **options)
    frozen = ops.linear(x, weight, bias, A.detach(), B, SCALING, **options)  # grad on, nothing to train
    assert not applied and frozen.grad_fn is None
    assert torch.equal(plain, recorded.detach()) and torch.equal(frozen, recorded.detach())
