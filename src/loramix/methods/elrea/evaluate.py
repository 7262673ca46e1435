"""Evaluating a trained ELREA bank: featurize each test input on the base adapter (expert 0), weight the experts by
gradient similarity to the saved centroids, and answer with the logit ensemble or the top-1 expert.

`loramix eval` on an ELREA run comes here, with the centroids read back from the run's adapter file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loramix.context import routing
from loramix.data import MultiTaskData, TextCollator
from loramix.errors import CheckpointError
from loramix.methods.elrea.ensemble import ensemble_logits, routing_weights
from loramix.methods.elrea.features import (
    GradientFeaturizer,
    label_averaged_features,
    prompt_lm_loss,
    self_label_cross_entropy,
)
from loramix.methods.elrea.model import BASE_CENTROID, CENTROIDS, ElreaModel, lm_prompt_loss
from loramix.report.routing_stats import routing_summary
from loramix.train.config import RunConfig
from loramix.train.eval_log import with_unscored
from loramix.train.evaluate import eval_options, mean_accuracy, task_scores
from loramix.train.model import MultiTaskModel
from loramix.train.shards import EvalBatches, gather_lists

FEATURE_HEADS = "elrea.feature_heads"


def featurize(
    model: MultiTaskModel,
    featurizer: GradientFeaturizer,
    examples: list,
    collator: TextCollator,
    batch_size: int,
    expert: int | None,
    top_labels: int = 1,
) -> torch.Tensor:
    """Label-free gradient features `(n, k)` of `examples` (the loss against the model's own predicted labels; the
    task id only picks the head), routed to `expert` when the model is a bank. Under several processes each takes
    its share of the batches and all get every feature (:mod:`loramix.train.shards`)."""
    device = next(model.parameters()).device

    def features(_: int, part: Any) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collator(part).items()}
        return batch_features(model, featurizer, batch, expert, top_labels).cpu()

    return torch.cat(EvalBatches([examples], batch_size).map(features)[0])


def batch_features(
    model: MultiTaskModel,
    featurizer: GradientFeaturizer,
    batch: dict[str, torch.Tensor],
    expert: int | None,
    top_labels: int = 1,
) -> torch.Tensor:
    """The features `(n, k)` of one collated batch: of the loss against the predicted label, or averaged over the
    `top_labels` most likely labels (:func:`label_averaged_features`); for a generation batch, of the next-token
    loss on its prompt (the response is never read: the same feature at test time, before any answer)."""

    def features() -> torch.Tensor:
        if "lm_labels" in batch:
            return featurizer(lambda: prompt_lm_loss(model(batch), batch["input_ids"], batch["prompt_mask"]))
        if top_labels > 1:
            return label_averaged_features(featurizer, lambda: model(batch), top_labels)
        return featurizer(lambda: self_label_cross_entropy(model(batch)))  # (n,) losses

    if expert is None:
        return features()
    route = torch.full_like(batch["task_ids"], expert)
    with routing(model.backbone, task_ids=route, attention_mask=batch["attention_mask"]):
        return features()


@contextmanager
def heads_swapped(model: MultiTaskModel, state: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Run the block with the heads set to `state` (None: as they are), and put the current heads back after."""
    if state is None:
        yield
        return
    current = {k: v.detach().clone() for k, v in model.heads.state_dict().items()}
    model.heads.load_state_dict(state)
    try:
        yield
    finally:
        model.heads.load_state_dict(current)


@torch.no_grad()
def weighted_classes(
    model: MultiTaskModel, batch: dict[str, torch.Tensor], weights: torch.Tensor, mode: str
) -> torch.Tensor:
    """The classes the bank answers for a collated batch, given each input's expert weights `(n, E)`: the logit
    ensemble, or the top-1 expert (`mode`)."""
    return model.heads.decide(weighted_logits(model, batch, weights, mode), batch["task_ids"])


@torch.no_grad()
def weighted_logits(
    model: MultiTaskModel, batch: dict[str, torch.Tensor], weights: torch.Tensor, mode: str
) -> torch.Tensor:
    """The logits `(n, L)` the bank's answer is decided on (-inf outside each input's task), as
    :func:`weighted_classes` takes them."""

    def forward(inputs: dict[str, torch.Tensor], route_ids: torch.Tensor) -> torch.Tensor:
        with routing(model.backbone, task_ids=route_ids, attention_mask=inputs["attention_mask"]):
            logits = model(inputs)
        return logits.masked_fill(torch.isinf(logits), 0.0)  # other tasks' columns; masked again below

    logits = ensemble_logits(forward, batch, weights, mode=mode)  # type: ignore[arg-type]
    return logits.masked_fill(~model.heads.own[batch["task_ids"]], float("-inf"))


def evaluate_elrea(
    model: MultiTaskModel,
    data: MultiTaskData,
    collator: TextCollator,
    run: RunConfig,
    centroids: torch.Tensor,
    centroid0: torch.Tensor,
    *,
    split: str,
    feature_heads: dict[str, torch.Tensor] | None = None,
    mode: str | None = None,
    weights_of: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The metrics of the ELREA bank on `split` (per-task accuracy and macro-F1, the routing summary), and the
    expert weights `(n, C + 1)` it used with each input's task id `(n,)`, for the caller's cluster statistics.

    `feature_heads` is the heads' state when the training features were taken: the test features are taken with
    the same heads (the heads go on training with the experts), so that both come from the same function.
    `weights_of` replaces the gradient routing by other expert weights for each collated batch (a diagnosis:
    every input through one chosen expert, say); classification tasks only."""
    if any(task.task_type == "generation" for task in data.tasks):
        if weights_of is not None:
            raise ValueError("evaluate_elrea: weights_of applies to classification tasks only")
        return _evaluate_generation(model, data, collator, run, centroids, centroid0, split=split, mode=mode)
    model.eval()
    device = next(model.parameters()).device
    weights_of = weights_of or gradient_weights(model, run, centroids, centroid0, feature_heads)
    scored = data.scored_tasks(split)
    batches = EvalBatches(
        [data.eval_examples(split, task.task_id, run.max_eval_examples) for task in scored],
        run.eval_batch_size,
    )

    def score(_: int, chunk: Any) -> tuple[torch.Tensor, ...]:
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        weights = weights_of(batch)
        preds = weighted_classes(model, batch, weights, mode or run.elrea_mode)
        return preds.cpu(), batch["labels"].cpu(), weights.cpu(), batch["task_ids"].cpu()

    results = batches.map(score)
    tasks = {}
    for task, parts in zip(scored, results):
        preds, gold, _, _ = zip(*parts)
        tasks[task.name] = task_scores(torch.cat(preds).numpy(), torch.cat(gold).numpy(), task.task_type)
    weights_np = torch.cat([part[2] for parts in results for part in parts]).numpy()
    tasks_np = torch.cat([part[3] for parts in results for part in parts]).numpy()
    metrics = {
        "tasks": tasks,
        "mean_accuracy": mean_accuracy(tasks),
        "routing": {"model": routing_summary(weights_np, tasks_np, data.task_names)},
    }
    return with_unscored(metrics, data, split), weights_np, tasks_np


def gradient_weights(
    model: MultiTaskModel,
    run: RunConfig,
    centroids: torch.Tensor,
    centroid0: torch.Tensor,
    feature_heads: dict[str, torch.Tensor] | None,
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Each collated batch's expert weights `(n, C + 1)`: its label-free gradient features on the base adapter,
    taken with the heads as they were for the training features, against the saved centroids."""
    featurizer = GradientFeaturizer(
        model.backbone,
        projection_dim=run.elrea_feature_dim,
        seed=run.seed,
        expert=0,
        sign_invariant=run.elrea_sign_invariant,
    )

    def weights_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with heads_swapped(model, feature_heads):
            feats = batch_features(model, featurizer, batch, 0, run.elrea_top_labels)
        return routing_weights(feats, centroids, run.elrea_temperature, base_centroid=centroid0)

    return weights_of


class ElreaAnswers:
    """ELREA's answers to generation batches: each prompt's experts weighted by its gradient feature (taken on the
    same right-padded batch as the training features), then the ensemble of their logits or the top-1 expert, in
    teacher forcing and in greedy generation. Keeps the weights it used, for the routing summary.
    `generate` uses the weights of the batch `logits` saw last (`routes_in_logits`)."""

    routes_in_logits = True

    def __init__(self, elrea: ElreaModel, collator: Any) -> None:
        self.elrea, self.collator = elrea, collator
        self.weights: list[torch.Tensor] = []
        self.task_ids: list[torch.Tensor] = []

    def logits(self, batch: dict[str, torch.Tensor], host_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The ensemble's logits, its experts weighed by each input's gradient (`host_ids` unused: the gradient
        routes)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.enable_grad():
            weights = self.elrea.weights({**inputs, "prompt_mask": batch["prompt_mask"]})
        self.weights.append(weights)
        self.task_ids.append(batch["task_ids"].cpu())
        return self.elrea.logits(inputs, weights=weights)

    def generate(
        self,
        batch: dict[str, torch.Tensor],
        prompts: dict[str, torch.Tensor],
        max_new_tokens: int,
        sampling: dict[str, Any] | None = None,
        host_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy, or sampled with `sampling`'s `generate` options where the bank routes each prompt to one expert
        (`elrea_mode: top1`; the ensemble decodes greedily and refuses them). `host_ids` unused."""
        out = self.elrea.generate(
            prompts["input_ids"],
            prompts["attention_mask"],
            weights=self.weights[-1],
            max_new_tokens=max_new_tokens,
            pad_token_id=self.collator.pad_id,
            eos_token_id=self.collator.tokenizer.eos_token_id,
            **(sampling or {}),
        )
        return out[:, prompts["input_ids"].shape[1] :]


def _evaluate_generation(
    model: MultiTaskModel,
    data: MultiTaskData,
    collator: Any,
    run: RunConfig,
    centroids: torch.Tensor,
    centroid0: torch.Tensor,
    *,
    split: str,
    mode: str | None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    from loramix.train.generation_eval import evaluate_generation

    answers = elrea_answers(model, collator, run, centroids, centroid0, mode)
    metrics = evaluate_generation(model, data, collator, split=split, answers=answers, **eval_options(run))
    weights_np = torch.cat(gather_lists([w.float().cpu() for w in answers.weights])).numpy()
    tasks_np = torch.cat(gather_lists(answers.task_ids)).numpy()
    metrics["routing"] = {"model": routing_summary(weights_np, tasks_np, data.task_names)}
    return metrics, weights_np, tasks_np


def elrea_answers(
    model: MultiTaskModel,
    collator: Any,
    run: RunConfig,
    centroids: torch.Tensor,
    centroid0: torch.Tensor,
    mode: str | None = None,
) -> ElreaAnswers:
    """The bank's answers to generation batches, its experts weighted by each prompt's gradient feature."""
    elrea = ElreaModel(
        model.backbone,
        centroids,
        centroid0,
        feature_loss=lm_prompt_loss,
        projection_dim=run.elrea_feature_dim,
        seed=run.seed,
        sign_invariant=run.elrea_sign_invariant,
        temperature=run.elrea_temperature,
        mode=mode or run.elrea_mode,  # type: ignore[arg-type]
    )
    return ElreaAnswers(elrea, collator)


def saved_elrea(run_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """What an ELREA run saved beside its adapter: the cluster centroids `(C, k)`, the base adapter's centroid
    `(k,)` and the heads that made the training features."""
    from loramix.io import read_checkpoint

    adapter = Path(run_dir) / "adapter"
    _, tensors = read_checkpoint(adapter)
    missing = [name for name in (CENTROIDS, BASE_CENTROID) if f"extra.{name}" not in tensors]
    if missing:
        raise CheckpointError(
            f"{adapter}: no {', '.join(missing)} tensor; was this adapter written by an ELREA run?"
        )
    prefix = f"extra.{FEATURE_HEADS}."
    heads = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors[f"extra.{CENTROIDS}"], tensors[f"extra.{BASE_CENTROID}"], heads
