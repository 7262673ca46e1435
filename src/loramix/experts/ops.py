"""The ops that apply a bank of experts to a layer's input, one per kind of gate, and their loop reference.

Legend: n samples, t tokens, e experts, r rank, i / o in / out features.

All fast ops compute `s * sum_e g_e B_e A_e x` with no Python loop over experts and no host synchronisation:
- `single`: one expert, gate of ones (a plain LoRA);
- `hard`: one expert per sample (a task id): gather each sample's A and B, then `bmm`;
- `dense`: a soft or top-k gate per sample `(n, e)` or per token `(n, t, e)`: one stacked matmul into `e*r`
  features, scale by the gate, one matmul back.
Scaling and dropout act on the r-dimensional hidden, which is e*r wide at most, never on x.
`loop_reference` is the obvious per-expert loop; the tests hold every fast op equal to it.

`linear` fuses a `nn.Linear` (or `Conv1D`) base with any of the three: the mixture's output is accumulated into the
base's output by the GEMM itself (`addmm_` / `baddbmm_`), and in backward the experts' input gradient into the
base's. On CPU, where a LoRA's matmuls are memory-bound, the two `(t, o)` / `(t, i)` passes this saves are about a
third of what a plain LoRA costs on top of its base layer (`benchmarks/speed.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Dropout = Callable[[Tensor], Tensor]


def _identity(h: Tensor) -> Tensor:
    return h


def stacked_B(B: Tensor) -> Tensor:
    """`(e, o, r) -> (o, e*r)`, the layout that turns the mixture's second half into one matmul."""
    e, o, r = B.shape
    return B.permute(1, 0, 2).reshape(o, e * r)


def _project_single(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    return A[0], B[0]  # (r, i), (o, r)


def _mix_single(h: Tensor, scaling: float, dropout: Dropout) -> Tensor:
    return dropout(h) * scaling  # (..., r)


def _project_hard(A: Tensor, B: Tensor, expert_index: Tensor) -> tuple[Tensor, Tensor]:
    """A shared A (`A.shape[0] == 1`) or B stays one matrix; the others are gathered per sample."""
    A_in = A[0] if A.shape[0] == 1 else A[expert_index]  # (r, i) or (n, r, i)
    B_out = B[0] if B.shape[0] == 1 else B[expert_index]  # (o, r) or (n, o, r)
    return A_in, B_out


def _project_dense(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    num_experts, r = max(A.shape[0], B.shape[0]), A.shape[1]
    A_in = A[0] if A.shape[0] == 1 else A.reshape(num_experts * r, -1)  # (r or e*r, i)
    B_out = B[0] if B.shape[0] == 1 else stacked_B(B)  # (o, r or e*r)
    return A_in, B_out


def _mix_dense(
    h: Tensor, gate: Tensor, num_experts: int, shared: str, scaling: float, dropout: Dropout
) -> Tensor:
    """The gated hidden that the second projection reads: `h` `(n, t, r)` if A is shared, else `(n, t, e*r)`."""
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


def _matmul_t(h: Tensor, W: Tensor) -> Tensor:
    """`h W^T` for one matrix `(k, j)` or one per sample `(n, k, j)` (then h is `(n, t, j)`)."""
    return h @ W.t() if W.dim() == 2 else torch.bmm(h, W.transpose(1, 2))


def single(x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: Dropout = _identity) -> Tensor:
    """One expert with a gate of ones: `s * B A x`. x `(..., i)`, A `(1, r, i)`, B `(1, o, r)`."""
    A_in, B_out = _project_single(A, B)
    h = _mix_single(x @ A_in.t(), scaling, dropout)  # (..., r)
    return h @ B_out.t()  # (..., o)


def hard(
    x: Tensor, A: Tensor, B: Tensor, expert_index: Tensor, scaling: float, dropout: Dropout = _identity
) -> Tensor:
    """Each sample through its own expert. x `(n, t, i)`, expert_index `(n,)` long; returns `(n, t, o)`.

    A shared A (`A.shape[0] == 1`) or B is applied as one plain matmul instead of a gather.
    """
    A_in, B_out = _project_hard(A, B, expert_index)
    h = _mix_single(_matmul_t(x, A_in), scaling, dropout)  # (n, t, r)
    return _matmul_t(h, B_out)  # (n, t, o)


def dense(
    x: Tensor, A: Tensor, B: Tensor, gate: Tensor, scaling: float, dropout: Dropout = _identity
) -> Tensor:
    """A gate per sample `(n, e)` or per token `(n, t, e)` over all experts. x `(n, t, i)`; returns `(n, t, o)`.

    A top-k gate is a dense gate with zeros: it costs what a dense one costs, which is the right trade while
    e*r stays small next to the layer's width.
    """
    A_in, B_out = _project_dense(A, B)
    h = x @ A_in.t()  # (n, t, r or e*r)
    h = _mix_dense(h, gate.to(x.dtype), max(A.shape[0], B.shape[0]), _shared(A, B), scaling, dropout)
    return h @ B_out.t()  # (n, t, o)


# ---- the base layer and the mixture in one pass ----------------------------------------------------------------


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
        flat_in = x.view(-1, x.shape[-1])  # (n*t, i)
        if input_major:  # what Conv1D.forward runs
            base = torch.addmm(bias, flat_in, weight) if bias is not None else flat_in @ weight
        else:  # what nn.Linear.forward runs on a contiguous input
            base = F.linear(flat_in, weight, bias)
        h = flat_in @ A.t() if A.dim() == 2 else torch.bmm(x, A.transpose(1, 2))
        return base, h

    @staticmethod
    def backward(ctx, grad_base, grad_h):  # type: ignore[override]
        x, weight, A = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = grad_A = None
        flat_in = x.view(-1, x.shape[-1])  # (n*t, i)
        if grad_h is not None and A.dim() == 3:
            grad_h = grad_h.view(*x.shape[:-1], A.shape[1])  # (n, t, r)
        if ctx.needs_input_grad[0]:
            if grad_base is not None:
                grad_x = grad_base @ weight.t() if ctx.input_major else grad_base @ weight  # (n*t, i)
            if grad_h is not None:
                if A.dim() == 3:
                    if grad_x is None:
                        grad_x = torch.bmm(grad_h, A).view(flat_in.shape)
                    else:
                        grad_x.view(x.shape).baddbmm_(grad_h, A)
                elif grad_x is None:
                    grad_x = grad_h @ A
                else:
                    grad_x.addmm_(grad_h, A)
            if grad_x is not None:
                grad_x = grad_x.view(x.shape)
        if grad_base is not None and ctx.needs_input_grad[1]:
            grad_weight = flat_in.t() @ grad_base if ctx.input_major else grad_base.t() @ flat_in
        if grad_base is not None and ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_base.sum(0)
        if grad_h is not None and ctx.needs_input_grad[3]:
            grad_A = grad_h.t() @ flat_in if A.dim() == 2 else torch.bmm(grad_h.transpose(1, 2), x)
        return grad_x, grad_weight, grad_bias, grad_A, None


class _AddProjectOut(torch.autograd.Function):
    """`base += h B^T` in place: the GEMM accumulates into the base output instead of adding a new tensor to it.

    base `(n*t, o)` from `_BaseAndProjectIn`; h `(n, t, r)`; B one matrix `(o, r)` or one per sample `(n, o, r)`.
    """

    @staticmethod
    def forward(ctx, base, h, B):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, B)
        if B.dim() == 2:
            base.addmm_(h.reshape(-1, h.shape[-1]), B.t())
        else:
            base.view(*h.shape[:-1], B.shape[1]).baddbmm_(h, B.transpose(1, 2))
        ctx.mark_dirty(base)
        return base

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        h, B = ctx.saved_tensors
        if grad is None:
            return None, None, None
        grad_h = grad_B = None
        if B.dim() == 2:
            if ctx.needs_input_grad[1]:
                grad_h = (grad @ B).view(h.shape)  # (n, t, r)
            if ctx.needs_input_grad[2]:
                grad_B = grad.t() @ h.reshape(-1, h.shape[-1])  # (o, r)
        else:
            grad3 = grad.view(*h.shape[:-1], B.shape[1])  # (n, t, o)
            if ctx.needs_input_grad[1]:
                grad_h = torch.bmm(grad3, B)  # (n, t, r)
            if ctx.needs_input_grad[2]:
                grad_B = torch.bmm(grad3.transpose(1, 2), h)  # (n, o, r)
        return grad, grad_h, grad_B


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scaling: float,
    *,
    gate: Tensor | None = None,
    dropout: Dropout = _identity,
    input_major: bool = False,
) -> Tensor:
    """The base linear map plus the mixture, `x W^T + b + s * sum_e g_e B_e A_e x`, in one pass.

    x `(n, t, i)`; `weight` `(o, i)`, or `(i, o)` with `input_major` (Hugging Face `Conv1D`); `gate` None for a
    plain LoRA (as `single`), a long `(n,)` tensor of expert indices (as `hard`), or weights `(n, e)` or
    `(n, t, e)` (as `dense`). Returns `(n, t, o)`: for a contiguous x, the base layer's output bit for bit plus
    the matching op's mixture.

    Example:
        >>> y = linear(x, layer.weight, layer.bias, A, B, 2.0, gate=torch.tensor([0, 3]))  # x (2, t, i)
    """
    if gate is None:
        A_in, B_out = _project_single(A, B)
    elif gate.dtype == torch.long:
        A_in, B_out = _project_hard(A, B, gate)
    else:
        A_in, B_out = _project_dense(A, B)
    x = x.contiguous()
    base, h = _BaseAndProjectIn.apply(x, weight, bias, A_in, input_major)  # (n*t, o), (n*t or n, [t,] r)
    h = h.view(*x.shape[:-1], h.shape[-1])  # (n, t, r or e*r)
    if gate is None or gate.dtype == torch.long:
        h = _mix_single(h, scaling, dropout)
    else:
        h = _mix_dense(h, gate, max(A.shape[0], B.shape[0]), _shared(A, B), scaling, dropout)
    out = _AddProjectOut.apply(base, h, B_out)  # (n*t, o)
    return out.view(*x.shape[:-1], out.shape[-1])  # (n, t, o)


def loop_reference(x: Tensor, A: Tensor, B: Tensor, gate: Tensor, scaling: float) -> Tensor:
    """The obvious form, for tests only: `sum_e g_e * s * B_e A_e x`, one expert at a time.

    x `(n, t, i)`; gate `(n, e)`, `(n, t, e)`, or a long tensor `(n,)` of expert indices (a hard gate).
    """
    num_experts = max(A.shape[0], B.shape[0])
    if gate.dtype == torch.long:
        gate = torch.nn.functional.one_hot(gate, num_experts)
    gate = gate.to(x.dtype)
    gate = gate[:, None, :] if gate.dim() == 2 else gate
    out = torch.zeros(*x.shape[:-1], B.shape[1], dtype=x.dtype, device=x.device)
    for e in range(num_experts):
        A_e = A[0 if A.shape[0] == 1 else e]
        B_e = B[0 if B.shape[0] == 1 else e]
        out = out + gate[..., e : e + 1] * (scaling * (x @ A_e.t()) @ B_e.t())
    return out
