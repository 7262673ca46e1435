"""The expert bank: shapes per share mode, init, freezing through AdamW with weight decay, shared dropout."""

from __future__ import annotations

import pytest
import torch

from loramix.errors import ConfigError
from loramix.experts import LoraExperts, ops

SHARES = ["none", "A", "B"]


def make_bank(share: str = "none", num_experts: int = 4, **kwargs) -> LoraExperts:
    torch.manual_seed(0)
    bank = LoraExperts(6, 5, num_experts=num_experts, rank=3, share=share, **kwargs)
    with torch.no_grad():
        bank.B.normal_()
    return bank


@pytest.mark.parametrize("share", SHARES)
def test_shapes_and_init(share: str) -> None:
    bank = LoraExperts(6, 5, num_experts=4, rank=3, share=share)
    assert bank.A.shape == (1 if share == "A" else 4, 3, 6)
    assert bank.B.shape == (1 if share == "B" else 4, 5, 3)
    assert torch.equal(bank.B, torch.zeros_like(bank.B))
    assert all(a.abs().sum() > 0 for a in bank.A)
    assert not torch.equal(bank.A[0], bank.A[-1]) or share == "A"


def test_unknown_share_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="share"):
        LoraExperts(6, 5, num_experts=2, rank=3, share="AB")


def train_steps(bank: LoraExperts, steps: int = 5) -> None:
    """AdamW with weight decay, every expert in every sample (a dense uniform gate), so all would change."""
    optimizer = torch.optim.AdamW(
        [p for p in bank.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1
    )
    generator = torch.Generator().manual_seed(3)
    gate = torch.full((4, bank.num_experts), 1 / bank.num_experts)
    for _ in range(steps):
        x = torch.randn(4, 3, bank.in_features, generator=generator)
        A, B = bank.weights()
        loss = ops.dense(x, A, B, gate, 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def per_expert(bank: LoraExperts) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = bank.weights()
    return (
        A.detach().expand(bank.num_experts, -1, -1).clone(),
        B.detach().expand(bank.num_experts, -1, -1).clone(),
    )


@pytest.mark.parametrize("share", SHARES)
def test_frozen_experts_stay_bit_identical_through_adamw(share: str) -> None:
    bank = make_bank(share)
    train_steps(bank, 2)  # momentum and second moments exist for every expert before freezing
    bank.freeze_experts([0, 2])
    assert bank.frozen_experts == [0, 2]
    A0, B0 = per_expert(bank)
    train_steps(bank)
    A1, B1 = per_expert(bank)
    for e in (0, 2):
        if share != "A":
            assert torch.equal(A1[e], A0[e])
        if share != "B":
            assert torch.equal(B1[e], B0[e])
    for e in (1, 3):
        assert not torch.equal(A1[e], A0[e])
        assert not torch.equal(B1[e], B0[e])
    if share == "A":  # the shared matrix belongs to every expert and keeps training
        assert not torch.equal(A1[0], A0[0])
    if share == "B":
        assert not torch.equal(B1[0], B0[0])
    # any tool's checkpoint, `state_dict()`, holds the frozen rows as they are used, not the moved parameters
    state = bank.state_dict()
    for name, value in bank.effective().items():
        assert torch.equal(state[name], value), name
    if share != "A":
        assert not torch.equal(bank.A[0], A0[0])  # (the raw parameter row did move under weight decay)
    assert bank.state_dict(keep_vars=True)["A"] is bank.A  # the live parameters stay what keep_vars gives


@pytest.mark.parametrize("share", SHARES)
def test_unfreeze_restores_trainability(share: str) -> None:
    bank = make_bank(share)
    bank.freeze_experts([1])
    A0, B0 = per_expert(bank)
    train_steps(bank)
    bank.unfreeze_experts([1])
    assert bank.frozen_experts == []
    A1, B1 = per_expert(bank)
    # the frozen values are written back into the parameters: unfreezing changes nothing by itself
    if share != "A":
        assert torch.equal(A1[1], A0[1])
        assert torch.equal(bank.A[1], A0[1])
    if share != "B":
        assert torch.equal(B1[1], B0[1])
        assert torch.equal(bank.B[1], B0[1])
    train_steps(bank)
    A2, B2 = per_expert(bank)
    assert not torch.equal(A2[1], A1[1])
    assert not torch.equal(B2[1], B1[1])


def test_freezing_more_experts_later_keeps_earlier_ones() -> None:
    bank = make_bank()
    bank.freeze_experts([0])
    A0, _ = per_expert(bank)
    train_steps(bank)
    bank.freeze_experts([3])
    A1, _ = per_expert(bank)
    train_steps(bank)
    A2, _ = per_expert(bank)
    assert bank.frozen_experts == [0, 3]
    assert torch.equal(A2[0], A0[0])
    assert torch.equal(A2[3], A1[3])
    bank.unfreeze_experts()
    assert bank.frozen_experts == []


def test_sync_frozen_into_parameters() -> None:
    bank = make_bank()
    bank.freeze_experts([2])
    A0, B0 = per_expert(bank)
    train_steps(bank)  # weight decay moves the raw parameter, not the effective weight
    bank.sync_frozen_into_parameters()
    assert torch.equal(bank.A[2], A0[2])
    assert torch.equal(bank.B[2], B0[2])


@pytest.mark.parametrize("experts", [[4], [-1]])
def test_freeze_out_of_range_is_a_config_error(experts: list[int]) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        make_bank().freeze_experts(experts)


@pytest.mark.parametrize("share", SHARES)
def test_delta_weight_is_the_gated_sum(share: str) -> None:
    bank = make_bank(share).eval()
    gate = torch.tensor([0.1, 0.2, 0.3, 0.4])
    A, B = per_expert(bank)
    want = 2.5 * sum(gate[e] * B[e] @ A[e] for e in range(4))
    torch.testing.assert_close(bank.delta_weight(gate, 2.5), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("share", ["A", "B"])
def test_shared_dropout_only_in_training(share: str) -> None:
    bank = make_bank(share, shared_dropout=0.5)
    shared = bank.A if share == "A" else bank.B
    A, B = bank.eval().weights()
    assert torch.equal(A if share == "A" else B, shared)
    A, B = bank.train().weights()
    dropped = A if share == "A" else B
    assert (dropped == 0).any() and not torch.equal(dropped, shared)
    assert torch.equal(B if share == "A" else A, bank.B if share == "A" else bank.A)  # the other is untouched
