"""A trained ELREA bank as one object, for any model: classifiers and causal LMs alike.

:class:`ElreaModel` holds the bank (expert 0 the base adapter, expert c + 1 trained on cluster c), the centroids
and the feature settings. It featurizes inputs on the base adapter, weights the experts, and answers with the
ensemble's logits or with generated text; it saves to, and loads from, one loramix adapter directory (safetensors
and JSON, the centroids among the tensors).

Generation with the ensemble runs through Hugging Face `generate` with greedy decoding (KV cache, stopping
criteria and the rest come with it): the batch runs as C + 1 copies, copy e routed to expert e, and a logits
processor combines the copies' next-token logits with the input's weights and makes every copy take the same
token. The tests check it against a step-by-step loop on prompts of one length.

Legend: n samples, E = C + 1 experts, k feature dimension, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loramix.context import routing
from loramix.errors import CheckpointError, ConfigError
from loramix.growth import grow
from loramix.inject import adapter_state, get_info
from loramix.methods.elrea.ensemble import Mode, ensemble_logits, routed_forward, routing_weights
from loramix.methods.elrea.experts import init_experts_from_base
from loramix.methods.elrea.features import GradientFeaturizer, prompt_lm_loss, self_label_cross_entropy
from loramix.routers import TaskRouter

FeatureLoss = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
CENTROIDS, BASE_CENTROID = "elrea.centroids", "elrea.base_centroid"
NOT_MODEL_INPUTS = ("prompt_mask", "labels")


def model_inputs(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The keyword arguments a model takes: `inputs` without the feature-only keys (`prompt_mask`, `labels`)."""
    return {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}


def lm_prompt_loss(model: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    """ELREA's label-free loss for causal LMs, `(n,)`: the next-token loss on the prompt tokens only
    (`inputs["prompt_mask"]`; without one, every attended token counts, as for a prompt about to be answered)."""
    ids = inputs["input_ids"]
    prompt = inputs.get("prompt_mask", inputs.get("attention_mask"))
    logits = model(**model_inputs(inputs)).logits
    return prompt_lm_loss(logits, ids, torch.ones_like(ids) if prompt is None else prompt)


def classifier_self_label_loss(model: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    """ELREA's label-free loss for classifiers, `(n,)`: cross-entropy against the model's own predicted label."""
    return self_label_cross_entropy(model(**model_inputs(inputs)).logits)


@torch.no_grad()
def expand_to_bank(model: nn.Module, n_clusters: int, *, freeze_base: bool = True) -> nn.Module:
    """Turn a model holding one base adapter into the ELREA bank, in place (:func:`loramix.grow`): C + 1 experts
    routed by task id, every one starting as the base adapter, expert 0 frozen (it stays the base). Returns the
    model; build the optimizer after it.

    Example:
        >>> loramix.inject(model, {"num_experts": 1, "rank": 8, "router": "none"})  # train it: the base adapter
        >>> expand_to_bank(model, clusters.n_clusters)  # train expert c + 1 on cluster c
    """
    config = get_info(model).config
    if config.num_experts != 1:
        raise ConfigError(f"the base adapter must be a single expert; this model has {config.num_experts}")
    if n_clusters < 1:
        raise ConfigError(f"n_clusters must be at least 1, got {n_clusters}")
    base = {k: v.detach().clone() for k, v in adapter_state(model).items()}
    experts = n_clusters + 1
    grow(model, num_experts=experts, num_tasks=experts, router="task")
    init_experts_from_base(model, base, freeze_base=freeze_base)
    return model


class _SameTokenForEveryCopy:
    """A `generate` logits processor: combine the copies' next-token logits `(E n, v)` with the weights `(n, E)`
    and give every copy of a sample only the combined argmax, so greedy decoding keeps the copies together."""

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights.float()

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        n, experts = self.weights.shape
        per_copy = scores.float().unflatten(0, (experts, n))  # (E, n, v)
        combined = (self.weights.t().to(scores.device)[..., None] * per_copy).sum(0)  # (n, v)
        choice = combined.argmax(-1).repeat(experts)  # (E n,)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, choice[:, None], 0.0)


class ElreaModel:
    """The ELREA bank with its centroids: `weights`, `logits` and `generate` for inputs without task labels.

    Args:
        model: the bank (see :func:`expand_to_bank`), unwrapped.
        centroids: `(C, k)` cluster centroids; expert c + 1 belongs to cluster c.
        base_centroid: `(k,)` the base adapter's centroid (:func:`base_centroid` of the training features).
        feature_loss: `feature_loss(model, inputs) -> (n,)`, label-free and per sample; the same as the one that
            made the training features (:func:`lm_prompt_loss`, :func:`classifier_self_label_loss`).
        projection_dim, seed, sign_invariant: how the training features were made (see
            :class:`GradientFeaturizer`).
        temperature: of the softmax over the standardised cosine similarities.
        mode: "ensemble" (weighted logits of all experts) or "top1" (the best expert alone).

    Example:
        >>> elrea = ElreaModel(bank, clusters.centroids, base_centroid(train_feats), feature_loss=lm_prompt_loss)
        >>> out = elrea.generate(ids, attention_mask=mask, max_new_tokens=32)
        >>> elrea.save("runs/elrea"); elrea = ElreaModel.load(fresh_model, "runs/elrea", feature_loss=lm_prompt_loss)
    """

    def __init__(
        self,
        model: nn.Module,
        centroids: Tensor,
        base_centroid: Tensor,
        *,
        feature_loss: FeatureLoss,
        projection_dim: int | None = 2048,
        seed: int = 0,
        sign_invariant: bool = False,
        temperature: float = 1.0,
        mode: Mode = "ensemble",
    ) -> None:
        info = get_info(model)
        config = info.config
        if not isinstance(info.model_router, TaskRouter) or config.num_experts != len(centroids) + 1:
            raise ConfigError(
                f"the bank must route by task with one expert per centroid plus the base: {len(centroids) + 1} "
                f"experts; this model has {config.num_experts} with router '{config.router}'"
            )
        dims = {centroids.shape[-1], base_centroid.shape[-1]} | (
            {projection_dim} if projection_dim else set()
        )
        if len(dims) != 1:
            raise ConfigError(
                f"centroids ({centroids.shape[-1]}), base centroid ({base_centroid.shape[-1]}) and projection_dim "
                f"({projection_dim}) must agree: pass the projection_dim of the featurizer that made the centroids"
            )
        if mode not in ("ensemble", "top1"):
            raise ConfigError(f"mode must be 'ensemble' or 'top1', got {mode!r}")
        self.model, self.centroids, self.base_centroid = model, centroids.float(), base_centroid.float()
        self.feature_loss, self.temperature, self.mode = feature_loss, temperature, mode
        self.projection_dim, self.seed, self.sign_invariant = projection_dim, seed, sign_invariant
        self.featurizer = GradientFeaturizer(
            model, projection_dim=projection_dim, seed=seed, expert=0, sign_invariant=sign_invariant
        )

    @property
    def num_experts(self) -> int:
        return len(self.centroids) + 1

    def features(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Gradient features `(n, k)` of `inputs` on the base adapter (expert 0)."""
        n = next(v for v in inputs.values() if isinstance(v, Tensor)).shape[0]  # any model's inputs
        device = next(self.model.parameters()).device

        def loss() -> Tensor:
            route = torch.zeros(n, dtype=torch.long, device=device)
            with routing(self.model, task_ids=route, attention_mask=inputs.get("attention_mask")):
                return self.feature_loss(self.model, inputs)

        return self.featurizer(loss)

    def weights(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The experts' weights `(n, E)` for `inputs`; each row sums to 1, column 0 is the base adapter."""
        feats = self.features(inputs)
        return routing_weights(feats, self.centroids, self.temperature, base_centroid=self.base_centroid).to(
            feats.device
        )

    @torch.no_grad()
    def logits(
        self, inputs: Mapping[str, Tensor], *, weights: Tensor | None = None, mode: Mode | None = None
    ) -> Tensor:
        """The bank's output logits for `inputs` (a mapping of model keyword arguments), fp32."""
        if weights is None:
            with torch.enable_grad():
                weights = self.weights(inputs)
        forward = routed_forward(self.model)
        return ensemble_logits(forward, model_inputs(inputs), weights, mode=mode or self.mode)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        weights: Tensor | None = None,
        mode: Mode | None = None,
        **generate_kwargs: Any,
    ) -> Tensor:
        """Generated token ids `(n, t + new)`, the experts weighted once, by the prompt's gradient feature.

        "top1" routes each prompt to its best expert and accepts every `generate` option; "ensemble" decodes
        greedily (no sampling, no beams) from the weighted sum of all experts' logits at each step.
        """
        mode = mode or self.mode
        prompt = {"input_ids": input_ids}
        if attention_mask is not None:
            prompt["attention_mask"] = attention_mask
        if weights is None:
            with torch.enable_grad():
                weights = self.weights(prompt)
        generate = self.model.generate  # type: ignore[operator]
        if mode == "top1":
            with routing(self.model, task_ids=weights.argmax(-1)):
                return generate(**prompt, **generate_kwargs)
        if generate_kwargs.get("do_sample") or generate_kwargs.get("num_beams", 1) != 1:
            raise ConfigError("ensemble generation decodes greedily: leave do_sample and num_beams unset")
        n, experts = weights.shape
        # copy-major: copy e holds rows e n .. (e + 1) n - 1, routed to expert e
        copies = {k: v.repeat(experts, 1) for k, v in prompt.items()}
        route = torch.arange(experts, device=input_ids.device).repeat_interleave(n)
        processors = list(generate_kwargs.pop("logits_processor", []))
        processors.append(_SameTokenForEveryCopy(weights))
        with routing(self.model, task_ids=route):
            out = generate(**copies, do_sample=False, logits_processor=processors, **generate_kwargs)
        return out[:n]

    def save(self, directory: str | Path) -> Path:
        """The bank, its centroids and the feature settings in one loramix adapter directory."""
        from loramix.io import save

        settings = {
            "projection_dim": self.projection_dim,
            "seed": self.seed,
            "sign_invariant": self.sign_invariant,
            "temperature": self.temperature,
            "mode": self.mode,
        }
        return save(
            self.model,
            directory,
            metadata={"elrea": settings},
            extra_tensors={CENTROIDS: self.centroids, BASE_CENTROID: self.base_centroid},
        )

    @classmethod
    def load(cls, model: nn.Module, directory: str | Path, *, feature_loss: FeatureLoss) -> ElreaModel:
        """Rebuild a saved ELREA model on an untouched copy of the base model."""
        from loramix.io.checkpoint import load, read_checkpoint

        directory = Path(directory)
        record, tensors = read_checkpoint(directory)
        settings = record.get("metadata", {}).get("elrea")
        missing = [f"tensor '{k}'" for k in (CENTROIDS, BASE_CENTROID) if f"extra.{k}" not in tensors]
        if settings is None:
            missing.insert(0, "'elrea' metadata")
        if missing:
            raise CheckpointError(f"{directory}: not an ELREA model (no {', '.join(missing)})")
        load(model, directory)
        return cls(
            model,
            tensors[f"extra.{CENTROIDS}"],
            tensors[f"extra.{BASE_CENTROID}"],
            feature_loss=feature_loss,
            **settings,
        )
