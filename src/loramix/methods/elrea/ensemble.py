"""ELREA inference: weight the experts by gradient similarity and ensemble their logits in one forward pass.

ELREA (Li et al. 2025, Sec. 3.4) keeps the base adapter as expert 0 next to the C cluster experts. An input with
gradient feature f is compared with each expert's centroid (the base adapter's is the normalised mean of all
training features) by cosine similarity; the similarities are standardised across the C + 1 experts and
soft-maxed:

    c_e = cos(f, mu_e),   z_e = (c_e - mean_e c) / std_e c,   w = softmax(z / temperature)      (n, C+1)

and the model's output is the weighted sum of the experts' logits, sum_e w_e logits_e. The experts sit in one
loramix bank routed by task id (expert e for task e), so all C + 1 predictions come from ONE forward pass over the
batch replicated C + 1 times (copy e routed to expert e), not C + 1 model calls. The top-1 variant routes each
input to its best expert in one forward pass of size n.

Legend: n samples, k feature dimension, E = C + 1 experts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.context import routing
from loramix.errors import ConfigError

Forward = Callable[[Any, Tensor], Tensor]
Mode = Literal["ensemble", "top1"]


def base_centroid(train_features: Tensor) -> Tensor:
    """The base adapter's centroid `(k,)`: the L2-normalised mean of all normalised training features."""
    return F.normalize(F.normalize(train_features.float(), dim=-1).mean(0), dim=0)


def routing_weights(
    features: Tensor,
    centroids: Tensor,
    temperature: float = 1.0,
    *,
    base_centroid: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """ELREA's expert weights `(n, E)`: softmax over the standardised cosine similarities, rows sum to 1.

    Args:
        features: gradient features of the inputs `(n, k)` (normalised here).
        centroids: the cluster centroids `(C, k)`; expert e + 1 belongs to cluster e.
        base_centroid: `(k,)`, prepended as expert 0 (the base adapter); None: `centroids` already lists every
            expert, row e for expert e.
        temperature: lower sharpens the weights towards the most similar expert.

    Example:
        >>> w = routing_weights(test_feats, clustering.centroids, base_centroid=base_centroid(train_feats))
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    centroids = centroids.float().to(features.device)
    if base_centroid is not None:
        centroids = torch.cat([base_centroid.float().to(features.device)[None], centroids])  # (E, k)
    if features.shape[-1] != centroids.shape[-1]:
        raise ConfigError(
            f"features have {features.shape[-1]} dimensions but centroids {centroids.shape[-1]}: use the same "
            "projection (dim and seed) for training and test features"
        )
    sims = F.normalize(features.float(), dim=-1) @ F.normalize(centroids, dim=-1).t()  # (n, E)
    z = (sims - sims.mean(-1, keepdim=True)) / (sims.std(-1, unbiased=False, keepdim=True) + eps)
    return torch.softmax(z / temperature, dim=-1)


def replicate_batch(inputs: Any, copies: int, batch_size: int) -> Any:
    """Stack `copies` copies of a batch along its first dimension, copy-major: `[x; x; ...]`.

    Tensors whose first dimension is the batch are repeated; mappings, lists and tuples are walked; anything else
    (scalars, flags, a tensor without the batch dimension) passes through unchanged.
    """
    if isinstance(inputs, Tensor):
        if inputs.dim() >= 1 and inputs.shape[0] == batch_size:
            return inputs.repeat(copies, *([1] * (inputs.dim() - 1)))  # (copies * n, ...)
        return inputs
    if isinstance(inputs, Mapping):
        return {key: replicate_batch(value, copies, batch_size) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(replicate_batch(value, copies, batch_size) for value in inputs)
    return inputs


def ensemble_logits(
    forward: Forward,
    inputs: Any,
    weights: Tensor,
    *,
    mode: Mode = "ensemble",
    experts_per_pass: int | None = None,
) -> Tensor:
    """The ELREA output for a batch: `sum_e weights[:, e] * logits_e` ("ensemble") or the best expert's logits
    ("top1"), with experts as task ids of one routed bank.

    Args:
        forward: `forward(inputs, task_ids) -> logits (m, ...)` runs the model on a batch of m samples with sample j
            routed to expert `task_ids[j]` (see :func:`routed_forward`); classifiers and causal LMs alike.
        inputs: the batch of n samples (a tensor, or a mapping / list of tensors with the batch first).
        weights: `(n, E)` from :func:`routing_weights`.
        experts_per_pass: bound memory by running this many experts' copies per forward pass (None: all E in one).

    Returns the combined logits `(n, ...)` in fp32 ("ensemble"), or the chosen expert's logits ("top1").

    Example:
        >>> logits = ensemble_logits(routed_forward(model), {"input_ids": ids, "attention_mask": mask}, w)
    """
    if weights.dim() != 2:
        raise ConfigError(f"weights must have shape (n, experts), got {tuple(weights.shape)}")
    n, num_experts = weights.shape
    if mode == "top1":
        return forward(inputs, weights.argmax(-1))  # (n, ...)
    if mode != "ensemble":
        raise ConfigError(f"mode must be 'ensemble' or 'top1', got {mode!r}")
    group = num_experts if experts_per_pass is None else max(1, min(experts_per_pass, num_experts))
    weights = weights.float()
    total: Tensor | None = None
    for start in range(0, num_experts, group):  # one pass unless experts_per_pass bounds memory
        stop = min(start + group, num_experts)
        copies = stop - start
        task_ids = torch.arange(start, stop, device=weights.device).repeat_interleave(n)  # (copies * n,)
        logits = forward(replicate_batch(inputs, copies, n), task_ids)  # (copies * n, ...)
        logits = logits.float().unflatten(0, (copies, n))  # (copies, n, ...)
        w = weights[:, start:stop].t().reshape(copies, n, *([1] * (logits.dim() - 2)))  # (copies, n, 1...)
        part = (w.to(logits.device) * logits).sum(0)  # (n, ...)
        total = part if total is None else total + part
    assert total is not None
    return total


def routed_forward(
    model: nn.Module,
    *,
    output: Callable[[Any], Tensor] | None = None,
) -> Forward:
    """A `forward(inputs, task_ids)` for :func:`ensemble_logits` that runs `model` inside `loramix.routing`.

    A mapping is passed as keyword arguments (its `attention_mask` also goes to the routing context), anything
    else positionally. `output` picks the logits from the model's output (default: `.logits` if present).

    Example:
        >>> forward = routed_forward(model)
        >>> logits = forward({"input_ids": ids}, torch.zeros(len(ids), dtype=torch.long))
    """

    def pick(out: Any) -> Tensor:
        if output is not None:
            return output(out)
        return out.logits if hasattr(out, "logits") else out

    def forward(inputs: Any, task_ids: Tensor) -> Tensor:
        if isinstance(inputs, Mapping):
            with routing(model, task_ids=task_ids, attention_mask=inputs.get("attention_mask")):
                return pick(model(**inputs))
        with routing(model, task_ids=task_ids):
            return pick(model(inputs))

    return forward
