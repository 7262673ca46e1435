"""Experiment trackers (`report_to`): every logged step's loss, learning rate and speed, and every evaluation's
scores, sent to TensorBoard, Weights & Biases or MLflow through accelerate's tracker classes, from the main process
only.

One training phase is one tracker run, named by the run's folder (and, for a method that trains in phases, the
phase's own folder), with the run's settings as its hyperparameters. TensorBoard writes into the phase's folder
(`tensorboard/<name>`); W&B and MLflow write where their own settings send them (`WANDB_MODE`,
`MLFLOW_TRACKING_URI`, ...), in the project (experiment) `loramix` unless `WANDB_PROJECT` (`MLFLOW_EXPERIMENT_NAME`)
names another. A resumed phase starts a new W&B or MLflow run from the step it resumes at; TensorBoard's events
from that step on are dropped first, as `metrics.jsonl`'s lines are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramix.errors import ConfigError
from loramix.train.callbacks import Callback, step_scalars

if TYPE_CHECKING:
    from loramix.train.loop import Trainer

PROJECT = "loramix"  # the W&B project and MLflow experiment, where the tracker's own setting names none


def available_trackers() -> set[str]:
    """The trackers whose packages this environment has."""
    from accelerate.tracking import get_available_trackers

    return {str(kind) for kind in get_available_trackers()}


def chosen_trackers(report_to: Sequence[str] | None) -> list[str]:
    """The trackers to start: those `report_to` names, refusing one whose package is missing; without
    `report_to` (None), TensorBoard where it is installed."""
    available = available_trackers()
    if report_to is None:
        return ["tensorboard"] if "tensorboard" in available else []
    missing = [name for name in report_to if name not in available]
    if missing:
        packages = " ".join(missing)
        raise ConfigError(
            f"report_to: {', '.join(missing)} not installed (pip install {packages}), or leave "
            f"{'it' if len(missing) == 1 else 'them'} out of report_to"
        )
    return list(dict.fromkeys(report_to))


def hyperparameters(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A run's settings as trackers take hyperparameters: numbers, strings, booleans and None as they are, lists and
    mappings (the tasks' specs) as JSON text."""
    plain = (bool, int, float, str, type(None))
    return {k: v if isinstance(v, plain) else json.dumps(v, sort_keys=True) for k, v in settings.items()}


class Trackers(Callback):
    """Sends each step's logs to the trackers `names` (`tensorboard`, `wandb`, `mlflow`) as one run named `name`,
    from the main process; TensorBoard writes into `folder`'s `tensorboard/`."""

    def __init__(self, names: Sequence[str], name: str, folder: Path, settings: Mapping[str, Any]) -> None:
        self.names, self.name, self.folder, self.settings = list(names), name, Path(folder), settings
        self.trackers: list[Any] = []

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.accelerator.is_main_process:
            return
        for kind in self.names:
            tracker = self.tracker(kind, trainer.step)
            try:
                tracker.start()
                tracker.store_init_configuration(hyperparameters(self.settings))
            except Exception as exc:  # the tracker's own setup: a store it refuses, a login it lacks
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"report_to: {kind} did not start: {first}") from exc
            self.trackers.append(tracker)

    def tracker(self, kind: str, step: int) -> Any:
        """Accelerate's tracker `kind` for a phase that starts at `step`: a W&B run or an MLflow run named by the
        phase, in the project (experiment) `loramix` or the one `WANDB_PROJECT` (`MLFLOW_EXPERIMENT_NAME`) names;
        TensorBoard's events in `tensorboard/<name>/`, in a file of their own from `step` on, dropping what an
        interrupted start logged from there on."""
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        if kind == "tensorboard":
            start = {"purge_step": step + 1, "filename_suffix": f".from-step-{step}"}
            return TensorBoardTracker(self.name, self.folder / "tensorboard", **start)
        if kind == "wandb":
            return WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=self.name)
        if kind == "mlflow":  # its experiment: MLFLOW_EXPERIMENT_NAME where set, read by the tracker
            return MLflowTracker(PROJECT, run_name=self.name)
        raise ConfigError(f"report_to: no tracker {kind!r}; choose from tensorboard, wandb, mlflow")

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        scalars = step_scalars(logs) if self.trackers else {}  # a step that logs nothing sends nothing
        if scalars:
            for tracker in self.trackers:
                tracker.log(scalars, step=logs["step"])

    def on_train_end(self, trainer: Trainer) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
