"""ELREA on a causal LM, end to end through the public API: a base adapter, prompt-only gradient features, clusters,
cluster experts grown from the base, and :class:`ElreaModel` answering with weights, logits and generated text.

Two prompt domains draw their tokens from disjoint ranges and ask for different continuations, so the gradient
clusters should find the domains without being told them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import Tensor

import loramix
from loramix.errors import CheckpointError, ConfigError
from loramix.methods.elrea import (
    ElreaModel,
    GradientFeaturizer,
    base_centroid,
    causal_lm_loss,
    cluster_features,
    expand_to_bank,
    lm_prompt_loss,
)
from tests.methods.elrea_toys import tiny_gpt2

PROMPT, RESPONSE, SEP, DIM = 6, 3, 2, 256
DOMAINS = [(10, 40), (50, 80)]  # token ranges of the two prompt domains


def domain_batch(domain: int, n: int, seed: int) -> dict[str, Tensor]:
    """Prompts from the domain's token range, a separator, then the response: the prompt's first three tokens
    (domain 0) or its last three (domain 1). `prompt_mask` covers the prompt and the separator."""
    generator = torch.Generator().manual_seed(seed)
    low, high = DOMAINS[domain]
    prompt = torch.randint(low, high, (n, PROMPT), generator=generator)
    response = prompt[:, :RESPONSE] if domain == 0 else prompt[:, -RESPONSE:]
    ids = torch.cat([prompt, torch.full((n, 1), SEP), response], dim=1)
    prompt_mask = torch.zeros_like(ids)
    prompt_mask[:, : PROMPT + 1] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_mask": prompt_mask}


def mixed_batch(n: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    halves = [domain_batch(d, n // 2, seed * 2 + d) for d in range(2)]
    batch = {k: torch.cat([h[k] for h in halves]) for k in halves[0]}
    return batch, torch.arange(2).repeat_interleave(n // 2)


def train(model, steps: int, seed: int, route: Tensor | None = None, clusters=None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(steps):
        batch, domains = mixed_batch(16, seed * 1000 + step)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with loramix.routing(model, task_ids=None if clusters is None else clusters[domains] + 1):
            loss = causal_lm_loss(model(**inputs).logits, batch["input_ids"]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained() -> dict:
    """The whole pipeline once: base adapter, features, clusters, experts; and the ElreaModel over them."""
    model = tiny_gpt2(seed=0)
    loramix.inject(model, {"num_experts": 1, "rank": 4, "alpha": 8, "router": "none", "dropout": 0.0})
    train(model, 30, seed=0)
    features_batch, domains = mixed_batch(40, seed=7)
    featurizer = GradientFeaturizer(model, projection_dim=DIM, seed=0)
    feats = featurizer(lambda: lm_prompt_loss(model, features_batch))
    clusters = cluster_features(feats, 2, seed=0)
    expand_to_bank(model, clusters.n_clusters)
    # each domain's majority cluster trains on it (the clustering decides; the domain only draws the batch)
    domain_cluster = torch.stack([clusters.labels[domains == d].mode().values for d in range(2)])
    train(model, 20, seed=1, clusters=domain_cluster)
    elrea = ElreaModel(
        model, clusters.centroids, base_centroid(feats), feature_loss=lm_prompt_loss, projection_dim=DIM
    )
    return {"elrea": elrea, "clusters": clusters, "domains": domains, "feats": feats}


def prompts(n: int = 4, seed: int = 11) -> tuple[dict[str, Tensor], Tensor]:
    batch, domains = mixed_batch(n, seed)
    ids = batch["input_ids"][:, : PROMPT + 1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, domains


def test_prompt_gradients_cluster_by_domain(trained: dict):
    labels, domains = trained["clusters"].labels, trained["domains"]
    assert adjusted_rand_score(domains.numpy(), labels.numpy()) > 0.6
    assert labels[domains == 0].mode().values != labels[domains == 1].mode().values


def test_weights_pick_the_cluster_of_the_prompts_domain(trained: dict):
    elrea, clusters, domains = trained["elrea"], trained["clusters"], trained["domains"]
    inputs, test_domains = prompts(32)
    weights = elrea.weights(inputs)
    assert weights.shape == (32, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(32))
    majority = torch.stack([clusters.labels[domains == d].mode().values for d in range(2)])
    agree = (weights[:, 1:].argmax(-1) == majority[test_domains]).float().mean()
    assert agree >= 0.75  # chance is 0.5


def test_ensemble_logits_are_the_weighted_experts(trained: dict):
    elrea = trained["elrea"]
    inputs, _ = prompts()
    weights = elrea.weights(inputs)
    want = torch.zeros(4, PROMPT + 1, 99)
    with torch.no_grad():
        for expert in range(3):
            with loramix.routing(elrea.model, task_ids=torch.full((4,), expert)):
                want += weights[:, expert, None, None] * elrea.model(**inputs).logits
    torch.testing.assert_close(elrea.logits(inputs), want, rtol=1e-5, atol=1e-5)
    top = elrea.logits(inputs, mode="top1")
    with torch.no_grad(), loramix.routing(elrea.model, task_ids=weights.argmax(-1)):
        torch.testing.assert_close(top, elrea.model(**inputs).logits)


def test_ensemble_generation_equals_a_step_by_step_greedy_loop(trained: dict):
    elrea = trained["elrea"]
    inputs, _ = prompts()
    weights = elrea.weights(inputs)
    fast = elrea.generate(**inputs, max_new_tokens=RESPONSE, pad_token_id=0)
    ids = inputs["input_ids"]
    for _ in range(RESPONSE):  # the slow reference: the whole ensemble on the growing sequence, no cache
        step = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        ids = torch.cat([ids, elrea.logits(step, weights=weights)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, ids)


def test_top1_generation_equals_the_chosen_expert_alone(trained: dict):
    elrea = trained["elrea"]
    inputs, _ = prompts()
    chosen = elrea.weights(inputs).argmax(-1)
    got = elrea.generate(**inputs, mode="top1", max_new_tokens=RESPONSE, pad_token_id=0, do_sample=False)
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        with loramix.routing(elrea.model, task_ids=chosen[i : i + 1]):
            alone = elrea.model.generate(**one, max_new_tokens=RESPONSE, pad_token_id=0, do_sample=False)
        assert torch.equal(got[i : i + 1], alone)


def test_save_and_load_keep_the_centroids_and_the_outputs(trained: dict, tmp_path: Path):
    elrea = trained["elrea"]
    elrea.save(tmp_path / "elrea")
    loaded = ElreaModel.load(tiny_gpt2(seed=0), tmp_path / "elrea", feature_loss=lm_prompt_loss)
    assert torch.equal(loaded.centroids, elrea.centroids)
    assert torch.equal(loaded.base_centroid, elrea.base_centroid)
    assert (loaded.projection_dim, loaded.seed, loaded.sign_invariant, loaded.mode) == (
        DIM,
        0,
        False,
        "ensemble",
    )
    inputs, _ = prompts()
    assert torch.equal(loaded.weights(inputs), elrea.weights(inputs))
    assert torch.equal(loaded.logits(inputs), elrea.logits(inputs))
    kwargs = {"max_new_tokens": RESPONSE, "pad_token_id": 0}
    assert torch.equal(loaded.generate(**inputs, **kwargs), elrea.generate(**inputs, **kwargs))


def test_save_and_load_keep_sign_invariant_features(trained: dict, tmp_path: Path):
    elrea = trained["elrea"]
    axial = ElreaModel(
        elrea.model,
        elrea.centroids,
        elrea.base_centroid,
        feature_loss=lm_prompt_loss,
        projection_dim=DIM,
        sign_invariant=True,
    )
    axial.save(tmp_path / "axial")
    loaded = ElreaModel.load(tiny_gpt2(seed=0), tmp_path / "axial", feature_loss=lm_prompt_loss)
    assert loaded.sign_invariant
    inputs, _ = prompts()
    assert not torch.equal(axial.features(inputs), elrea.features(inputs))
    assert torch.equal(loaded.features(inputs), axial.features(inputs))


def test_errors_name_the_problem(trained: dict, tmp_path: Path):
    elrea = trained["elrea"]
    inputs, _ = prompts()
    with pytest.raises(ConfigError, match="greedily"):
        elrea.generate(**inputs, max_new_tokens=2, do_sample=True)
    with pytest.raises(ConfigError, match="one expert per centroid"):
        ElreaModel(elrea.model, elrea.centroids[:1], elrea.base_centroid, feature_loss=lm_prompt_loss)
    with pytest.raises(ConfigError, match="must agree"):
        ElreaModel(elrea.model, elrea.centroids, elrea.base_centroid, feature_loss=lm_prompt_loss)
    with pytest.raises(ConfigError, match="single expert"):
        expand_to_bank(elrea.model, 2)
    plain = tiny_gpt2()
    loramix.inject(plain, {"num_experts": 1, "rank": 4, "router": "none"})
    loramix.save(plain, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not an ELREA model"):
        ElreaModel.load(tiny_gpt2(), tmp_path / "plain", feature_loss=lm_prompt_loss)


def test_elrea_serves_a_model_whose_inputs_are_not_token_ids():
    """ "On any model": a plain MLP called as `model(x)`, its batches `{"x": ...}`; the ensemble's logits are the
    weighted experts', computed here one expert at a time."""

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = MLP()
    loramix.inject(model, {"num_experts": 1, "rank": 2, "router": "none", "targets": ["a", "b"]})
    for param in loramix.adapter_state(model).values():
        torch.nn.init.normal_(param, std=0.3)

    def self_label_loss(m: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        out = m(batch["x"])
        return torch.nn.functional.cross_entropy(out, out.argmax(-1), reduction="none")

    x = torch.randn(40, 8)
    featurizer = GradientFeaturizer(model, projection_dim=64, seed=0)
    feats = featurizer.featurize(
        [{"x": x[i : i + 10]} for i in range(0, 40, 10)], lambda b: self_label_loss(model, b)
    )
    clusters = cluster_features(feats, seed=0)
    expand_to_bank(model, clusters.n_clusters)
    for param in loramix.adapter_state(model).values():  # the experts apart from the base
        param.data.add_(0.3 * torch.randn(param.shape))
    bank = ElreaModel(
        model, clusters.centroids, base_centroid(feats), feature_loss=self_label_loss, projection_dim=64
    )
    inputs = {"x": x[:4]}
    weights = bank.weights(inputs)
    assert weights.shape == (4, clusters.n_clusters + 1)
    with torch.no_grad():
        experts = []
        for e in range(clusters.n_clusters + 1):
            with loramix.routing(model, task_ids=torch.full((4,), e)):
                experts.append(model(inputs["x"]))
        expected = sum(weights[:, e, None] * out for e, out in enumerate(experts))
    torch.testing.assert_close(bank.logits(inputs), expected, atol=1e-5, rtol=0)
