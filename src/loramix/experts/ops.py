"""The ops that apply a bank of experts to a layer's input, one per kind of gate, and their loop reference.

Legend: n samples, t tokens, e experts, r rank, i / o in / out features.

All fast ops compute `s * sum_e g_e B_e A_e x` with no Python loop over experts and no host synchronisation:
- `single`: one expert, gate of ones (a plain LoRA);
- `hard`: one expert per sample (a task id): gather each sample's A and B, then `bmm`; in inference with a few
  tokens per sample (decoding), `grouped.hard_grouped` instead: rows sorted by expert, two grouped GEMMs, no
  weight copies;
- `hard` + `add_pairs`: a per-sample gate whose rows mostly name one expert (the tasks' experts blended by an
  auto-selector's posterior): each sample's first expert as `hard`, weighed, and only the further (sample, expert)
  pairs as a second `hard` over copies of their samples' rows;
- `dense`: a soft or top-k gate per sample `(n, e)` or per token `(n, t, e)`: one stacked matmul into `e*r`
  features, scale by the gate, one matmul back;
- `topk`: a top-k gate given by its indices, computing only the k chosen experts: per sample, each sample's k
  experts gathered into one rank-k*r LoRA (`bmm`); per token, the (token, expert) pairs sorted by expert and run as
  one grouped GEMM (`grouped.topk_per_token`). `prefers_topk` says when that beats `dense` (large e*r next to k*r).
Scaling and dropout act on the r-dimensional hidden, which is e*r wide at most, never on x.
`loop_reference` is the obvious per-expert loop; the tests hold every fast op equal to it.

`linear` fuses a `nn.Linear` (or `Conv1D`) base with any of the three: the mixture's output is accumulated into the
base's output by the GEMM itself (`addmm_` / `baddbmm_`), and in backward the experts' input gradient into the
base's. On CPU, where a LoRA's matmuls are memory-bound, the two `(t, o)` / `(t, i)` passes this saves are about a
third of what a plain LoRA costs on top of its base layer (`benchmarks/speed.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from loramix.experts.grouped import (
    Dropout,
    grouped_mm_ok,
    hard_grouped,
    identity,
    prefers_hard_grouped,
    topk_per_token,
    transforms_active,
)


def stacked_B(B: Tensor) -> Tensor:
    """`(e, o, r) -> (o, e*r)`, the layout that turns the mixture's second half into one matmul."""
    e, o, r = B.shape
    return B.permute(1, 0, 2).reshape(o, e * r)


# Layouts. The second projection is applied as `h @ Bt` with `Bt = B^T` stored `(r, o)` contiguous, and the first
# as `x @ A^T` with A `(r, i)`: with these, every matmul of forward and backward whose result has only r (or e*r)
# columns reads its narrow operand transposed, the case CPU BLAS handles at memory speed (measured with MKL, r = 8:
# `g @ B` with B `(o, r)` contiguous takes 2.4x as long as with B `(r, o)` transposed, `g^T h` 3x as long as
# `(h^T g)^T`).


def _project_single(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    return A[0], B[0].t().contiguous()  # (r, i), (r, o)


def _project_hard(A: Tensor, B: Tensor, expert_index: Tensor) -> tuple[Tensor, Tensor]:
    """A shared A (`A.shape[0] == 1`) or B stays one matrix; the others are gathered per sample.

    `index_select` on the experts' dimension copies whole contiguous blocks; indexing (`A[expert_index]`) or
    gathering from the transposed view runs an element-wise kernel that took 10-25x as long on CPU (d = 768,
    r = 8, 16 samples).
    """
    A_in = A[0] if A.shape[0] == 1 else A.index_select(0, expert_index)  # (r, i) or (n, r, i)
    if B.shape[0] == 1:
        return A_in, B[0].t().contiguous()  # (r, o)
    return A_in, B.index_select(0, expert_index).transpose(1, 2).contiguous()  # (n, r, o)


def _project_dense(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    num_experts, r = max(A.shape[0], B.shape[0]), A.shape[1]
    A_in = A[0] if A.shape[0] == 1 else A.reshape(num_experts * r, -1)  # (r or e*r, i)
    Bt = B[0].t().contiguous() if B.shape[0] == 1 else B.transpose(1, 2).reshape(num_experts * r, -1)
    return A_in, Bt  # (r or e*r, o), the transpose of stacked_B(B)


def _mix_single(
    h: Tensor,
    scaling: float,
    dropout: Dropout,
    keep: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """The scaled hidden; `keep` `(n,)` bool zeroes the samples whose output stays the base's, `sample_weight`
    `(n,)` weighs each sample's expert."""
    h = dropout(h) * scaling  # (..., r)
    for factor in (None if keep is None else ~keep, sample_weight):
        if factor is not None:
            h = h * factor.to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
    return h


def _mix_dense(
    h: Tensor, gate: Tensor, num_experts: int, shared: str, scaling: float, dropout: Dropout
) -> Tensor:
    """The gated hidden that the second projection reads: `h` `(n, t, r)` if B is shared, else `(n, t, e*r)`."""
    gate = gate.to(h.dtype)
    gate = gate[:, None, :] if gate.dim() == 2 else gate  # (n, 1 or t, e)
    h = dropout(h) * scaling
    if shared == "A":  # one projection, then e gated copies of it for the stacked B
        return (h[..., None, :] * gate[..., :, None]).flatten(-2)  # (n, t, e*r)
    h = h.unflatten(-1, (num_experts, h.shape[-1] // num_experts)) * gate[..., None]  # (n, t, e, r)
    if shared == "B":  # sum the gated hiddens, then one projection back
        return h.sum(-2)  # (n, t, r)
    return h.flatten(-2)  # (n, t, e*r)


def _shared(A: Tensor, B: Tensor) -> str:
    if A.shape[0] == 1 and B.shape[0] > 1:
        return "A"
    if B.shape[0] == 1 and A.shape[0] > 1:
        return "B"
    return "none"


def _times(h: Tensor, W: Tensor) -> Tensor:
    """`h W` for one matrix W `(k, j)`, or one per sample `(n, k, j)` (then h is `(n, t, k)`)."""
    return h @ W if W.dim() == 2 else torch.bmm(h, W)


def single(x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: Dropout = identity) -> Tensor:
    """One expert with a gate of ones: `s * B A x`. x `(..., i)`, A `(1, r, i)`, B `(1, o, r)`."""
    A_in, Bt = _project_single(A, B)
    h = _mix_single(x @ A_in.t(), scaling, dropout)  # (..., r)
    return h @ Bt  # (..., o)


def hard(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    expert_index: Tensor,
    scaling: float,
    dropout: Dropout = identity,
    *,
    keep: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Each sample through its own expert. x `(n, t, i)`, expert_index `(n,)` long; returns `(n, t, o)`.

    A shared A (`A.shape[0] == 1`) or B is applied as one plain matmul instead of a gather. `keep` `(n,)` bool
    marks samples that get exactly zero (their layer output stays the base's); `sample_weight` `(n,)` scales each
    sample's expert (a blended gate's first expert, see `add_pairs`).
    """
    if prefers_hard_grouped(x, A, B, keep):
        y, rows = hard_grouped(x, A, B, expert_index, scaling, dropout, sample_weight)
        n, t, _ = x.shape
        return x.new_zeros(n * t, B.shape[1]).index_add_(0, rows, y).view(n, t, -1)
    A_in, Bt = _project_hard(A, B, expert_index)
    h = _mix_single(_times(x, A_in.transpose(-1, -2)), scaling, dropout, keep, sample_weight)  # (n, t, r)
    return _times(h, Bt)  # (n, t, o)


def add_pairs(
    out: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    pairs: Tensor,
    pair_weight: Tensor,
    scaling: float,
    dropout: Dropout = identity,
) -> Tensor:
    """`out[s] += w * s * B_e A_e x[s]` for each (sample s, expert e) of `pairs` `(p, 2)` long, w its
    `pair_weight` `(p,)`; x `(n, t, i)`, out `(n, t, o)`. The experts a per-sample gate names beyond each sample's
    first, which `hard` runs with its weight: for a gate whose rows mostly name one expert (an auto-selector's
    posterior over the tasks, mostly sure), this costs the hard op plus one over the few pairs, where `topk`
    gathers k experts for every sample, k the most that any row names. Each pair's rows are copied once; `out` is
    written in place unless autograd records."""
    if not len(pairs):
        return out
    samples, experts = pairs.unbind(1)
    rows = x.index_select(0, samples)  # (p, t, i)
    y = hard(rows, A, B, experts, scaling, dropout, sample_weight=pair_weight)  # (p, t, o)
    return out.index_add(0, samples, y) if torch.is_grad_enabled() else out.index_add_(0, samples, y)


def dense(
    x: Tensor, A: Tensor, B: Tensor, gate: Tensor, scaling: float, dropout: Dropout = identity
) -> Tensor:
    """A gate per sample `(n, e)` or per token `(n, t, e)` over all experts. x `(n, t, i)`; returns `(n, t, o)`.

    A top-k gate is a dense gate with zeros: it costs what a dense one costs, which is the right trade while
    e*r stays small next to the layer's width.
    """
    A_in, Bt = _project_dense(A, B)
    h = x @ A_in.t()  # (n, t, r or e*r)
    h = _mix_dense(h, gate, max(A.shape[0], B.shape[0]), _shared(A, B), scaling, dropout)
    return h @ Bt  # (n, t, o)


def prefers_topk(x: Tensor, A: Tensor, B: Tensor, indices: Tensor) -> bool:
    """Whether `topk` beats `dense` for this top-k gate. Per sample: whenever k < e/2 (k*r columns instead of e*r
    for a gather of k*r rows per sample). Per token: when e*r >= 64*k, on CPU (measured at d = 768, r = 8, k = 2:
    the grouped GEMM's gathers and scatter cost what a dense e*r of about 100 costs; at e = 64 it is 5x faster).
    Shared A or B keeps the dense op."""
    num_experts, rank, k = A.shape[0], A.shape[1], indices.shape[-1]
    if A.shape[0] != B.shape[0] or num_experts < 2 * k or transforms_active():
        return False
    if indices.dim() == 2:
        return True
    return num_experts * rank >= 64 * k and grouped_mm_ok(x, A, B)


def _project_topk_per_sample(A: Tensor, B: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's k experts as one LoRA of rank k*r: `(n, k*r, i)` and `(n, k*r, o)`."""
    n, k = indices.shape
    A_in = A[indices].reshape(n, k * A.shape[1], A.shape[2])  # (n, k*r, i)
    Bt = B.transpose(1, 2)[indices].reshape(n, k * B.shape[2], B.shape[1])  # (n, k*r, o)
    return A_in, Bt


def _mix_topk_per_sample(h: Tensor, weights: Tensor, scaling: float, dropout: Dropout) -> Tensor:
    h = dropout(h) * scaling  # (n, t, k*r)
    k = weights.shape[-1]
    return (h.unflatten(-1, (k, h.shape[-1] // k)) * weights.to(h.dtype)[:, None, :, None]).flatten(-2)


def topk(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    indices: Tensor,
    weights: Tensor,
    scaling: float,
    dropout: Dropout = identity,
) -> Tensor:
    """Only the k chosen experts: `s * sum_j w_j B_{e_j} A_{e_j} x`. x `(n, t, i)`; `indices` long and `weights`
    the gate at them, `(n, k)` per sample or `(n, t, k)` per token; returns `(n, t, o)`. Equal to `dense` with
    the gate that is `weights` at `indices` and zero elsewhere. A and B hold one matrix per expert (no sharing).

    Per sample, the k experts of each sample are gathered into one LoRA of rank k*r (`bmm`). Per token, the
    (token, expert) pairs are sorted by expert, their rows gathered, both projections run as grouped GEMMs over
    the experts' segments (`torch._grouped_mm`, no host synchronisation) and the results `index_add`-ed back.

    Example:
        >>> probs = router_logits.softmax(-1); w, idx = probs.topk(2, dim=-1)  # (n, t, 2)
        >>> delta = topk(x, A, B, idx, w / w.sum(-1, keepdim=True), 2.0)
    """
    if indices.dim() == 2:
        A_in, Bt = _project_topk_per_sample(A, B, indices)
        h = _mix_topk_per_sample(torch.bmm(x, A_in.transpose(1, 2)), weights, scaling, dropout)  # (n, t, k*r)
        return torch.bmm(h, Bt)  # (n, t, o)
    return topk_per_token(x, A, B, indices, weights, scaling, dropout)


# ---- the base layer and the mixture in one pass ----------------------------------------------------------------


def base_and_project_in(
    x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, input_major: bool
) -> tuple[Tensor, Tensor]:
    """`(x W^T + b, x A^T)`: the forward of :class:`_BaseAndProjectIn`, which autograd records."""
    flat_in = x.view(-1, x.shape[-1])  # (n*t, i)
    if input_major:  # what Conv1D.forward runs
        base = torch.addmm(bias, flat_in, weight) if bias is not None else flat_in @ weight
    else:  # what nn.Linear.forward runs on a contiguous input
        base = F.linear(flat_in, weight, bias)
    h = flat_in @ A.t() if A.dim() == 2 else torch.bmm(x, A.transpose(1, 2))
    return base, h


def add_project_out(base: Tensor, h: Tensor, Bt: Tensor) -> Tensor:
    """`base += h Bt` in place: the forward of :class:`_AddProjectOut`, which autograd records."""
    if Bt.dim() == 2:
        base.addmm_(h.reshape(-1, h.shape[-1]), Bt)
    else:
        base.view(*h.shape[:-1], Bt.shape[2]).baddbmm_(h, Bt)
    return base


class _BaseAndProjectIn(torch.autograd.Function):
    """`(x W^T + b, x A^T)` from one node, so that backward writes both input gradients into one buffer.

    x `(n, t, i)`, contiguous; `weight` `(o, i)` (`nn.Linear`), or `(i, o)` when `input_major` (`Conv1D`); A one
    matrix `(r, i)` or one per sample `(n, r, i)`. Returns the base output `(n*t, o)` (flat, so that the next node
    may write into it: autograd forbids writing into a view that a custom node returns) and the hidden,
    `(n*t, r)` or `(n, t, r)`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, input_major):  # type: ignore[override]
        ctx.input_major, ctx.has_bias = input_major, bias is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, A)
        return base_and_project_in(x, weight, bias, A, input_major)

    @staticmethod
    def backward(ctx, grad_base, grad_h):  # type: ignore[override]
        x, weight, A = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = grad_A = None
        flat_in = x.view(-1, x.shape[-1])  # (n*t, i)
        if grad_h is not None and A.dim() == 3:
            grad_h = grad_h.reshape(*x.shape[:-1], A.shape[1])  # (n, t, r)
        if ctx.needs_input_grad[0]:
            if grad_base is not None:
                grad_x = grad_base @ weight.t() if ctx.input_major else grad_base @ weight  # (n*t, i)
            if grad_h is not None:
                if grad_x is None:
                    grad_x = _times(grad_h, A)
                elif A.dim() == 2:
                    grad_x.addmm_(grad_h, A)  # the experts' part accumulates into the base's
                else:
                    grad_x.view(x.shape).baddbmm_(grad_h, A)
            if grad_x is not None:
                grad_x = grad_x.view(x.shape)
        if grad_base is not None and ctx.needs_input_grad[1]:
            grad_weight = flat_in.t() @ grad_base if ctx.input_major else grad_base.t() @ flat_in
        if grad_base is not None and ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_base.sum(0)
        if grad_h is not None and ctx.needs_input_grad[3]:
            if A.dim() == 2:
                grad_A = grad_h.t() @ flat_in  # (r, i)
            else:
                grad_A = torch.bmm(grad_h.transpose(1, 2), x)  # (n, r, i)
        return grad_x, grad_weight, grad_bias, grad_A, None


class _AddProjectOut(torch.autograd.Function):
    """`base += h Bt` in place: the GEMM accumulates into the base output instead of adding a new tensor to it.

    base `(n*t, o)` from `_BaseAndProjectIn`; h `(n, t, r)`; Bt one matrix `(r, o)` or one per sample `(n, r, o)`.
    """

    @staticmethod
    def forward(ctx, base, h, Bt):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, Bt)
        ctx.mark_dirty(base)
        return add_project_out(base, h, Bt)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        h, Bt = ctx.saved_tensors
        if grad is None:
            return None, None, None
        grad_h = grad_Bt = None
        if Bt.dim() == 2:
            if ctx.needs_input_grad[1]:
                grad_h = (grad @ Bt.t()).view(h.shape)  # (n, t, r)
            if ctx.needs_input_grad[2]:
                grad_Bt = h.reshape(-1, h.shape[-1]).t() @ grad  # (r, o)
        else:
            grad3 = grad.reshape(*h.shape[:-1], Bt.shape[2])  # (n, t, o)
            if ctx.needs_input_grad[1]:
                grad_h = torch.bmm(grad3, Bt.transpose(1, 2))  # (n, t, r)
            if ctx.needs_input_grad[2]:
                grad_Bt = torch.bmm(h.transpose(1, 2), grad3)  # (n, r, o)
        return grad, grad_h, grad_Bt


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scaling: float,
    *,
    gate: Tensor | None = None,
    indices: Tensor | None = None,
    dropout: Dropout = identity,
    input_major: bool = False,
    keep: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """The base linear map plus the mixture, `x W^T + b + s * sum_e g_e B_e A_e x`, in one pass.

    x `(n, t, i)`; `weight` `(o, i)`, or `(i, o)` with `input_major` (Hugging Face `Conv1D`); `gate` None for a
    plain LoRA (as `single`), a long `(n,)` tensor of expert indices (as `hard`, with its `keep` mask and
    `sample_weight`), weights `(n, e)` or `(n, t, e)` (as `dense`), or with `indices` `(n, k)` the per-sample
    top-k weights `(n, k)` at them (as `topk`). Returns
    `(n, t, o)`: for a contiguous x, the base layer's output bit for bit plus the matching op's mixture.

    Example:
        >>> y = linear(x, layer.weight, layer.bias, A, B, 2.0, gate=torch.tensor([0, 3]))  # x (2, t, i)
    """
    if gate is not None and gate.dtype == torch.long and prefers_hard_grouped(x, A, B, keep):
        flat_in = x.reshape(-1, x.shape[-1])  # (n*t, i)
        if input_major:  # what Conv1D.forward runs
            out = torch.addmm(bias, flat_in, weight) if bias is not None else flat_in @ weight
        else:  # what nn.Linear.forward runs
            out = F.linear(flat_in, weight, bias)
        y, rows = hard_grouped(x, A, B, gate, scaling, dropout, sample_weight)
        return out.index_add_(0, rows, y).view(*x.shape[:-1], out.shape[-1])  # (n, t, o)
    if indices is not None:
        A_in, Bt = _project_topk_per_sample(A, B, indices)
    elif gate is None:
        A_in, Bt = _project_single(A, B)
    elif gate.dtype == torch.long:
        A_in, Bt = _project_hard(A, B, gate)
    else:
        A_in, Bt = _project_dense(A, B)
    x = x.contiguous()
    # without a graph to record (inference, frozen weights and input) the same forward runs without the custom
    # nodes, whose own cost is what a launch-bound GPU pass pays
    records = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, A_in, Bt, gate, sample_weight)
    )
    both = _BaseAndProjectIn.apply if records else base_and_project_in
    base, h = both(x, weight, bias, A_in, input_major)  # (n*t, o), (n*t or n, [t,] r)
    h = h.view(*x.shape[:-1], h.shape[-1])  # (n, t, r or e*r)
    if indices is not None:
        assert gate is not None
        h = _mix_topk_per_sample(h, gate, scaling, dropout)
    elif gate is None or gate.dtype == torch.long:
        h = _mix_single(h, scaling, dropout, keep, sample_weight)
    else:
        h = _mix_dense(h, gate, max(A.shape[0], B.shape[0]), _shared(A, B), scaling, dropout)
    out = (_AddProjectOut.apply if records else add_project_out)(base, h, Bt)  # (n*t, o)
    return out.view(*x.shape[:-1], out.shape[-1])  # (n, t, o)


def as_dense_gate(gate: Tensor, num_experts: int) -> Tensor:
    """A long `(n,)` tensor of expert indices as its one-hot `(n, e)` float gate; other gates as they are."""
    if gate.dtype == torch.long:
        return F.one_hot(gate, num_experts).float()
    return gate


def loop_reference(x: Tensor, A: Tensor, B: Tensor, gate: Tensor, scaling: float) -> Tensor:
    """The obvious form, for tests only: `sum_e g_e * s * B_e A_e x`, one expert at a time.

    x `(n, t, i)`; gate `(n, e)`, `(n, t, e)`, or a long tensor `(n,)` of expert indices (a hard gate).
    """
    num_experts = max(A.shape[0], B.shape[0])
    gate = as_dense_gate(gate, num_experts)
    gate = gate.to(x.dtype)
    gate = gate[:, None, :] if gate.dim() == 2 else gate
    out = torch.zeros(*x.shape[:-1], B.shape[1], dtype=x.dtype, device=x.device)
    for e in range(num_experts):
        A_e = A[0 if A.shape[0] == 1 else e]
        B_e = B[0 if B.shape[0] == 1 else e]
        out = out + gate[..., e : e + 1] * (scaling * (x @ A_e.t()) @ B_e.t())
    return out
