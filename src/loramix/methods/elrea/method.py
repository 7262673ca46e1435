"""`method: elrea` for `loramix train`, `loramix eval` and `loramix export` (see :mod:`.pipeline`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loramix.config import AdapterConfig
from loramix.data import MultiTaskData, TextCollator
from loramix.errors import ConfigError
from loramix.inject import get_info
from loramix.io import export_peft
from loramix.io.files import atomic_folder, atomic_write_json
from loramix.methods.base import Method, check_eval_tasks, register_method
from loramix.methods.elrea.evaluate import (
    elrea_answers,
    evaluate_elrea,
    gradient_weights,
    saved_elrea,
    weighted_logits,
)
from loramix.methods.elrea.pipeline import STAGE_FILE, run_elrea
from loramix.methods.mola import common
from loramix.models import resolve_model_path
from loramix.preflight import EXPORT_NOTE_FILE, is_earlier_export
from loramix.train.config import RunConfig
from loramix.train.model import MultiTaskModel
from loramix.train.predict import RoutedPredictor, class_scores
from loramix.train.run import prepare_run
from loramix.train.serve_export import BASE_FOLDER, write_trained_base


@register_method
class Elrea(Method):
    name = "elrea"
    description = "a base LoRA, then one expert per gradient cluster, routed by gradient similarity (ELREA)"
    compiles = False  # per-example gradients through torch.func

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        for key in ("keep_best", "eval_patience"):
            if getattr(run, key):
                raise ConfigError(
                    f"{key}: method elrea trains two phases, whose evaluations score different models (the base "
                    "adapter, then the experts routed by gradient); `eval_every` alone watches both"
                )
        if run.head != "classification":
            raise ConfigError(
                f"head: elrea featurizes the per-task classification heads' gradients; {run.head!r} is not supported"
            )
        examples = run.elrea_feature_examples
        if run.elrea_clusters is not None and examples is not None and run.elrea_clusters > examples:
            raise ConfigError(
                f"elrea_clusters: {run.elrea_clusters} clusters of elrea_feature_examples={examples} examples; ask "
                "for fewer clusters or featurise more examples"
            )
        if run.elrea_top_labels > 1 and not run.elrea_sign_invariant:
            raise ConfigError(
                "elrea_top_labels > 1 needs elrea_sign_invariant: true (signed features of the likely labels cancel)"
            )

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        return AdapterConfig(
            num_experts=1, router="none", **common(run)
        )  # the experts come after the clusters

    def resume_state(self, output_dir: Path) -> list[Path]:
        """The clusters of a finished first phase and each phase's checkpoints."""
        return [
            output_dir / STAGE_FILE,
            output_dir / "base" / "checkpoints",
            output_dir / "experts" / "checkpoints",
        ]

    def resume_checkpoints(self, output_dir: Path) -> Path:
        """The experts' phase once the stage file holds the base adapter and its clusters, else the base phase."""
        return output_dir / ("experts" if (output_dir / STAGE_FILE).is_file() else "base") / "checkpoints"

    def train(
        self, run: RunConfig, output_dir: Path, *, resume: bool = False, replaces: Sequence[Path] = ()
    ) -> dict[str, Any]:
        data = prepare_run(run, output_dir, replaces=replaces)
        return run_elrea(run, data, output_dir, self.adapter_config(run, data.num_tasks), resume=resume)

    def evaluate(
        self,
        run_dir: Path,
        run: RunConfig,
        model: MultiTaskModel,
        data: MultiTaskData,
        collator: TextCollator,
        split: str,
    ) -> dict[str, Any]:
        """The gradient-routed ensemble, with the centroids saved beside the experts."""
        check_eval_tasks(run_dir, data)
        centroids, centroid0, heads = saved_elrea(run_dir)
        metrics, _, _ = evaluate_elrea(
            model, data, collator, run, centroids, centroid0, split=split, feature_heads=heads
        )
        return metrics

    def predictor(
        self, run_dir: Path, run: RunConfig, model: MultiTaskModel, collator: Any, tasks: list[dict]
    ) -> RoutedPredictor:
        """Answers routed by each input's gradient, as `evaluate` routes them; each says its most weighted expert
        (`expert`: 0 the base adapter, c + 1 cluster c's)."""
        centroids, centroid0, heads = saved_elrea(run_dir)
        if any(meta["task_type"] == "generation" for meta in tasks):
            answers = elrea_answers(model, collator, run, centroids, centroid0)
            return RoutedPredictor(model, collator, tasks, max_new_tokens=run.max_new_tokens, answers=answers)
        weights_of = gradient_weights(model, run, centroids, centroid0, heads)
        predictor = RoutedPredictor(model, collator, tasks)

        def values(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, list]]:
            weights = weights_of(batch)
            logits = weighted_logits(model, batch, weights, run.elrea_mode)
            extra: dict[str, list] = {"expert": weights.argmax(-1).tolist()}
            if predictor.scores:
                extra["score"] = class_scores(logits)
            return model.heads.decide(logits, batch["task_ids"]), extra

        predictor.values = values
        return predictor

    def export(
        self, run: RunConfig, model: MultiTaskModel, tasks: list[dict], args: argparse.Namespace
    ) -> str:
        """One expert (`--expert N`): the experts belong to gradient clusters, not tasks."""
        if args.expert is None:
            raise ConfigError(
                "an ELREA run's experts belong to gradient clusters, not tasks: pass --expert N (0 is the base "
                "adapter, c + 1 the expert of cluster c; `loramix inspect` lists them)"
            )
        experts = get_info(model.backbone).config.num_experts
        if not 0 <= args.expert < experts:
            raise ConfigError(f"--expert {args.expert} is not an expert of this run: 0..{experts - 1}")
        gate = [float(e == args.expert) for e in range(experts)]
        trained_base = get_info(model.backbone).config.train_backbone
        out = Path(args.out)
        which = "the base adapter" if args.expert == 0 else f"the expert of cluster {args.expert - 1}"
        note = {
            "expert": args.expert,
            "method": self.name,
            "run": str(Path(args.run_dir).resolve()),
            "about": f"{which} of an ELREA run, alone; the run routes each input to its experts by the input's "
            "gradient, which one adapter does not",
        }
        # written whole and renamed into place: an earlier export there is replaced, none of its files left
        with atomic_folder(out, replace=is_earlier_export(out)) as tmp:
            if trained_base:  # the adapter names the trained base, written beside it
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(run.model))
                write_trained_base(model, tmp / BASE_FOLDER, tokenizer)
            base = str(out.resolve() / BASE_FOLDER) if trained_base else resolve_model_path(run.model)
            export_peft(model.backbone, tmp, gate=gate, base_model_name_or_path=base)
            atomic_write_json(tmp / EXPORT_NOTE_FILE, note)
        said = f"a PEFT LoRA adapter for expert {args.expert} to {out}"
        return f"{said}, on the trained base model in {out / BASE_FOLDER}" if trained_base else said
