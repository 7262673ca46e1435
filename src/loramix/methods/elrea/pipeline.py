"""ELREA end to end, as one `loramix train` run with `method: elrea`.

1. a base LoRA on all the data (`elrea_base_fraction` of the steps) with per-task heads;
2. label-free gradient features of `elrea_feature_examples` training examples: the losses against the model's own
   `elrea_top_labels` most likely labels, sign-invariant and weighted by their probabilities (the task id only
   picks the head, as in MoLA-Router);
3. clusters of those features (k-means; the number by silhouette unless `elrea_clusters` is set);
4. one expert per cluster, initialised from the base adapter, trained on its cluster for the remaining steps, in
   one bank whose expert 0 is the frozen base (the heads go on training); the featurised examples are drawn
   uniformly, so a cluster gets the share of the steps that it has of the data;
5. test inputs featurised on expert 0 and answered by the ELREA logit ensemble (or the top-1 expert).
Task labels never choose clusters or experts; they are used only to score the clusters (ARI, NMI).

A run is resumable: both training phases write checkpoints (`checkpoint_every`), and the outcome of steps 1-3 is
saved atomically to `clusters.safetensors` (base adapter, heads, features, clusters, RNG state), so a resumed run
skips straight to the experts and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from loramix.config import AdapterConfig
from loramix.data import MultiTaskData, TextCollator
from loramix.errors import CheckpointError, ConfigError
from loramix.inject import adapter_state
from loramix.io.files import atomic_save_tensors, tensors_sha256
from loramix.methods.elrea.cluster import cluster_features
from loramix.methods.elrea.ensemble import base_centroid
from loramix.methods.elrea.evaluate import FEATURE_HEADS, evaluate_elrea, featurize
from loramix.methods.elrea.features import GradientFeaturizer, adam_state_by_name
from loramix.methods.elrea.model import BASE_CENTROID, CENTROIDS, expand_to_bank
from loramix.train.callbacks import PeriodicEvaluation
from loramix.train.config import BOOKKEEPING_KEYS, RunConfig
from loramix.train.loop import Trainer, processes
from loramix.train.model import MultiTaskModel
from loramix.train.plan import announce, plan_lines
from loramix.train.run import (
    build_model,
    callbacks_for,
    eval_split,
    make_collator,
    periodic_evaluation,
    save_run,
)

STAGE_FILE = "clusters.safetensors"


class RoutedCollator:
    """Collates `(example, route_id)` pairs: the usual batch plus `route_ids` (the expert of each sample)."""

    def __init__(self, collator: TextCollator) -> None:
        self.collator = collator

    def __call__(self, items: list[tuple[Any, int]]) -> dict[str, torch.Tensor]:
        batch = self.collator([example for example, _ in items])
        batch["route_ids"] = torch.tensor([route for _, route in items], dtype=torch.long)
        return batch


@dataclass
class Stage:
    """What the base phase, the features and the clustering leave for the experts (saved in `STAGE_FILE`)."""

    base_state: dict[str, torch.Tensor]  # the base adapter, as `adapter_state` names it
    heads_state: dict[str, torch.Tensor]
    chosen: np.ndarray  # indices of the featurised training examples
    features: torch.Tensor  # (n, k)
    labels: np.ndarray  # (n,) cluster of each featurised example
    centroids: torch.Tensor  # (C, k)
    silhouette: float
    history: list[dict[str, Any]]  # the base phase's log
    rng_state: torch.Tensor  # the global torch RNG when the stage ended
    run: dict[str, Any]  # the settings that made it (see `settings`)

    def save(self, output_dir: Path) -> None:
        tensors = {
            **{f"base.{k}": v for k, v in self.base_state.items()},
            **{f"heads.{k}": v for k, v in self.heads_state.items()},
            "chosen": torch.from_numpy(self.chosen),
            "features": self.features,
            "labels": torch.from_numpy(self.labels),
            "centroids": self.centroids,
            "rng_state": self.rng_state,
        }
        meta = json.dumps({"silhouette": self.silhouette, "history": self.history, "run": self.run})
        checksum = tensors_sha256(tensors, meta)  # checked before a resume uses the stage
        atomic_save_tensors(output_dir / STAGE_FILE, tensors, metadata={"elrea": meta, "sha256": checksum})

    @classmethod
    def load(cls, output_dir: Path, run: RunConfig) -> Stage | None:
        """The stage a run with these settings saved in `output_dir`; None when there is none."""
        from safetensors import safe_open

        path = output_dir / STAGE_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            meta = json.loads(stored["elrea"])
            stage = cls(
                base_state={k.removeprefix("base."): v for k, v in tensors.items() if k.startswith("base.")},
                heads_state={
                    k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")
                },
                chosen=tensors["chosen"].numpy(),
                features=tensors["features"],
                labels=tensors["labels"].numpy(),
                centroids=tensors["centroids"],
                silhouette=float(meta["silhouette"]),
                history=meta["history"],
                rng_state=tensors["rng_state"],
                run=meta["run"],
            )
        except Exception as error:  # a foreign or damaged file: say which and why
            raise CheckpointError(f"{path}: not a readable ELREA stage file ({error})") from error
        if "sha256" in stored and tensors_sha256(tensors, stored["elrea"]) != stored["sha256"]:
            raise CheckpointError(
                f"{path}: its contents do not match the checksum saved with them; the file is damaged. Delete it "
                "to train the base adapter and cluster again"
            )
        now = settings(run)
        changed = sorted(
            k for k in (set(stage.run) | set(now)) - EXPERT_PHASE_KEYS if stage.run.get(k) != now.get(k)
        )
        if changed:
            raise CheckpointError(
                f"{path} was written by a run with other settings ({', '.join(changed)}): resume with the same "
                "config, or delete the file to start the experts' stage over"
            )
        return stage


# Settings only the experts and the answers read: a stage (base adapter, features, clusters) serves a run that
# changes them, so that another expert learning rate or routing can be tried without featurising again.
EXPERT_PHASE_KEYS = frozenset({"elrea_expert_lr", "elrea_mode", "elrea_temperature"})


def settings(run: RunConfig) -> dict[str, Any]:
    """The settings a saved stage must share with the run that resumes it (bookkeeping and the expert-phase
    settings may change)."""
    return {k: v for k, v in run.to_dict().items() if k not in BOOKKEEPING_KEYS | EXPERT_PHASE_KEYS}


def _trainer(
    run: RunConfig,
    model,
    data,
    collator,
    output_dir: Path,
    steps: int,
    label: str,
    evaluation: PeriodicEvaluation | None = None,
    **kwargs,
) -> Trainer:
    phase = run.model_copy(update={"steps": steps})
    callbacks = callbacks_for(run, output_dir, phase=label, evaluation=evaluation)
    return Trainer(phase, model, data, collator, output_dir=output_dir, callbacks=callbacks, **kwargs)


def _say(run: RunConfig, message: str) -> None:
    """A line on stderr between the phases (which show progress bars of their own), when progress is on."""
    if run.progress and processes().is_main_process:
        print(f"elrea: {message}", file=sys.stderr, flush=True)


def _adam_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, dict[str, torch.Tensor]]:
    """The base run's Adam moments by parameter name; an adapter that never had a gradient (a pooler the heads
    do not read) gets zero moments, as a fresh Adam would."""
    state = adam_state_by_name(model, optimizer)
    for name, param in adapter_state(model).items():
        zeros = torch.zeros_like(param)
        state.setdefault(name, {"exp_avg": zeros, "exp_avg_sq": zeros})
    return state


def _base_stage(
    run: RunConfig,
    model: MultiTaskModel,
    data: MultiTaskData,
    collator: TextCollator,
    output_dir: Path,
    base_steps: int,
    resume: bool,
) -> Stage:
    """Steps 1-3: the base adapter, the features of a seeded sample of training examples, their clusters."""
    # the base adapter alone, scored as any one-LoRA run is (`eval_every`)
    evaluation = periodic_evaluation(run, data, collator, output_dir / "base")
    trainer = _trainer(
        run, model, data, collator, output_dir / "base", base_steps, "1/3 base adapter", evaluation
    )
    if resume:
        trainer.resume()
    train = data.split("train")
    rng = np.random.default_rng(run.seed)
    wanted = run.elrea_feature_examples or (run.steps - base_steps) * run.batch_size * run.grad_accum
    size = min(max(wanted, 10), len(train))
    if run.elrea_clusters is not None and run.elrea_clusters > size:  # before the base adapter trains
        raise ConfigError(
            f"elrea_clusters: {run.elrea_clusters} clusters of {size} featurised examples (elrea_feature_examples, "
            f"else the examples the expert phase draws, at most the {len(train)} the data has); ask for fewer "
            "clusters or featurise more examples"
        )
    history = trainer.train()
    model.eval()
    chosen = np.sort(rng.choice(len(train), size=size, replace=False))
    examples = [train[i] for i in chosen]
    _say(
        run,
        f"2/3 gradient features of {len(examples)} training examples, then "
        + (
            f"{run.elrea_clusters} clusters"
            if run.elrea_clusters
            else "clusters (their number by silhouette)"
        ),
    )
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    featurizer = GradientFeaturizer(
        model.backbone,
        projection_dim=run.elrea_feature_dim,
        seed=run.seed,
        optimizer_state=_adam_state(model.backbone, optimizer) if run.elrea_precondition else None,
        sign_invariant=run.elrea_sign_invariant,
    )
    features = featurize(
        model,
        featurizer,
        examples,
        collator,
        run.eval_batch_size,
        expert=None,
        top_labels=run.elrea_top_labels,
    )
    clusters = cluster_features(features, run.elrea_clusters, seed=run.seed)
    return Stage(
        base_state={k: v.detach().clone() for k, v in adapter_state(model.backbone).items()},
        heads_state={k: v.detach().clone() for k, v in model.heads.state_dict().items()},
        chosen=chosen,
        features=features,
        labels=clusters.labels.numpy(),
        centroids=clusters.centroids,
        silhouette=clusters.silhouette,
        history=history,
        rng_state=torch.get_rng_state(),
        run=settings(run),
    )


def run_elrea(
    run: RunConfig, data: MultiTaskData, output_dir: Path, adapters: AdapterConfig, *, resume: bool = False
) -> dict[str, Any]:
    model, tokenizer = build_model(run, data, adapters)
    if run.progress:  # the base adapter's parameters; the experts come after the clustering
        announce(plan_lines(run, data, model, run.steps))
    collator = make_collator(run, data, tokenizer)
    group = processes()
    base_steps = max(1, round(run.elrea_base_fraction * run.steps))
    stage = Stage.load(output_dir, run) if resume else None
    if stage is None:
        stage = _base_stage(run, model, data, collator, output_dir, base_steps, resume)
        if group.is_main_process:  # one writer when several processes train
            stage.save(output_dir)
    else:
        print(f"resuming from {output_dir / STAGE_FILE}: the base adapter and its clusters are done")
        model.heads.load_state_dict(stage.heads_state)
    torch.set_rng_state(stage.rng_state)  # the experts start from the same RNG state, resumed or not
    n_clusters = len(stage.centroids)
    # 4. experts from the base adapter, one per cluster; expert 0 is the frozen base
    with torch.no_grad():
        for name, param in adapter_state(model.backbone).items():
            param.copy_(stage.base_state[name])  # a no-op unless resumed
    expand_to_bank(model.backbone, n_clusters)
    train = data.split("train")
    examples = [train[i] for i in stage.chosen]
    routes = [int(c) + 1 for c in stage.labels]
    centroid0 = base_centroid(stage.features)
    evaluation = None
    if run.eval_every:  # the bank as it answers at the end: each input routed by its gradient
        evaluation = PeriodicEvaluation(
            run.eval_every,
            run.eval_split,
            lambda bank: evaluate_elrea(
                bank,
                data,
                collator,
                run,
                stage.centroids,
                centroid0,
                split=run.eval_split,
                feature_heads=stage.heads_state,
            )[0],
            metric=run.eval_metric,
        )
    # Clusters are a partition of the data, not tasks to rebalance: each expert draws its share of the examples.
    expert_trainer = _trainer(
        run.model_copy(update={"sampling": "proportional", "lr": run.elrea_expert_lr or run.lr}),
        model,
        data,
        RoutedCollator(collator),
        output_dir / "experts",
        run.steps - base_steps,
        f"3/3 {n_clusters} experts",
        evaluation,
        train_examples=list(zip(examples, routes)),
        sampler_ids=[r - 1 for r in routes],
    )
    if resume:
        expert_trainer.resume()
    history = stage.history + [{**h, "step": h["step"] + base_steps} for h in expert_trainer.train()]
    model = expert_trainer.accelerator.unwrap_model(expert_trainer.model)
    # 5. ensemble inference
    metrics, weights, test_tasks = evaluate_elrea(
        model,
        data,
        collator,
        run,
        stage.centroids,
        centroid0,
        split=eval_split(data),
        feature_heads=stage.heads_state,
    )
    true_tasks = np.array([e.task for e in examples])
    contingency = np.zeros((n_clusters, data.num_tasks), dtype=int)
    np.add.at(contingency, (stage.labels, true_tasks), 1)
    metrics.update(
        method="elrea",
        seed=run.seed,
        split=eval_split(data),
        history=history,
        ari=float(adjusted_rand_score(true_tasks, stage.labels)),
        nmi=float(normalized_mutual_info_score(true_tasks, stage.labels)),
        clusters={
            "n_clusters": n_clusters,
            "sizes": np.bincount(stage.labels, minlength=n_clusters).tolist(),
            "silhouette": stage.silhouette,
            "contingency": contingency.tolist(),
            "task_names": data.task_names,
        },
    )
    metrics["routing"]["majority_cluster_rate"] = majority_rate(weights, test_tasks, contingency)
    group.wait_for_everyone()
    if not group.is_main_process:
        return metrics
    save_run(
        output_dir,
        run,
        data,
        model,
        metrics,
        extra={
            CENTROIDS: stage.centroids,
            BASE_CENTROID: centroid0,
            **{f"{FEATURE_HEADS}.{k}": v for k, v in stage.heads_state.items()},
        },
    )
    return metrics


def majority_rate(weights: np.ndarray, tasks: np.ndarray, contingency: np.ndarray) -> float:
    """How often a test input's best cluster expert is the cluster that holds most of its task's examples."""
    majority = contingency.argmax(0)  # (T,) cluster of each task
    best = weights[:, 1:].argmax(1)  # best cluster expert, base excluded
    return float(np.mean(best == majority[tasks]))
