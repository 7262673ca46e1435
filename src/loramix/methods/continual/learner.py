"""What a continual run carries from task to task (`Learner`), and its auto-selector: made from the run's settings,
read back from a saved run, and the features it reads.

Legend: n samples, d feature width.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loramix.data import MultiTaskData
from loramix.errors import CheckpointError, ConfigError
from loramix.heads.base import pool
from loramix.methods.continual.features import (
    STATS,
    encoder_blocks,
    reads_in_pass,
    selector_features,
    selector_layers,
    selector_stats,
    selector_width,
)
from loramix.methods.continual.routed import acceptance_features, routed_hidden
from loramix.routers.selector import AutoSelector
from loramix.train.config import CONFIG_FILE, RunConfig
from loramix.train.model import MultiTaskModel


class OffsetCollator:
    """The collator's batches with `offset` added to their task ids: a continued run's tasks come after the ones
    its model learned before."""

    def __init__(self, collator: Any, offset: int) -> None:
        self.collator, self.offset = collator, offset

    def __call__(self, items: list) -> dict[str, Tensor]:
        batch = self.collator(items)
        batch["task_ids"] = batch["task_ids"] + self.offset
        return batch


class Learner:
    """What a continual run carries from task to task: the model, the auto-selector, and the method's records.
    `offset` is the number of tasks learned in an earlier run (`continue_from`): this run's task i is task
    `offset + i` for the model, its routers, its head and its selector. Without `data` it only answers: every task
    it knows was learned before (`loramix predict`)."""

    def __init__(
        self,
        run: RunConfig,
        data: MultiTaskData | None,
        model: MultiTaskModel,
        collator: Any,
        offset: int = 0,
    ) -> None:
        self.run, self.data, self.model = run, data, model
        self.collator = OffsetCollator(collator, offset) if offset else collator
        self.offset = offset
        self.selector: AutoSelector | None = None
        self.learned = [True] * offset + [False] * (data.num_tasks if data is not None else 0)
        self.records: dict[str, Any] = {"frozen": {}, "expert_use": {}}
        self.prior_tasks: list[dict] = []
        # each task's scores in the latest evaluation (accuracy, macro-F1, n)
        self.scores: dict[str, dict] = {}

    @property
    def task_names(self) -> list[str]:
        """Every task the model knows, in the order learned: an earlier run's first, then this run's."""
        return [t["name"] for t in self.prior_tasks] + (self.data.task_names if self.data is not None else [])

    @property
    def device(self) -> torch.device:
        """Where the model is now (the trainer moves it to the accelerator when the first task trains)."""
        return next(self.model.parameters()).device

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.backbone

    def batches(self, examples: list, batch_size: int) -> Any:
        for start in range(0, len(examples), batch_size):
            yield self.collated(examples[start : start + batch_size])

    def collated(self, examples: Any) -> dict[str, Tensor]:
        """These examples as one batch, on the model's device."""
        return {k: v.to(self.device) for k, v in self.collator(examples).items()}

    @torch.no_grad()
    def base_features(self, batch: dict[str, Tensor]) -> Tensor:
        """The auto-selector's feature of each input `(n, d)`, from the untouched base model (see
        :func:`selector_features`); the second block's too where the selector has an acceptance stage of the base
        state (a run saved before `ddas_accept_layer` existed has none; routed acceptance reads its own along the
        route: :mod:`.routed`)."""
        accept = self.run.ddas_accept_layer if self.two_stage else None
        run = self.run
        return selector_features(
            self.backbone,
            batch,
            run.ddas_features,
            run.ddas_layer,
            accept,
            self.feature_stats(),
            tokens=run.ddas_tokens,
            precision=run.ddas_precision,
        )

    @property
    def two_stage(self) -> bool:
        """Whether the selector's features hold the base state entering a second block (`ddas_accept_layer`)."""
        return self.selector is not None and self.selector.accept_width > 0 and not self.routed_acceptance

    @property
    def routed_acceptance(self) -> bool:
        """Whether the selector accepts by the routed pass's own state (`ddas_accept_state: route`)."""
        return self.selector is not None and self.selector.accept_state == "route"

    def feature_stats(self) -> int:
        """The token statistics the selector's `hidden` feature ends with: 3, or 2 for a selector an earlier
        version fitted (see :func:`selector_stats`)."""
        if self.selector is None or self.run.ddas_features != "hidden" or self.routed_acceptance:
            return STATS
        return selector_stats(self.selector.in_features, self.backbone, self.two_stage)

    def in_pass_layers(self) -> list[int] | None:
        """The blocks whose input states the auto-selector reads, where it can read them inside the inference pass
        itself (no adapted layer before the last of them: see :func:`routed_by_selector`); else None. A selector
        fitted on a cheaper pass of its own (`ddas_tokens`, `ddas_precision`) reads that pass here too."""
        run = self.run
        if (
            self.selector is None
            or run.ddas_features != "hidden"
            or self.routed_acceptance
            or cheaper_pass(run)
        ):
            return None
        accept = self.run.ddas_accept_layer if self.two_stage else None
        layers = selector_layers(self.run.ddas_layer, accept)
        return layers if reads_in_pass(self.backbone, layers) else None

    def select(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """`(task ids, keep-base mask)` the auto-selector gives a batch's inputs, computed beside the model (the
        selector follows it to the accelerator; it is fitted on the CPU)."""
        assert self.selector is not None
        if self.routed_acceptance:
            return self.routed_pass(batch)[:2]
        return self.selector.to(self.device)(self.base_features(batch))

    def routed_pass(
        self, batch: dict[str, Tensor], choice: Tensor | None = None, weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`(route (n,), keep (n,), pooled output (n, d), features (n, c + a))` of a batch under routed acceptance
        (:func:`.routed.routed_hidden`; the choice feature `choice` is the base state entering block `ddas_layer`,
        read here unless given; `weights` mix the tasks' experts in the pass)."""
        assert self.selector is not None
        route, keep, hidden, features = routed_hidden(
            self.backbone,
            batch,
            self.selector.to(self.device),
            self.base_features(batch) if choice is None else choice,
            self.run.ddas_accept_layer,
            weights,
        )
        return route, keep, pool(hidden, batch.get("attention_mask"), self.model.pooling), features

    def routed_task_features(self, batch: dict[str, Tensor], task: int) -> Tensor:
        """`(n, c + a)`: what a routed selector fits task `task` on: the choice block's base feature, then the
        acceptance block's state along the task's own route."""
        route = torch.full((batch["attention_mask"].shape[0],), task, device=self.device)
        accept = acceptance_features(self.backbone, batch, self.run.ddas_accept_layer, route)
        return torch.cat([self.base_features(batch), accept], -1)


def cheaper_pass(run: RunConfig) -> bool:
    """Whether the run makes the auto-selector's own base pass cheaper (`ddas_tokens`, `ddas_precision`)."""
    return run.ddas_tokens is not None or run.ddas_precision != "float32"


def new_selector(run: RunConfig, backbone: torch.nn.Module) -> AutoSelector:
    """An empty auto-selector for the run's features and rule (`ddas_*`); two stages with a `ddas_accept_layer` of
    its own (with routed acceptance, the choice block's feature and the acceptance block's, each with its token
    statistics)."""
    two_stage = run.ddas_accept_layer not in (None, run.ddas_layer)
    if run.ddas_features == "hidden":
        blocks = len(encoder_blocks(backbone))
        for key in ("ddas_layer", "ddas_accept_layer"):
            if (getattr(run, key) or 0) > blocks:
                raise ConfigError(
                    f"{key}: {getattr(run, key)} is past the model's {blocks} blocks; choose 0 (the embeddings' "
                    f"output) to {blocks} (the last block's)"
                )
    routed = two_stage and run.ddas_accept_state == "route"
    width = selector_width(backbone, run.ddas_features)
    return AutoSelector(
        2 * width if routed else selector_width(backbone, run.ddas_features, two_stage),
        hidden=run.ddas_hidden,
        percentile=run.ddas_percentile,
        normalize=run.ddas_normalize,
        shrinkage=run.ddas_shrinkage,
        accept_width=width if two_stage else 0,
        threshold=run.ddas_threshold,
        neighbours=run.ddas_neighbours,
        choice=run.ddas_choice,
        accept_state=run.ddas_accept_state if two_stage else "base",
    )


def saved_selector(tensors: dict[str, Tensor], where: Path, run: RunConfig | None = None) -> AutoSelector:
    """The auto-selector a continual run saved beside its adapters (`extra.selector.*`); with the `run` that answers
    by it or goes on from it, checked to accept as that run says and fitting new tasks with its percentile and
    shrinkage (which must be the earlier run's)."""
    state = {
        k.removeprefix("extra.selector."): v for k, v in tensors.items() if k.startswith("extra.selector.")
    }
    if not state:
        raise CheckpointError(
            f"{where / 'adapter'}: no auto-selector saved; was it written by a DDAS method?"
        )
    options = {} if run is None else {"percentile": run.ddas_percentile, "shrinkage": run.ddas_shrinkage}
    selector = AutoSelector(state["enc_w"].shape[2], hidden=state["enc_w"].shape[1], **options)
    selector.load_state(state)
    if run is not None and run.ddas_accept_state != selector.accept_state:
        raise ConfigError(
            f"ddas_accept_state: {run.ddas_accept_state}, but the auto-selector saved in {where} was fitted to "
            f"accept by the {selector.accept_state} state, which decides how it answers; set ddas_accept_state: "
            f"{selector.accept_state}"
        )
    return selector


# what the earlier run's model was built and scored with: a continued run takes its model as it is, so a setting
# given otherwise would be recorded in its config.yaml without being used
MODEL_SETTINGS = (
    "model",
    "rank",
    "alpha",
    "dropout",
    "num_experts",
    "targets",
    "layers_to_transform",
    "share",
    "top_k",
    "quantize",
    "train_backbone",
    "moe_experts",
    "adapter_width",
    "head",
    "pooling",
    "label_template",
    "label_texts_follow_route",
    "max_length",
)
# what an auto-selector was fitted with: a continued run's new tasks' models must be comparable with the earlier ones
SELECTOR_SETTINGS = (
    "ddas_features",
    "ddas_layer",
    "ddas_accept_layer",
    "ddas_accept_state",
    "ddas_tokens",
    "ddas_precision",
    "ddas_normalize",
    "ddas_threshold",
    "ddas_percentile",
    "ddas_neighbours",
    "ddas_choice",
    "ddas_shrinkage",
)


def check_continued_settings(run: RunConfig, prior: Path, selector: bool) -> None:
    """A continued run keeps the earlier run's method, the settings its model was built and scored with, and, with
    an auto-selector, the settings that selector was fitted with."""
    saved = RunConfig.from_yaml(prior / CONFIG_FILE) if (prior / CONFIG_FILE).is_file() else None
    keys = ("method", *MODEL_SETTINGS, *(SELECTOR_SETTINGS if selector else ()))
    changed = [k for k in keys if saved is not None and _compared(saved, k) != _compared(run, k)]
    if changed:
        raise ConfigError(
            f"continue_from: {prior} was trained with other settings: set "
            + ", ".join(f"{k}: {getattr(saved, k)}" for k in changed)
        )


def _compared(run: RunConfig, key: str) -> object:
    """A setting as the continued run compares it: a model folder by where it is, however it was written."""
    value = getattr(run, key)
    if key == "model" and os.path.exists(os.path.expanduser(value)):
        return os.path.realpath(os.path.expanduser(value))
    return value
