"""Load balance and the router z-loss: each the mean of its per-gate value over the recorded learned gates, with
the attention mask for per-token gates only; hard gates and gates without logits are left out."""

from __future__ import annotations

import torch

from loramix.losses import load_balance_loss, router_z_loss
from loramix.routers import Gate
from loramix.routers.state import RoutingState
from loramix.train.aux_losses import LoadBalance, ZLoss


def recorded_state() -> tuple[RoutingState, list[Gate], torch.Tensor]:
    """A state with a per-sample and a per-token learned gate, a hard gate and a gate without logits."""
    g = torch.Generator().manual_seed(0)
    n, t, e = 3, 5, 4
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, 3:] = 0
    sample_logits = torch.randn(n, e, generator=g)
    token_logits = torch.randn(n, t, e, generator=g)
    learned = [
        Gate(torch.softmax(sample_logits, -1), sample_logits.topk(2).indices, logits=sample_logits),
        Gate(torch.softmax(token_logits, -1), token_logits.topk(2).indices, logits=token_logits),
    ]
    state = RoutingState()
    state.add("a", learned[0])
    state.add("hard", Gate(torch.eye(e)[[0, 1, 2]], torch.tensor([0, 1, 2]), logits=sample_logits, hard=True))
    state.add("fixed", Gate(torch.full((n, e), 1 / e)))
    state.add("b", learned[1])
    return state, learned, mask


def test_load_balance_is_the_mean_over_learned_gates() -> None:
    state, (sample, token), mask = recorded_state()
    want = (
        load_balance_loss(torch.softmax(sample.logits, -1), sample.indices, num_experts=4, mask=None)
        + load_balance_loss(torch.softmax(token.logits, -1), token.indices, num_experts=4, mask=mask)
    ) / 2
    got = LoadBalance(0.5)(state, {"attention_mask": mask})
    torch.testing.assert_close(got, want)


def test_z_loss_is_the_mean_over_learned_gates() -> None:
    state, (sample, token), mask = recorded_state()
    want = (router_z_loss(sample.logits, mask=None) + router_z_loss(token.logits, mask=mask)) / 2
    got = ZLoss(0.1)(state, {"attention_mask": mask})
    torch.testing.assert_close(got, want)
    # the mask matters: without it the per-token term counts the padding
    assert not torch.allclose(got, ZLoss(0.1)(state, {}))


def test_nothing_to_compute_without_learned_gates() -> None:
    state = RoutingState()
    state.add("hard", Gate(torch.eye(3), torch.tensor([0, 1, 2]), hard=True))
    assert LoadBalance(1.0)(state, {}) is None
    assert ZLoss(1.0)(state, {}) is None
