"""Per-example gradient features: one batched backward equals a batch-size-1 loop and torch.func per-sample grads.

Legend: n samples, t tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import loramix
from loramix.errors import ConfigError, RoutingError
from loramix.methods.elrea import (
    CountSketch,
    GradientFeaturizer,
    adam_state_by_name,
    init_experts_from_base,
    label_averaged_features,
    prompt_lm_loss,
    self_label_cross_entropy,
)
from tests.methods.elrea_toys import padded_batch, randomize_adapters, tiny_bert, tiny_gpt2

LENGTHS = [7, 5, 3, 6]  # right padding to 7 tokens
LABELS = torch.tensor([0, 2, 1, 2])
TOL = {"atol": 1e-5, "rtol": 1e-4}


def base_bert(seed: int = 0) -> nn.Module:
    model = tiny_bert(seed=seed)
    loramix.inject(model, {"num_experts": 1, "rank": 4, "router": "none", "exclude": ["classifier"]})
    randomize_adapters(model, seed)
    return model


def base_gpt2(seed: int = 0) -> nn.Module:
    model = tiny_gpt2(seed=seed)
    loramix.inject(model, {"num_experts": 1, "rank": 4, "router": "none"})
    randomize_adapters(model, seed)
    return model


def adapter_params(model: nn.Module) -> dict[str, Tensor]:
    return dict(loramix.adapter_state(model))


def loop_gradients(model: nn.Module, losses: list) -> dict[str, Tensor]:
    """The obvious reference: one autograd call per example, `{name: (n, *shape)}`."""
    params = adapter_params(model)
    rows = [torch.autograd.grad(loss(), list(params.values())) for loss in losses]
    return {name: torch.stack([row[j] for row in rows]) for j, name in enumerate(params)}


def assert_gradients_equal(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    assert any(g.abs().max() > 1e-3 for g in want.values())  # not trivially zero


def additive(allowed: Tensor) -> Tensor:
    """A prepared 4-d additive attention mask `(1, 1, t, t)` from a boolean `(t, t)` one: torch.func cannot
    trace the data-dependent checks Hugging Face runs when it builds a mask from a 2-d one."""
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


# ---- BERT classifier ---------------------------------------------------------------------------------------------
def bert_batch_loss(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits  # (n, c)
    return F.cross_entropy(logits, LABELS, reduction="none")  # (n,)


def test_bert_batched_gradients_equal_loop_and_vmap():
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    featurizer = GradientFeaturizer(model, projection_dim=None)
    got = featurizer.per_example_gradients(lambda: bert_batch_loss(model, ids, mask))

    def single(k: int):  # each example alone and unpadded
        length = LENGTHS[k]
        return lambda: F.cross_entropy(model(input_ids=ids[k : k + 1, :length]).logits, LABELS[k : k + 1])

    assert_gradients_equal(got, loop_gradients(model, [single(k) for k in range(len(LENGTHS))]))

    params = {n: p.detach() for n, p in adapter_params(model).items()}

    def loss_one(p: dict[str, Tensor], ids_1: Tensor, mask_1: Tensor, label: Tensor) -> Tensor:
        keys = additive(mask_1.bool()[None, :].expand(ids_1.shape[0], -1))  # (1, 1, t, t)
        logits = functional_call(model, p, (), {"input_ids": ids_1[None], "attention_mask": keys}).logits
        return F.cross_entropy(logits, label[None])

    want = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params, ids, mask, LABELS)
    assert_gradients_equal(got, {n: want[n] for n in got})


def test_padding_does_not_change_gradients():
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    extra = torch.zeros(len(LENGTHS), 5, dtype=torch.long)  # five more pad columns
    featurizer = GradientFeaturizer(model, projection_dim=None)
    short = featurizer.per_example_gradients(lambda: bert_batch_loss(model, ids, mask))
    long = featurizer.per_example_gradients(
        lambda: bert_batch_loss(model, torch.cat([ids, extra], 1), torch.cat([mask, extra], 1))
    )
    assert_gradients_equal(long, short)


# ---- GPT-2, prompt-only loss -----------------------------------------------------------------------------------
PROMPTS = [4, 2, 3, 5]  # prompt tokens of each example; the rest of LENGTHS is the response


def prompt_batch() -> tuple[Tensor, Tensor, Tensor]:
    ids, mask = padded_batch(LENGTHS, seed=1)
    prompt = (torch.arange(ids.shape[1])[None] < torch.tensor(PROMPTS)[:, None]).long()  # (n, t)
    return ids, mask, prompt


def test_gpt2_prompt_loss_gradients_equal_loop_and_vmap():
    model = base_gpt2()
    ids, mask, prompt = prompt_batch()
    featurizer = GradientFeaturizer(model, projection_dim=None)
    got = featurizer.per_example_gradients(
        lambda: prompt_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, prompt)
    )

    def single(k: int):  # prompt and response alone, unpadded
        length = LENGTHS[k]
        one, one_prompt = ids[k : k + 1, :length], prompt[k : k + 1, :length]
        return lambda: prompt_lm_loss(model(input_ids=one).logits, one, one_prompt)[0]

    assert_gradients_equal(got, loop_gradients(model, [single(k) for k in range(len(LENGTHS))]))

    params = {n: p.detach() for n, p in adapter_params(model).items()}
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def loss_one(p: dict[str, Tensor], ids_1: Tensor, mask_1: Tensor, prompt_1: Tensor) -> Tensor:
        keys = additive(causal & mask_1.bool()[None, :])  # (1, 1, t, t)
        logits = functional_call(model, p, (), {"input_ids": ids_1[None], "attention_mask": keys}).logits
        return prompt_lm_loss(logits, ids_1[None], prompt_1[None])[0]

    want = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params, ids, mask, prompt)
    assert_gradients_equal(got, {n: want[n] for n in got})


def test_prompt_loss_ignores_response_and_padding():
    model = base_gpt2()
    ids, mask, prompt = prompt_batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    changed = ids.clone()
    changed[prompt == 0] = 7  # responses and padding differ, prompts do not
    logits_changed = model(input_ids=changed, attention_mask=mask).logits
    torch.testing.assert_close(
        prompt_lm_loss(logits, ids, prompt), prompt_lm_loss(logits_changed, changed, prompt)
    )


# ---- features -------------------------------------------------------------------------------------------------
def test_features_are_the_normalised_sketch_of_the_gradients():
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    featurizer = GradientFeaturizer(model, projection_dim=64, seed=3)
    feats = featurizer(lambda: bert_batch_loss(model, ids, mask))
    grads = featurizer.per_example_gradients(lambda: bert_batch_loss(model, ids, mask))
    assert feats.shape == (4, 64)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(feats, CountSketch(64, seed=3)(grads))
    exact = GradientFeaturizer(model, projection_dim=None)(lambda: bert_batch_loss(model, ids, mask))
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    torch.testing.assert_close(exact, F.normalize(flat, dim=-1))


@pytest.mark.parametrize("params", ["A", "B"])
def test_params_selects_matrices(params: str):
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    all_grads = GradientFeaturizer(model, projection_dim=None).per_example_gradients(
        lambda: bert_batch_loss(model, ids, mask)
    )
    some = GradientFeaturizer(model, projection_dim=None, params=params).per_example_gradients(
        lambda: bert_batch_loss(model, ids, mask)
    )
    assert list(some) == [n for n in all_grads if n.endswith(f".experts.{params}")]
    assert_gradients_equal(some, {n: all_grads[n] for n in some})


def test_adam_preconditioning_is_one_adam_step_from_the_state():
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    optimizer = torch.optim.AdamW(adapter_params(model).values(), lr=1e-3, betas=(0.8, 0.99))
    for _ in range(2):
        optimizer.zero_grad()
        bert_batch_loss(model, ids, mask).mean().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = adam_state_by_name(model, optimizer)
    featurizer = GradientFeaturizer(
        model, projection_dim=None, optimizer_state=state, adam_betas=(0.8, 0.99), adam_eps=1e-8
    )
    loss = lambda: bert_batch_loss(model, ids, mask)  # noqa: E731
    raw = featurizer.per_example_gradients(loss)
    pre = featurizer.per_example_gradients(loss, preconditioned=True)
    for name, g in raw.items():
        m = 0.8 * state[name]["exp_avg"] + 0.2 * g
        v = 0.99 * state[name]["exp_avg_sq"] + 0.01 * g**2
        torch.testing.assert_close(pre[name], m / torch.sqrt(v + 1e-8))
    flat = torch.cat([p.flatten(1) for p in pre.values()], 1)
    torch.testing.assert_close(featurizer(loss), F.normalize(flat, dim=-1))
    with pytest.raises(ConfigError, match="exp_avg"):
        GradientFeaturizer(model, optimizer_state={})


def test_featurizer_leaves_the_model_as_it_found_it():
    model = base_bert()
    model.train()
    for param in adapter_params(model).values():
        param.requires_grad_(False)
    ids, mask = padded_batch(LENGTHS)
    feats = GradientFeaturizer(model, projection_dim=32)(lambda: bert_batch_loss(model, ids, mask))
    assert torch.isfinite(feats).all()
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in adapter_params(model).values())


def test_featurize_runs_batch_by_batch():
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    featurizer = GradientFeaturizer(model, projection_dim=32)
    whole = featurizer(lambda: self_label_cross_entropy(model(input_ids=ids, attention_mask=mask).logits))
    batches = [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
    parts = featurizer.featurize(
        batches, lambda b: self_label_cross_entropy(model(input_ids=b[0], attention_mask=b[1]).logits)
    )
    torch.testing.assert_close(parts, whole, **TOL)


def test_sign_invariant_features_agree_for_a_gradient_and_its_negation():
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    signed = GradientFeaturizer(model, projection_dim=256, seed=0)
    axial = GradientFeaturizer(model, projection_dim=256, seed=0, sign_invariant=True)
    for featurizer, sign in ((signed, -1.0), (axial, 1.0)):
        plus = featurizer(lambda: bert_batch_loss(model, ids, mask))
        minus = featurizer(lambda: -bert_batch_loss(model, ids, mask))
        torch.testing.assert_close(minus, sign * plus, **TOL)
    with pytest.raises(ConfigError, match="projection_dim"):
        GradientFeaturizer(model, projection_dim=None, sign_invariant=True)


def test_label_averaged_features_equal_the_weighted_loop_reference():
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    axial = GradientFeaturizer(model, projection_dim=256, seed=0, sign_invariant=True)
    params = adapter_params(model)

    def logits() -> Tensor:
        return model(input_ids=ids, attention_mask=mask).logits.float()  # (n, 3)

    got = label_averaged_features(axial, logits, top_labels=2)
    probs = torch.softmax(logits().detach(), -1)
    rows = []
    for k in range(len(LENGTHS)):  # one example, one label at a time: autograd, sketch, map, weight, sum
        p, labels = probs[k].topk(2)
        total = 0
        for weight, label in zip(p, labels):
            one = model(input_ids=ids[k : k + 1, : LENGTHS[k]]).logits.float()  # unpadded
            grads = torch.autograd.grad(F.cross_entropy(one, label[None]), list(params.values()))
            sketched = axial.sketch({n: g[None] for n, g in zip(params, grads)})
            total = total + weight * axial.axial(sketched)
        rows.append(F.normalize(total, dim=-1))
    torch.testing.assert_close(got, torch.cat(rows), **TOL)
    one_label = label_averaged_features(axial, logits, top_labels=1)
    torch.testing.assert_close(one_label, axial(lambda: self_label_cross_entropy(logits())), **TOL)
    assert not torch.allclose(got, one_label, atol=1e-3)


def test_label_averaging_adds_nothing_for_two_classes_and_skips_impossible_labels():
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    axial = GradientFeaturizer(model, projection_dim=256, seed=0, sign_invariant=True)

    def two_classes() -> Tensor:  # the third column belongs to another task: probability 0
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return logits.masked_fill(torch.tensor([False, False, True]), float("-inf"))

    both = label_averaged_features(axial, two_classes, top_labels=3)
    assert torch.isfinite(both).all()
    # with two labels, the gradient for the other label is the same axis, opposite sign
    torch.testing.assert_close(both, label_averaged_features(axial, two_classes, top_labels=1), **TOL)
    with pytest.raises(ConfigError, match="sign-invariant"):
        label_averaged_features(GradientFeaturizer(model, projection_dim=256), two_classes)


def test_self_label_cross_entropy_uses_the_predicted_label():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    want = F.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    torch.testing.assert_close(self_label_cross_entropy(logits), want)


def test_loss_must_be_per_sample():
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    with pytest.raises(ConfigError, match="per sample"):
        GradientFeaturizer(model)(lambda: bert_batch_loss(model, ids, mask).mean())


def test_expert_of_a_task_routed_bank_gives_the_base_adapter_features():
    base = base_bert()
    bank = tiny_bert()
    loramix.inject(
        bank, {"num_experts": 3, "rank": 4, "router": "task", "num_tasks": 3, "exclude": ["classifier"]}
    )
    randomize_adapters(bank, seed=5)
    init_experts_from_base(bank, loramix.adapter_state(base))
    with torch.no_grad():  # experts 1 and 2 drift away from the base; expert 0 must still match it
        for layer in loramix.get_info(bank).layers:
            layer.experts.unfreeze_experts()
            layer.experts.A[1:] += 0.1
            layer.experts.B[1:] -= 0.1
    ids, mask = padded_batch(LENGTHS)
    want = GradientFeaturizer(base, projection_dim=None).per_example_gradients(
        lambda: bert_batch_loss(base, ids, mask)
    )

    def routed_loss(task: int):
        def loss() -> Tensor:
            with loramix.routing(bank, task_ids=torch.full((4,), task)):
                return bert_batch_loss(bank, ids, mask)

        return loss

    got = GradientFeaturizer(bank, projection_dim=None, expert=0).per_example_gradients(routed_loss(0))
    assert_gradients_equal(got, want)
    with pytest.raises(RoutingError, match="routed"):
        GradientFeaturizer(bank, projection_dim=None, expert=0)(routed_loss(1))
