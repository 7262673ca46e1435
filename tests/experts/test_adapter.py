"""Bottleneck adapter experts: shapes and zero init, every gate kind against the loop reference (outputs and
gradients), keep-base samples, gradient isolation, freezing through AdamW, growth, and the kind injected in
parallel to GPT-2's MLPs and around Linears (identity at init, training, save/load, merge and export refused)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import loramix
from loramix import AdapterConfig
from loramix.errors import ConfigError, InjectionError
from loramix.experts import AdapterExperts, LinearExperts, ParallelExperts
from loramix.experts.adapter import pair_weights
from loramix.inject import build_layer, is_injected
from loramix.kinds import scaling
from loramix.routers import Gate
from tests.models import mlp_inputs, text_inputs, tiny_gpt2, tiny_mlp

N, T, IN, OUT, E, W = 4, 3, 6, 5, 4, 7  # samples, tokens, in / out features, experts, width
SCALING = 0.7
GATE_KINDS = ["none", "hard", "hard-keep", "sample", "token", "topk-sample", "topk-token"]


def make_bank(num_experts: int = E, seed: int = 0) -> AdapterExperts:
    """A bank whose every parameter is non-zero, so that each one shows in the output and its gradient."""
    torch.manual_seed(seed)
    bank = AdapterExperts(IN, OUT, num_experts=num_experts, width=W)
    with torch.no_grad():
        for name in ("down_bias", "up", "up_bias"):
            getattr(bank, name).normal_()
    return bank


def inputs(seed: int = 1) -> Tensor:
    return torch.randn(N, T, IN, generator=torch.Generator().manual_seed(seed))


def make_gate(kind: str, seed: int = 2) -> tuple[Gate | None, Tensor]:
    """A gate of the given kind and the dense `(n, e)` / `(n, t, e)` gate (or long `(n,)`) the loop reference
    takes for it."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None, torch.zeros(N, dtype=torch.long)  # no gate runs expert 0
    if kind.startswith("hard"):
        experts = torch.tensor([2, 0, 2, 3])
        gate = Gate(weights=nn.functional.one_hot(experts, E).float(), indices=experts, hard=True)
        if kind == "hard-keep":
            gate = gate.keep_base(torch.tensor([False, True, False, True]))
            return gate, gate.weights
        return gate, experts
    per_token = kind.endswith("token")
    probs = torch.randn((N, T, E) if per_token else (N, E), generator=generator).softmax(-1)
    if not kind.startswith("topk"):
        return Gate(weights=probs), probs
    top_p, top_i = probs.topk(2, dim=-1)  # (..., k)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
    return Gate(weights=weights, indices=top_i), weights


def identity(h: Tensor) -> Tensor:
    return h


def test_shapes_and_zero_init() -> None:
    """A new bank holds one row per expert in every parameter and adds exactly nothing for any gate."""
    bank = AdapterExperts(IN, OUT, num_experts=E, width=W)
    assert bank.down.shape == (E, W, IN)
    assert bank.down_bias.shape == (E, W)
    assert bank.up.shape == (E, OUT, W)
    assert bank.up_bias.shape == (E, OUT)
    assert all(d.abs().sum() > 0 for d in bank.down) and not torch.equal(bank.down[0], bank.down[1])
    for name in ("down_bias", "up", "up_bias"):
        assert torch.equal(getattr(bank, name), torch.zeros_like(getattr(bank, name)))
    x = inputs()
    for kind in GATE_KINDS:
        gate, _ = make_gate(kind)
        out = bank(x, gate, SCALING, identity)
        assert out.shape == (N, T, OUT)
        assert torch.equal(out, torch.zeros_like(out))


def test_config_gives_width_scale_and_refuses_sharing() -> None:
    """`rank` is the bottleneck width, `adapter_scale` the scale, and no matrix can be shared."""
    config = AdapterConfig(experts="adapter", router="token", num_experts=3, rank=16, adapter_scale=0.25)
    assert scaling(config) == 0.25
    assert scaling(AdapterConfig(experts="adapter")) == 0.1
    bank = AdapterExperts.from_config(config, 8, 9)
    assert (bank.num_experts, bank.width, bank.in_features, bank.out_features) == (3, 16, 8, 9)
    with pytest.raises(ConfigError, match="share"):
        AdapterExperts.from_config(AdapterConfig(experts="adapter", share="A"), 8, 9)


@pytest.mark.parametrize("kind", GATE_KINDS)
def test_every_gate_equals_loop_reference(kind: str) -> None:
    """Outputs and the gradients of the input and of all four parameters, against the per-expert loop."""
    w = torch.randn(N, T, OUT, generator=torch.Generator().manual_seed(5))
    results = []
    for fast in (True, False):
        bank = make_bank()
        x = inputs().requires_grad_(True)
        gate, dense = make_gate(kind)
        out = bank(x, gate, SCALING, identity) if fast else bank.loop_reference(x, dense, SCALING)
        (out * w).sum().backward()
        results.append([out.detach(), x.grad] + [getattr(bank, name).grad for name in bank.stacked])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_no_gate_takes_any_leading_shape() -> None:
    """Without a gate the input may be `(..., i)`: expert 0 applied to every row."""
    bank = make_bank()
    x = torch.randn(2, 3, 4, IN, generator=torch.Generator().manual_seed(3))
    out = bank(x, None, SCALING, identity)
    assert out.shape == (2, 3, 4, OUT)
    want = bank.loop_reference(x.reshape(2, 12, IN), torch.zeros(2, dtype=torch.long), SCALING)
    torch.testing.assert_close(out, want.reshape(2, 3, 4, OUT), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["hard", "sample", "token", "topk-sample"])
def test_kept_samples_get_exactly_zero(kind: str) -> None:
    """Samples sent to the base get exact zeros, in the same batched op as the others (biases included)."""
    bank = make_bank()
    gate, _ = make_gate(kind)
    assert gate is not None
    keep = torch.tensor([True, False, False, True])
    out = bank(inputs(), gate.keep_base(keep), SCALING, identity)
    assert torch.equal(out[keep], torch.zeros_like(out[keep]))
    assert (out[~keep].abs() > 0).all()


def test_dropout_acts_on_the_hidden() -> None:
    """The dropout callable sees the `w`-wide hidden: dropping all of it leaves the gated up biases only."""
    bank = make_bank()
    seen = []

    def drop_all(h: Tensor) -> Tensor:
        seen.append(h.shape[-1])
        return h * 0

    for kind in ("none", "hard", "sample", "token"):
        gate, dense = make_gate(kind)
        out = bank(inputs(), gate, SCALING, drop_all)
        weights = nn.functional.one_hot(dense, E).float() if dense.dtype == torch.long else dense
        weights = weights[:, None, :] if weights.dim() == 2 else weights  # (n, 1 or t, e)
        want = (SCALING * weights @ bank.up_bias).expand(N, T, OUT)
        torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert seen == [W, W, E * W, E * W]


def test_hard_gate_isolates_gradients() -> None:
    """An expert gets exactly zero gradient from samples not routed to it."""
    bank = make_bank()
    gate, _ = make_gate("hard")  # experts 2, 0, 2, 3: expert 1 is unused
    assert gate is not None
    out = bank(inputs(), gate, SCALING, identity)
    out[1].pow(2).sum().backward()  # only sample 1, routed to expert 0
    for name in bank.stacked:
        grad = getattr(bank, name).grad
        assert torch.equal(grad[1:], torch.zeros_like(grad[1:])), name
        assert grad[0].abs().sum() > 0, name


def train_steps(bank: AdapterExperts, steps: int = 5) -> None:
    """AdamW with weight decay, every expert in every sample (a dense uniform gate), so all would change."""
    optimizer = torch.optim.AdamW(
        [p for p in bank.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1
    )
    generator = torch.Generator().manual_seed(3)
    gate = Gate(weights=torch.full((N, bank.num_experts), 1 / bank.num_experts))
    for _ in range(steps):
        x = torch.randn(N, T, IN, generator=generator)
        loss = bank(x, gate, 1.0, identity).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def snapshot(bank: AdapterExperts) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in bank.effective().items()}


def test_frozen_experts_stay_bit_identical_through_adamw() -> None:
    bank = make_bank()
    train_steps(bank, 2)  # momentum and second moments exist for every expert before freezing
    bank.freeze_experts([0, 2])
    assert bank.frozen_experts == [0, 2]
    before = snapshot(bank)
    train_steps(bank)
    after = snapshot(bank)
    for name in bank.stacked:
        for e in (0, 2):
            assert torch.equal(after[name][e], before[name][e]), name
        for e in (1, 3):
            assert not torch.equal(after[name][e], before[name][e]), name


def test_grow_keeps_old_experts_and_new_ones_add_nothing() -> None:
    bank = make_bank(num_experts=2)
    bank.freeze_experts([0])
    before = snapshot(bank)
    bank.grow(4)
    assert bank.num_experts == 4 and bank.frozen_experts == [0]
    for name in bank.stacked:
        assert getattr(bank, name).shape[0] == 4
        assert torch.equal(getattr(bank, name)[:2], before[name]), name
    assert all(d.abs().sum() > 0 for d in bank.down[2:])
    new = torch.tensor([2, 3, 3, 2])
    gate = Gate(weights=nn.functional.one_hot(new, 4).float(), indices=new, hard=True)
    out = bank(inputs(), gate, SCALING, identity)
    assert torch.equal(out, torch.zeros_like(out))
    train_steps(bank)  # the frozen expert survives growth
    assert all(torch.equal(bank.effective()[name][0], before[name][0]) for name in bank.stacked)


# ---- injected -----------------------------------------------------------------------------------------------


def gpt2_config(**overrides) -> AdapterConfig:
    return AdapterConfig(
        **{
            "experts": "adapter",
            "placement": "parallel",
            "targets": ["mlp"],
            "router": "task",
            "num_experts": 2,
            "num_tasks": 2,
            "rank": 8,
            **overrides,
        }
    )


def lm_loss(model: nn.Module, batch: dict[str, Tensor], task_ids: Tensor) -> Tensor:
    with loramix.routing(model, task_ids=task_ids):
        return model(**batch, labels=batch["input_ids"]).loss


def logits(model: nn.Module, batch: dict[str, Tensor], task_ids: Tensor, **routing) -> Tensor:
    with torch.no_grad(), loramix.routing(model, task_ids=task_ids, **routing):
        return model(**batch).logits


def test_gpt2_parallel_identity_training_and_save_load(tmp_path: Path) -> None:
    """Beside each MLP: the base at init, a loss that falls under AdamW, and a save that loads bit for bit."""
    model = tiny_gpt2(lm_head=True)
    batch = text_inputs()
    task_ids = torch.tensor([0, 1, 0, 1])
    base = tiny_gpt2(lm_head=True)(**batch).logits.detach()
    report = loramix.inject(model, gpt2_config())
    assert [name for name, *_ in report.matched] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    layers = loramix.get_info(model).layers
    assert all(isinstance(layer, ParallelExperts) for layer in layers)
    assert all(isinstance(layer.experts, AdapterExperts) and layer.scaling == 0.1 for layer in layers)
    assert torch.equal(logits(model, batch, task_ids), base)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1
    )
    losses = []
    for _ in range(6):
        loss = lm_loss(model, batch, task_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    trained = logits(model, batch, task_ids)
    assert not torch.allclose(trained, base, atol=1e-4)
    keep = torch.tensor([True, False, True, False])
    kept = logits(model, batch, task_ids, keep_base=keep)
    assert torch.equal(kept[keep], base[keep])  # kept samples are the base model's, bit for bit

    loramix.save(model, tmp_path / "adapters")
    loaded = loramix.load(tiny_gpt2(lm_head=True), tmp_path / "adapters")
    assert loramix.get_info(loaded).config == loramix.get_info(model).config
    assert torch.equal(logits(loaded, batch, task_ids), trained)


def test_gpt2_parallel_refuses_merge_and_peft_export(tmp_path: Path) -> None:
    model = tiny_gpt2()
    loramix.inject(model, gpt2_config())
    with pytest.raises(InjectionError, match="'adapter' experts"):
        loramix.export_peft(model, tmp_path / "peft", task=0)
    with pytest.raises(InjectionError, match="adapter"):
        loramix.merge_and_unload(model, task=0)
    assert is_injected(model)  # a refused merge leaves the adapters in place


def test_wrap_around_linears() -> None:
    """Around Linear targets the layer runs `base(x) + delta(x)`: the base at init, then base + loop reference;
    merging is refused by kind."""
    model = tiny_mlp()
    x = mlp_inputs()
    base = model(x).detach()
    config = AdapterConfig(experts="adapter", targets=["fc1", "fc2"], router="token", num_experts=3, rank=4)
    loramix.inject(model, config)
    layers = loramix.get_info(model).layers
    assert all(isinstance(layer, LinearExperts) for layer in layers)
    assert torch.equal(model(x), base)

    layer = build_layer(LinearExperts, nn.Linear(IN, OUT), config, "layer")
    with torch.no_grad():
        layer.experts.up.normal_()
        layer.experts.up_bias.normal_()
    x = inputs().requires_grad_(True)
    out = layer(x)
    gate = layer.router(None, x).weights  # (n, t, e)
    want = layer.base_layer(x) + layer.experts.loop_reference(x, gate, layer.scaling)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    out.sum().backward()
    assert layer.experts.down.grad is not None and layer.experts.down.grad.abs().sum() > 0

    with pytest.raises(InjectionError, match="'adapter' experts"):
        loramix.merge_and_unload(model, gate=torch.tensor([1.0, 0.0, 0.0]))


def aligned_bank() -> AdapterExperts:
    """A bank whose widths suit the grouped GEMM (rows of 16 bytes), every parameter non-zero."""
    torch.manual_seed(0)
    bank = AdapterExperts(8, 12, num_experts=E, width=8)
    with torch.no_grad():
        for name in ("down_bias", "up", "up_bias"):
            getattr(bank, name).normal_()
    return bank


@pytest.mark.parametrize("kind", ["hard", "hard-keep", "topk-sample"])
def test_grouped_form_equals_the_gathers_and_the_loop_reference(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU, with widths aligned for the grouped GEMM and no more tokens than the bottleneck is wide, the hard
    and per-sample top-k gates run as grouped GEMMs (no weight copies): the same outputs as the loop reference and
    as the gathers, and exact zeros for the samples kept on the base."""
    import loramix.experts.adapter as adapter

    bank = aligned_bank()
    x = torch.randn(N, T, 8, generator=torch.Generator().manual_seed(1))
    gate, dense = make_gate(kind)
    assert gate is not None
    assert adapter.prefers_grouped(x, bank.down, bank.up)
    grouped = bank(x, gate, SCALING, identity).detach()
    want = bank.loop_reference(x, dense, SCALING).detach()
    monkeypatch.setattr(adapter, "prefers_grouped", lambda *_: False)
    gathered = bank(x, gate, SCALING, identity).detach()
    torch.testing.assert_close(grouped, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped, gathered, atol=1e-5, rtol=0)
    if gate.keep is not None:
        assert torch.equal(grouped[gate.keep], torch.zeros_like(grouped[gate.keep]))
    assert not adapter.prefers_grouped(torch.randn(N, 9, 8), bank.down, bank.up)  # more tokens than the width


@pytest.mark.parametrize("kind", ["hard", "hard-keep", "topk-sample"])
def test_grouped_form_trains_as_the_loop_reference(kind: str) -> None:
    """Training runs the grouped form too: the gradients of the input, of all four parameters and of the gate's
    weights at its chosen experts (what a top-k router learns from) equal the loop reference's."""
    import loramix.experts.adapter as adapter

    w = torch.randn(N, T, 12, generator=torch.Generator().manual_seed(5))
    results = []
    for fast in (True, False):
        bank = aligned_bank()
        x = torch.randn(N, T, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        gate, dense = make_gate(kind)
        assert gate is not None
        weights = gate.weights.detach().requires_grad_(True)
        gate = Gate(weights=weights, indices=gate.indices, hard=gate.hard, keep=gate.keep)
        if fast:
            assert adapter.prefers_grouped(x, bank.down, bank.up)  # autograd on, x and the bank needing grads
            out = bank(x, gate, SCALING, identity)
        else:
            out = bank.loop_reference(x, weights if dense.dtype != torch.long else dense, SCALING)
        (out * w).sum().backward()
        grads = [x.grad] + [getattr(bank, name).grad for name in bank.stacked]
        top = weights.grad.gather(-1, gate.indices) if kind.startswith("topk") else None  # (n, k)
        results.append([out.detach(), *grads, top])
    for got, want in zip(*results):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["hard", "topk-sample"])
def test_grouped_form_draws_the_gathers_dropout_mask(kind: str) -> None:
    """With dropout on, the grouped form draws the same mask as the gathers from the same random state: the same
    outputs, so a run trains alike through either form."""
    bank, drop = aligned_bank(), nn.Dropout(0.3).train()
    x = torch.randn(N, T, 8, generator=torch.Generator().manual_seed(1))
    gate, _ = make_gate(kind)
    assert gate is not None
    down, down_bias, up, up_bias = bank.weights()
    torch.manual_seed(7)
    grouped = bank._grouped(x, down, down_bias, up, up_bias, *pair_weights(gate, SCALING, x.dtype), drop)
    torch.manual_seed(7)
    gather = bank._hard if kind == "hard" else bank._topk
    gathered = gather(x, down, down_bias, up, up_bias, gate, SCALING, drop)
    torch.testing.assert_close(grouped, gathered, atol=1e-5, rtol=0)
    assert not torch.equal(
        grouped,
        bank._grouped(x, down, down_bias, up, up_bias, *pair_weights(gate, SCALING, x.dtype), nn.Identity()),
    )
