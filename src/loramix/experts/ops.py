"""The ops that apply a bank of experts to a layer's input, one per kind of gate, and their loop reference.

Legend: n samples, t tokens, e experts, r rank, i / o in / out features.

All fast ops compute `s * sum_e g_e B_e A_e x` with no Python loop over experts and no host synchronisation:
- `single`: one expert, gate of ones (a plain LoRA);
- `hard`: one expert per sample (a task id): gather each sample's A and B, then `bmm`;
- `dense`: a soft or top-k gate per sample `(n, e)` or per token `(n, t, e)`: one stacked matmul into `e*r`
  features, scale by the gate, one matmul back.
Scaling and dropout act on the r-dimensional hidden, which is e*r wide at most, never on x.
`loop_reference` is the obvious per-expert loop; the tests hold every fast op equal to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Dropout = Callable[[Tensor], Tensor]


def _identity(h: Tensor) -> Tensor:
    return h


def stacked_B(B: Tensor) -> Tensor:
    """`(e, o, r) -> (o, e*r)`, the layout that turns the mixture's second half into one matmul."""
    e, o, r = B.shape
    return B.permute(1, 0, 2).reshape(o, e * r)


def single(x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: Dropout = _identity) -> Tensor:
    """One expert with a gate of ones: `s * B A x`. x `(..., i)`, A `(1, r, i)`, B `(1, o, r)`."""
    h = dropout(x @ A[0].t()) * scaling  # (..., r)
    return h @ B[0].t()  # (..., o)


def hard(
    x: Tensor, A: Tensor, B: Tensor, expert_index: Tensor, scaling: float, dropout: Dropout = _identity
) -> Tensor:
    """Each sample through its own expert. x `(n, t, i)`, expert_index `(n,)` long; returns `(n, t, o)`.

    A shared A (`A.shape[0] == 1`) or B is applied as one plain matmul instead of a gather.
    """
    if A.shape[0] == 1:
        h = x @ A[0].t()  # (n, t, r)
    else:
        h = torch.bmm(x, A[expert_index].transpose(1, 2))  # (n, t, r)
    h = dropout(h) * scaling
    if B.shape[0] == 1:
        return h @ B[0].t()  # (n, t, o)
    return torch.bmm(h, B[expert_index].transpose(1, 2))  # (n, t, o)


def dense(
    x: Tensor, A: Tensor, B: Tensor, gate: Tensor, scaling: float, dropout: Dropout = _identity
) -> Tensor:
    """A gate per sample `(n, e)` or per token `(n, t, e)` over all experts. x `(n, t, i)`; returns `(n, t, o)`.

    A top-k gate is a dense gate with zeros: it costs what a dense one costs, which is the right trade while
    e*r stays small next to the layer's width.
    """
    num_experts = max(A.shape[0], B.shape[0])
    r = A.shape[1]
    gate = gate.to(x.dtype)
    gate = gate[:, None, :] if gate.dim() == 2 else gate  # (n, 1 or t, e)
    if A.shape[0] == 1:  # shared A: one projection, then e gated copies of it for the stacked B
        h = dropout(x @ A[0].t()) * scaling  # (n, t, r)
        h = (h[..., None, :] * gate[..., :, None]).flatten(-2)  # (n, t, e*r)
        return h @ stacked_B(B).t()  # (n, t, o)
    h = dropout(x @ A.reshape(num_experts * r, -1).t()) * scaling  # (n, t, e*r)
    h = h.unflatten(-1, (num_experts, r)) * gate[..., None]  # (n, t, e, r)
    if B.shape[0] == 1:  # shared B: sum the gated hiddens, then one projection back
        return h.sum(-2) @ B[0].t()  # (n, t, o)
    return h.flatten(-2) @ stacked_B(B).t()  # (n, t, o)


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
