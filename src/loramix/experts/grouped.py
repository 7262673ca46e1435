"""The grouped-GEMM forms of the expert ops: the token rows sorted by expert, each projection one
`torch._grouped_mm` over the experts' segments, each used expert's weights read once where they are (no per-sample
copies). :mod:`loramix.experts.ops` runs them where they win: `hard_grouped` for a hard gate in inference with a few
tokens per sample (decoding), `topk_per_token` for a top-k gate per token over many experts.

Legend: n samples, t tokens, k experts per token, e experts, r rank, i / o in / out features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Dropout = Callable[[Tensor], Tensor]


def identity(h: Tensor) -> Tensor:
    return h


def prefers_hard_grouped(x: Tensor, A: Tensor, B: Tensor, keep: Tensor | None = None) -> bool:
    """Whether `hard_grouped` should run instead of the gather + `bmm` form: in inference (nothing to
    differentiate), on CPU, with a few tokens per sample (t <= r: decoding, one new token per step), one A and
    one B per expert, and no keep-base mask.

    Why: the gather copies each sample's `(r, i)` and `(r, o)` weights, r*(i+o) numbers per sample whatever t,
    and transposes B's; the grouped form moves t*(i+o) (the sample's rows in and out) and reads each used
    expert's weights once, where they are. Measured on the 48 linear layers of GPT-2 small at t = 1, 16 samples
    over 16 experts, r = 8, one CPU thread: the experts added 33% to the base layers' time, against 48% with the
    `index_select` gathers and 59% with the indexing gathers before them. (Reading 16 experts' A and B is itself
    about 20% more bytes than the base weights, so that is the floor here.)
    """
    return (
        not torch.is_grad_enabled()
        and keep is None
        and x.dim() == 3
        and x.shape[1] <= A.shape[1]
        and A.shape[0] == B.shape[0] > 1
        and grouped_mm_ok(x, A, B)
        and not transforms_active()
    )


def hard_grouped(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    expert_index: Tensor,
    scaling: float,
    dropout: Dropout = identity,
    sample_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`hard` without copying any weights: the samples' token rows sorted by expert, both projections as grouped
    GEMMs over the experts' segments (`torch._grouped_mm`), each used expert's A and B read once, in place.

    x `(n, t, i)`, expert_index `(n,)` long; A `(e, r, i)`, B `(e, o, r)`, one per expert. Returns the mixture's
    rows in sorted order `(n*t, o)` and `rows` `(n*t,)`, the flat token index of each: `out.index_add_(0, rows,
    y)` adds them to a flat `(n*t, o)` output. `sample_weight` `(n,)` scales each sample's rows. No host
    synchronisation; forward only (see `prefers_hard_grouped`).

    Example:
        >>> y, rows = hard_grouped(x, A, B, torch.tensor([2, 0, 2]), 2.0)  # x (3, 1, i)
        >>> delta = x.new_zeros(3, B.shape[1]).index_add_(0, rows, y).view(3, 1, -1)
    """
    n, t, i = x.shape
    order, rows, ends = grouped_rows(expert_index, t, A.shape[0])  # samples grouped by expert
    x_sorted = x.reshape(n * t, i).index_select(0, rows)  # (n*t, i)
    h = dropout(torch._grouped_mm(x_sorted, A.transpose(1, 2), offs=ends)) * scaling  # (n*t, r)
    if sample_weight is not None:  # each row weighed as its sample
        h = h * sample_weight.to(h.dtype).index_select(0, order).repeat_interleave(t)[:, None]
    return torch._grouped_mm(h, B.transpose(1, 2), offs=ends), rows  # (n*t, o), (n*t,)


def grouped_rows(
    expert_index: Tensor, t: int, num_experts: int, per_sample: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """The grouped GEMMs' layout of `expert_index` `(m,)`, each entry one (sample, expert) pair, pair p of sample
    `p // per_sample`: `order` `(m,)` the pairs sorted by expert (stable), `rows` `(m*t,)` the flat token rows
    `(n*t, ...)` of each sorted pair's sample, and `ends` `(e,)` int32, where each expert's segment of those rows
    ends (the `offs` of `torch._grouped_mm`)."""
    order = torch.argsort(expert_index, stable=True)
    sample = order if per_sample == 1 else torch.div(order, per_sample, rounding_mode="floor")
    rows = sample if t == 1 else (sample[:, None] * t + torch.arange(t, device=sample.device)).flatten()
    ends = (torch.bincount(expert_index, minlength=num_experts).cumsum(0) * t).to(torch.int32)
    return order, rows, ends


def grouped_mm_ok(x: Tensor, A: Tensor, B: Tensor) -> bool:
    """`torch._grouped_mm` runs on CPU for fp32 and bf16 and needs every row stride a multiple of 16 bytes. Not
    while `torch.compile` traces: its shape function takes bf16 alone, and the gathers trace into the graph."""
    align = 16 // x.element_size()
    return (
        hasattr(torch, "_grouped_mm")
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and all(size % align == 0 for size in (x.shape[-1], A.shape[1], B.shape[1]))
    )


def transforms_active() -> bool:
    """Whether a `torch.func` transform (vmap, grad, ...) is running: the fused nodes and the grouped GEMM are
    not written for them, so the plain ops run instead."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


def topk_per_token(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    indices: Tensor,
    weights: Tensor,
    scaling: float,
    dropout: Dropout = identity,
) -> Tensor:
    """`ops.topk` for a gate per token: x `(n, t, i)`, `indices` and `weights` `(n, t, k)`; returns `(n, t, o)`.
    The (token, expert) pairs sorted by expert, their rows gathered, both projections grouped GEMMs and the results
    `index_add`-ed back; no host synchronisation."""
    n, t, i = x.shape
    # each (token, expert) pair a row of one token: pair p is token p // k; sorted by expert
    order, tokens, ends = grouped_rows(indices.reshape(-1), 1, A.shape[0], indices.shape[-1])
    rows = x.reshape(n * t, i)[tokens]  # (n*t*k, i)
    h = torch._grouped_mm(rows, A.transpose(1, 2), offs=ends)  # (n*t*k, r)
    h = dropout(h) * scaling * weights.reshape(-1)[order].to(h.dtype)[:, None]
    y = torch._grouped_mm(h, B.transpose(1, 2), offs=ends)  # (n*t*k, o)
    return x.new_zeros(n * t, B.shape[1]).index_add(0, tokens, y).view(n, t, B.shape[1])
