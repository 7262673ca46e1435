"""ELREA inference: routing weights, the one-pass logit ensemble, top-1 routing, and the expert bank set-up.

Legend: n samples, t tokens, E experts (base + clusters).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loramix
from loramix.errors import CheckpointError, ConfigError
from loramix.methods.elrea import (
    GradientFeaturizer,
    base_centroid,
    cluster_features,
    cluster_task_ids,
    ensemble_logits,
    init_experts_from_base,
    replicate_batch,
    routed_forward,
    routing_weights,
    self_label_cross_entropy,
)
from tests.methods.elrea_toys import padded_batch, randomize_adapters, tiny_bert, tiny_gpt2

EXPERTS = 3  # the base adapter and two cluster experts
TOL = {"atol": 1e-5, "rtol": 1e-5}


def bank(model: nn.Module, seed: int = 0, **extra) -> nn.Module:
    config = {"num_experts": EXPERTS, "rank": 4, "router": "task", "num_tasks": EXPERTS, **extra}
    loramix.inject(model, config)
    randomize_adapters(model, seed)  # every expert different
    return model


def some_weights(n: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, EXPERTS, generator=generator) * 2, dim=-1)


def counting(forward):
    calls = []

    def wrapped(inputs, task_ids):
        calls.append(len(task_ids))
        return forward(inputs, task_ids)

    return wrapped, calls


# ---- weights ---------------------------------------------------------------------------------------------------
def test_routing_weights_are_a_softmax_of_standardised_cosines():
    generator = torch.Generator().manual_seed(0)
    feats, centroids = torch.randn(6, 10, generator=generator), torch.randn(2, 10, generator=generator)
    base = base_centroid(torch.randn(20, 10, generator=generator))
    w = routing_weights(feats, centroids, 0.5, base_centroid=base)
    assert w.shape == (6, EXPERTS)
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    all_centroids = torch.cat([base[None], centroids])
    cos = F.normalize(feats, dim=-1) @ F.normalize(all_centroids, dim=-1).t()  # (n, E)
    z = (cos - cos.mean(-1, keepdim=True)) / cos.std(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(w, torch.softmax(z / 0.5, -1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(routing_weights(feats * 3, all_centroids, 0.5), w)  # norms do not matter
    assert torch.equal(w.argmax(-1), cos.argmax(-1))
    sharper = routing_weights(feats, all_centroids, 0.1)
    assert (sharper.max(-1).values >= w.max(-1).values).all()
    with pytest.raises(ConfigError, match="projection"):
        routing_weights(feats, torch.randn(2, 11))


def test_base_centroid_is_the_normalised_mean_direction():
    feats = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    torch.testing.assert_close(base_centroid(feats), torch.tensor([1.0, 1.0]) / 2**0.5)


# ---- one-pass ensemble -----------------------------------------------------------------------------------------
def explicit_ensemble(forward, inputs: dict, weights: Tensor) -> Tensor:
    """The obvious form: E separate forward passes, one per expert, then the weighted sum."""
    n = weights.shape[0]
    per_expert = [forward(inputs, torch.full((n,), e)) for e in range(EXPERTS)]
    return sum(weights[:, e].reshape(n, *[1] * (p.dim() - 1)) * p for e, p in enumerate(per_expert))


def test_one_pass_ensemble_equals_separate_passes_bert():
    model = bank(tiny_bert(), exclude=["classifier"])
    ids, mask = padded_batch([7, 5, 3, 6])
    inputs = {"input_ids": ids, "attention_mask": mask}
    weights = some_weights(4)
    forward, calls = counting(routed_forward(model))
    got = ensemble_logits(forward, inputs, weights)
    assert calls == [4 * EXPERTS]  # one forward pass over the replicated batch
    torch.testing.assert_close(got, explicit_ensemble(routed_forward(model), inputs, weights), **TOL)
    chunked, calls = counting(routed_forward(model))
    torch.testing.assert_close(ensemble_logits(chunked, inputs, weights, experts_per_pass=2), got, **TOL)
    assert calls == [8, 4]


def test_one_pass_ensemble_equals_separate_passes_gpt2():
    model = bank(tiny_gpt2())
    ids, mask = padded_batch([6, 4, 5])
    inputs = {"input_ids": ids, "attention_mask": mask}
    weights = some_weights(3, seed=1)
    got = ensemble_logits(routed_forward(model), inputs, weights)
    assert got.shape == (3, 6, 99)
    torch.testing.assert_close(got, explicit_ensemble(routed_forward(model), inputs, weights), **TOL)


def test_top1_equals_running_the_chosen_expert_alone():
    model = bank(tiny_bert(), exclude=["classifier"])
    ids, mask = padded_batch([7, 5, 3, 6, 4])
    weights = torch.eye(EXPERTS)[torch.tensor([2, 0, 1, 2, 1])] * 0.5 + 0.5 / EXPERTS
    forward, calls = counting(routed_forward(model))
    got = ensemble_logits(forward, {"input_ids": ids, "attention_mask": mask}, weights, mode="top1")
    assert calls == [5]
    for k, expert in enumerate([2, 0, 1, 2, 1]):
        length = int(mask[k].sum())
        with loramix.routing(model, task_ids=torch.tensor([expert])):
            alone = model(input_ids=ids[k : k + 1, :length]).logits[0]
        torch.testing.assert_close(got[k], alone, **TOL)


def test_replicate_batch_is_copy_major_and_keeps_other_values():
    x = torch.arange(6).reshape(2, 3)
    out = replicate_batch({"x": x, "flag": True, "pair": (x, torch.tensor(1.0))}, 3, 2)
    assert torch.equal(out["x"], torch.cat([x, x, x]))
    assert out["flag"] is True and torch.equal(out["pair"][1], torch.tensor(1.0))


# ---- the expert bank -------------------------------------------------------------------------------------------
def base_and_bank(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    base = tiny_bert(seed=seed)
    loramix.inject(base, {"num_experts": 1, "rank": 4, "router": "none", "exclude": ["classifier"]})
    randomize_adapters(base, seed)
    experts = tiny_bert(seed=seed)  # the same backbone and head
    loramix.inject(
        experts,
        {
            "num_experts": EXPERTS,
            "rank": 4,
            "router": "task",
            "num_tasks": EXPERTS,
            "exclude": ["classifier"],
        },
    )
    init_experts_from_base(experts, loramix.adapter_state(base))
    return base, experts


def test_experts_start_as_the_base_adapter_and_the_base_stays_frozen():
    base, experts = base_and_bank()
    ids, mask = padded_batch([7, 5, 3])
    want = base(input_ids=ids, attention_mask=mask).logits
    for expert in range(EXPERTS):
        with loramix.routing(experts, task_ids=torch.full((3,), expert)):
            got = experts(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, **TOL)
    assert all(layer.experts.frozen_experts == [0] for layer in loramix.get_info(experts).layers)
    assert torch.equal(cluster_task_ids(torch.tensor([0, 1, 0])), torch.tensor([1, 2, 1]))
    broken = tiny_bert()
    loramix.inject(broken, {"num_experts": EXPERTS, "rank": 2, "router": "task", "num_tasks": EXPERTS})
    with pytest.raises(CheckpointError):
        init_experts_from_base(broken, loramix.adapter_state(base))


def test_pipeline_with_untrained_experts_reproduces_the_base_model():
    """Features -> clusters -> weights -> ensemble; experts equal to the base must give the base's logits."""
    base, experts = base_and_bank()
    ids, mask = padded_batch([7, 5, 3, 6, 7, 4, 5, 6], seed=2)
    featurizer = GradientFeaturizer(base, projection_dim=256, seed=0)
    train = featurizer(lambda: self_label_cross_entropy(base(input_ids=ids, attention_mask=mask).logits))
    clusters = cluster_features(train, EXPERTS - 1, seed=0)
    test_ids, test_mask = padded_batch([6, 3], seed=3)
    inputs = {"input_ids": test_ids, "attention_mask": test_mask}

    def test_loss() -> Tensor:  # the bank featurizes its test inputs itself, through expert 0
        with loramix.routing(experts, task_ids=torch.zeros(2, dtype=torch.long)):
            return self_label_cross_entropy(experts(**inputs).logits)

    test = GradientFeaturizer(experts, projection_dim=256, seed=0, expert=0)(test_loss)
    want_test = featurizer(lambda: self_label_cross_entropy(base(**inputs).logits))
    torch.testing.assert_close(test, want_test, **TOL)
    weights = routing_weights(test, clusters.centroids, base_centroid=base_centroid(train))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    logits = ensemble_logits(routed_forward(experts), inputs, weights)
    torch.testing.assert_close(logits, base(**inputs).logits, **TOL)
