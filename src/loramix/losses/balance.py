"""Router regularisers for learned gates: the Switch Transformer load-balancing loss and the ST-MoE z-loss.

Both are pure functions of the routing outputs, computed in fp32, and accept per-sample `(n, e)` or per-token
`(n, t, e)` routing with an optional mask that drops padding from every mean.

Legend: n samples, t tokens, m = n or n * t routed items, k choices per item, e experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loramix.errors import RoutingError


def _flat_weights(lead_shape: torch.Size, mask: Tensor | None, device: torch.device) -> Tensor:
    """Per-item weights `(m,)`: the mask as 0/1 floats, or ones."""
    if mask is None:
        return torch.ones(lead_shape.numel(), dtype=torch.float32, device=device)  # (m,)
    if mask.shape != lead_shape:
        raise RoutingError(
            f"mask must have shape {tuple(lead_shape)} (the routing shape without the expert axis), "
            f"got {tuple(mask.shape)}"
        )
    return mask.reshape(-1).to(device=device, dtype=torch.float32)  # (m,)


def _check_routing(tensor: Tensor, name: str) -> None:
    if tensor.dim() not in (2, 3):
        raise RoutingError(f"{name} must have shape (n, e) or (n, t, e), got {tuple(tensor.shape)}")


def load_balance_loss(
    router_probs: Tensor,
    expert_indices: Tensor | None = None,
    *,
    num_experts: int,
    mask: Tensor | None = None,
) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al., JMLR 2022, Eqs. 4-6): `E * sum_e f_e * P_e`.

    `f_e` is the fraction of routed items (samples or tokens) dispatched to expert e, where with top-k routing
    each of an item's k choices counts 1/k; `P_e` is the mean router probability of expert e. Both means skip
    masked items. The loss is 1 under perfectly uniform routing and grows to E when everything collapses onto
    one expert. Gradients flow through `P_e` only (`f_e` comes from a discrete choice).

    Args:
        router_probs: `(n, e)` or `(n, t, e)` router probabilities (softmax outputs).
        expert_indices: chosen experts, `(n,)` / `(n, k)` for per-sample routing or `(n, t)` / `(n, t, k)` for
            per-token routing; None takes the argmax of `router_probs` (top-1).
        num_experts: E; must equal the last dimension of `router_probs`.
        mask: `(n,)` or `(n, t)` (the routing shape without the expert axis); true (or 1) for real items.

    Example:
        >>> probs = torch.softmax(torch.randn(4, 16, 8), dim=-1)
        >>> loss = load_balance_loss(probs, probs.topk(2, dim=-1).indices, num_experts=8)
    """
    _check_routing(router_probs, "router_probs")
    if router_probs.shape[-1] != num_experts:
        raise RoutingError(
            f"router_probs has {router_probs.shape[-1]} experts on its last axis but num_experts={num_experts}"
        )
    lead_shape = router_probs.shape[:-1]
    probs = router_probs.float().reshape(-1, num_experts)  # (m, e)
    if expert_indices is None:
        expert_indices = probs.argmax(dim=-1, keepdim=True)  # (m, 1)
    elif expert_indices.shape == lead_shape:
        expert_indices = expert_indices.reshape(-1, 1)  # (m, 1)
    elif expert_indices.dim() == len(lead_shape) + 1 and expert_indices.shape[:-1] == lead_shape:
        expert_indices = expert_indices.reshape(probs.shape[0], -1)  # (m, k)
    else:
        raise RoutingError(
            f"expert_indices must have shape {tuple(lead_shape)} (top-1) or {(*lead_shape, 'k')} (top-k) "
            f"to match router_probs of shape {tuple(router_probs.shape)}, got {tuple(expert_indices.shape)}"
        )
    expert_indices = expert_indices.to(device=probs.device, dtype=torch.long)
    k = expert_indices.shape[-1]
    weight = _flat_weights(lead_shape, mask, probs.device)  # (m,)

    choices = torch.full(expert_indices.shape, 1.0 / k, dtype=torch.float32, device=probs.device)  # (m, k)
    dispatch = torch.zeros_like(probs).scatter_add_(1, expert_indices, choices)  # (m, e); rows sum to 1
    count = weight.sum().clamp_min(torch.finfo(torch.float32).tiny)
    fraction = (weight @ dispatch) / count  # (e,)  f_e
    mean_prob = (weight @ probs) / count  # (e,)  P_e
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(router_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss (Zoph et al., 2022, Eq. 5): the mean over items of `logsumexp(logits)^2`.

    It keeps router logits small, which keeps the fp32 softmax well conditioned and training stable.

    Args:
        router_logits: `(n, e)` or `(n, t, e)` pre-softmax router logits.
        mask: `(n,)` or `(n, t)` (the routing shape without the expert axis); true (or 1) for real items.

    Example:
        >>> loss = router_z_loss(torch.randn(4, 16, 8), mask=torch.ones(4, 16, dtype=torch.bool))
    """
    _check_routing(router_logits, "router_logits")
    lead_shape = router_logits.shape[:-1]
    log_z = torch.logsumexp(router_logits.float(), dim=-1).reshape(-1)  # (m,)
    weight = _flat_weights(lead_shape, mask, log_z.device)  # (m,)
    count = weight.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return (weight * log_z.square()).sum() / count
