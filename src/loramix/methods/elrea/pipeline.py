"""ELREA end to end, as one `loramix train` run with `method: elrea`.

1. a base LoRA on all the data (`elrea_base_fraction` of the steps) with per-task heads;
2. label-free gradient features of `elrea_feature_examples` training examples (the loss against the model's own
   predicted label; the task id only picks the head, as in MoLA-Router);
3. clusters of those features (k-means; the number by silhouette unless `elrea_clusters` is set);
4. one expert per cluster, initialised from the base adapter, trained on its cluster for the remaining steps, in
   one bank whose expert 0 is the frozen base (heads frozen too, so the base stays the base);
5. test inputs featurised on expert 0 and answered by the ELREA logit ensemble (or the top-1 expert).
Task labels never choose clusters or experts; they are used only to score the clusters (ARI, NMI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score

from loramix.data import MultiTaskData, TextCollator
from loramix.inject import adapter_state, inject, remove
from loramix.methods.elrea.cluster import cluster_features
from loramix.methods.elrea.ensemble import base_centroid, ensemble_logits, routing_weights
from loramix.methods.elrea.experts import init_experts_from_base
from loramix.methods.elrea.features import GradientFeaturizer, self_label_cross_entropy
from loramix.methods.mola import adapter_config
from loramix.train.callbacks import JsonlLogger, ProgressBar
from loramix.train.config import RunConfig
from loramix.train.heads import MultiTaskModel
from loramix.train.loop import Trainer
from loramix.train.routing_stats import routing_summary


class RoutedCollator:
    """Collates `(example, route_id)` pairs: the usual batch plus `route_ids` (the expert of each sample)."""

    def __init__(self, collator: TextCollator) -> None:
        self.collator = collator

    def __call__(self, items: list[tuple[Any, int]]) -> dict[str, torch.Tensor]:
        batch = self.collator([example for example, _ in items])
        batch["route_ids"] = torch.tensor([route for _, route in items], dtype=torch.long)
        return batch


def _label_free_loss(model: MultiTaskModel, batch: dict[str, torch.Tensor]):
    def loss() -> torch.Tensor:
        return self_label_cross_entropy(model(batch))  # (n,) against the model's own predictions

    return loss


def featurize(
    model: MultiTaskModel,
    featurizer: GradientFeaturizer,
    examples: list,
    collator: TextCollator,
    batch_size: int,
    expert: int | None,
) -> torch.Tensor:
    """Gradient features `(n, k)` of `examples`, routed to `expert` when the model is a bank."""
    from loramix.context import routing

    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collator(examples[start : start + batch_size]).items()}
        if expert is None:
            feats.append(featurizer(_label_free_loss(model, batch)).cpu())
            continue
        route = torch.full_like(batch["task_ids"], expert)
        with routing(model.backbone, task_ids=route, attention_mask=batch["attention_mask"]):
            feats.append(featurizer(_label_free_loss(model, batch)).cpu())
    return torch.cat(feats)


def _trainer(run: RunConfig, model, data, collator, output_dir: Path, steps: int, **kwargs) -> Trainer:
    phase = run.model_copy(update={"steps": steps})
    callbacks = [JsonlLogger(output_dir / "metrics.jsonl")] + ([ProgressBar()] if run.progress else [])
    return Trainer(phase, model, data, collator, output_dir=output_dir, callbacks=callbacks, **kwargs)


def run_elrea(
    run: RunConfig, data: MultiTaskData, output_dir: Path, *, resume: bool = False
) -> dict[str, Any]:
    from loramix.train.run import build_model, eval_split, save_run

    model, tokenizer = build_model(run, data)
    collator = TextCollator(tokenizer, max_length=run.max_length)
    base_steps = max(1, round(run.elrea_base_fraction * run.steps))
    # 1. base adapter
    history = _trainer(run, model, data, collator, output_dir / "base", base_steps).train()
    model.eval()
    # 2. features of a seeded sample of training examples
    train = data.split("train")
    rng = np.random.default_rng(run.seed)
    chosen = np.sort(rng.choice(len(train), size=min(run.elrea_feature_examples, len(train)), replace=False))
    examples = [train[i] for i in chosen]
    featurizer = GradientFeaturizer(model.backbone, projection_dim=run.elrea_feature_dim, seed=run.seed)
    train_feats = featurize(model, featurizer, examples, collator, run.eval_batch_size, expert=None)
    # 3. clusters
    clusters = cluster_features(train_feats, run.elrea_clusters, seed=run.seed)
    true_tasks = np.array([e.task for e in examples])
    labels = clusters.labels.numpy()
    # 4. experts from the base adapter, one per cluster; expert 0 is the frozen base
    base_state = {k: v.detach().clone() for k, v in adapter_state(model.backbone).items()}
    remove(model.backbone)
    n_experts = clusters.n_clusters + 1
    bank = adapter_config(run, data.num_tasks).model_copy(
        update={"num_experts": n_experts, "router": "task", "num_tasks": n_experts}
    )
    inject(model.backbone, bank)
    init_experts_from_base(model.backbone, base_state, freeze_base=True)
    model.heads.requires_grad_(False)
    routes = [int(c) + 1 for c in labels]
    expert_trainer = _trainer(
        run,
        model,
        data,
        RoutedCollator(collator),
        output_dir / "experts",
        run.steps - base_steps,
        train_examples=list(zip(examples, routes)),
        sampler_ids=[r - 1 for r in routes],
    )
    history += (
        [{**h, "step": h["step"] + base_steps} for h in expert_trainer.train()]
        if run.steps > base_steps
        else []
    )
    model = expert_trainer.accelerator.unwrap_model(expert_trainer.model)
    # 5. ensemble inference
    centroid0 = base_centroid(train_feats)
    metrics = evaluate_elrea(
        model, data, collator, run, clusters.centroids, centroid0, split=eval_split(data)
    )
    contingency = np.zeros((clusters.n_clusters, data.num_tasks), dtype=int)
    np.add.at(contingency, (labels, true_tasks), 1)
    metrics.update(
        method="elrea",
        seed=run.seed,
        history=history,
        ari=float(adjusted_rand_score(true_tasks, labels)),
        nmi=float(normalized_mutual_info_score(true_tasks, labels)),
        clusters={
            "n_clusters": clusters.n_clusters,
            "sizes": np.bincount(labels).tolist(),
            "silhouette": clusters.silhouette,
            "contingency": contingency.tolist(),
            "task_names": data.task_names,
        },
    )
    metrics["routing"]["majority_cluster_rate"] = _majority_rate(
        metrics.pop("_weights"), metrics.pop("_tasks"), contingency
    )
    model.heads.requires_grad_(True)
    save_run(
        output_dir,
        run,
        data,
        model,
        metrics,
        extra={"elrea.centroids": clusters.centroids, "elrea.base_centroid": centroid0},
    )
    return metrics


def _majority_rate(weights: np.ndarray, tasks: np.ndarray, contingency: np.ndarray) -> float:
    """How often a test input's best cluster expert is the cluster that holds most of its task's examples."""
    majority = contingency.argmax(0)  # (T,) cluster of each task
    best = weights[:, 1:].argmax(1)  # best cluster expert, base excluded
    return float(np.mean(best == majority[tasks]))


@torch.no_grad()
def _predict(
    model: MultiTaskModel, batch: dict[str, torch.Tensor], weights: torch.Tensor, mode: str
) -> torch.Tensor:
    from loramix.context import routing

    def forward(inputs: dict[str, torch.Tensor], route_ids: torch.Tensor) -> torch.Tensor:
        with routing(model.backbone, task_ids=route_ids, attention_mask=inputs["attention_mask"]):
            logits = model(inputs)
        return logits.masked_fill(torch.isinf(logits), 0.0)  # other tasks' columns; masked again below

    logits = ensemble_logits(forward, batch, weights, mode=mode)  # type: ignore[arg-type]
    return model.heads.predict(
        logits.masked_fill(~model.heads.own[batch["task_ids"]], float("-inf")), batch["task_ids"]
    )


def evaluate_elrea(
    model: MultiTaskModel,
    data: MultiTaskData,
    collator: TextCollator,
    run: RunConfig,
    centroids: torch.Tensor,
    centroid0: torch.Tensor,
    *,
    split: str,
) -> dict[str, Any]:
    """Per-task accuracy of the ELREA ensemble, and the routing weights it used."""
    model.eval()
    device = next(model.parameters()).device
    featurizer = GradientFeaturizer(
        model.backbone, projection_dim=run.elrea_feature_dim, seed=run.seed, expert=0
    )
    tasks, all_weights, all_tasks = {}, [], []
    for task in data.tasks:
        examples = data.examples(split, task.task_id)[: run.max_eval_examples]
        preds, gold = [], []
        for start in range(0, len(examples), run.eval_batch_size):
            chunk = examples[start : start + run.eval_batch_size]
            feats = featurize(model, featurizer, chunk, collator, len(chunk), expert=0)
            weights = routing_weights(feats, centroids, run.elrea_temperature, base_centroid=centroid0)
            batch = {k: v.to(device) for k, v in collator(chunk).items()}
            preds.append(_predict(model, batch, weights.to(device), run.elrea_mode).cpu())
            gold.append(batch["labels"].cpu())
            all_weights.append(weights)
            all_tasks.append(batch["task_ids"].cpu())
        y_pred, y_true = torch.cat(preds).numpy(), torch.cat(gold).numpy()
        tasks[task.name] = {
            "accuracy": float(np.mean(y_pred == y_true)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "n": len(y_true),
        }
    weights_np, tasks_np = torch.cat(all_weights).numpy(), torch.cat(all_tasks).numpy()
    return {
        "tasks": tasks,
        "mean_accuracy": float(np.mean([m["accuracy"] for m in tasks.values()])),
        "routing": {"model": routing_summary(weights_np, tasks_np, data.task_names)},
        "_weights": weights_np,
        "_tasks": tasks_np,
    }
