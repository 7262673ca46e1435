"""Callbacks: logging, progress and checkpoints stay out of the loop. Each hook gets the trainer."""

from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loramix.errors import DataWarning
from loramix.io.files import atomic_save_tensors, read_tensors
from loramix.train.checkpoint import check_trainable, restore_trainable, trainable_state
from loramix.train.loop import Callback, Trainer  # the trainer defines the hooks; these are its callbacks

__all__ = [
    "Callback",
    "Checkpointer",
    "JsonlLogger",
    "PeriodicEvaluation",
    "ProgressBar",
    "eval_scalars",
    "step_scalars",
]


# The scores an evaluation can be ranked by (`eval_metric`): the kinds of task that have each. Lower is better for
# the regression's squared error, higher for the rest.
METRIC_TASKS: dict[str, tuple[str, ...]] = {
    "accuracy": ("classification", "generation"),
    "macro_f1": ("classification",),
    "f1": ("generation",),
    "exact_match": ("generation",),
    "mse": ("regression",),
}
LOWER_IS_BETTER = frozenset({"mse"})


def mean_score(entry: Mapping[str, Any], metric: str) -> float | None:
    """The mean of `metric` over an evaluation entry's tasks that have it; None when none has."""
    values = [scores[metric] for scores in (entry.get("tasks") or {}).values() if metric in scores]
    return float(np.mean(values)) if values else None


class PeriodicEvaluation(Callback):
    """Scores every task on `split` each `every` steps and at the last step, as `evaluate(model)` does, and puts the
    scores in that step's log under `eval` (before the other callbacks see it: it comes first in their list), so
    that `metrics.jsonl`, TensorBoard, the history and the report carry them:
    `{"split", "mean_accuracy", ..., "purity", "tasks": {task: {"accuracy": ..., ...}}}`.

    Training is the same with or without it: the model goes back to training mode and every random generator to
    the state it had, so a run's adapters are bit for bit those of a run that does not
    evaluate on the way (`tests/train/test_callbacks.py`)."""

    def __init__(
        self,
        every: int,
        split: str,
        evaluate: Callable[[Any], Mapping[str, Any]],
        *,
        keep_best_in: Path | None = None,
        patience: int | None = None,
        metric: str = "accuracy",
    ) -> None:
        """`metric` ranks the evaluations by its mean over the tasks (:data:`METRIC_TASKS`). `keep_best_in`: a
        folder where the trainable weights of the best evaluation so far are kept (one file,
        `step-NNNNNN.safetensors`, written atomically), put back into the model when training ends. None: the run
        ends with its last step's weights. `patience`: training stops once that many evaluations in a row have not
        beaten the best (early stopping)."""
        self.every, self.split, self.evaluate, self.metric = every, split, evaluate, metric
        self.keep_best_in, self.patience = keep_best_in, patience
        # {"step", "metric", "score", "mean_accuracy"} of the best evaluation so far
        self.best: dict[str, Any] | None = None
        self.since_best = 0  # evaluations since the best
        self.stopped_at: int | None = None  # the step where patience ran out

    def on_train_start(self, trainer: Trainer) -> None:
        """A run that stopped early stays stopped when it is resumed (to finish its evaluation and save)."""
        trainer.stop_requested = self.stopped_at is not None

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if trainer.step % self.every and trainer.step != trainer.run.steps:
            return
        began = time.perf_counter()
        model = trainer.accelerator.unwrap_model(trainer.model)
        states = random.getstate(), np.random.get_state()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # the tasks left out were named when the run began
            metrics = self.evaluate(model)
        random.setstate(states[0])
        np.random.set_state(states[1])
        trainer.model.train()
        trainer.untimed += time.perf_counter() - began
        logs["eval"] = entry = eval_entry(self.split, metrics)
        if not trainer.history or trainer.history[-1] is not logs:  # a step that logs no loss
            trainer.history.append(logs)
        self.consider(trainer, mean_score(entry, self.metric), entry.get("mean_accuracy"))
        if (
            self.patience is not None
            and self.since_best >= self.patience
            and trainer.step < trainer.run.steps
        ):
            self.stopped_at, trainer.stop_requested = trainer.step, True
            if trainer.accelerator.is_main_process:
                assert self.best is not None  # only evaluations with a score count
                print(
                    f"\nloramix: stopping early at step {trainer.step}: {self.since_best} evaluations without beating "
                    f"the best mean {self.metric}, {self.best['score']:.4f} at step {self.best['step']}",
                    file=sys.stderr,
                )

    def consider(self, trainer: Trainer, score: float | None, accuracy: float | None = None) -> None:
        """This step's mean `metric` against the best so far (strictly better: the earliest of equal ones stays); a
        new best's weights into `keep_best_in`. An evaluation without one (no task with the metric has the split)
        does not count. `accuracy`: its mean accuracy, recorded beside."""
        if score is None:
            return
        self.since_best += 1
        if self.best is not None:
            better = (
                score < self.best["score"] if self.metric in LOWER_IS_BETTER else score > self.best["score"]
            )
            if not better:
                return
        self.best = {"step": trainer.step, "metric": self.metric, "score": score, "mean_accuracy": accuracy}
        self.since_best = 0
        if self.keep_best_in is not None and trainer.accelerator.is_main_process:
            path = self.best_file(trainer.step)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_tensors(path, trainable_state(trainer.checkpoint_modules))
            for other in self.keep_best_in.glob("step-*.safetensors"):
                if other != path:
                    other.unlink(missing_ok=True)

    def best_file(self, step: int) -> Path:
        assert self.keep_best_in is not None
        return self.keep_best_in / f"step-{step:06d}.safetensors"

    def on_train_end(self, trainer: Trainer) -> None:
        """With `keep_best_in`, the best evaluation's weights back into the model (every process reads them)."""
        if self.keep_best_in is None or self.best is None:
            return
        trainer.accelerator.wait_for_everyone()
        path = self.best_file(self.best["step"])
        weights = read_tensors(path)
        check_trainable(trainer.checkpoint_modules, weights, path)
        restore_trainable(trainer.checkpoint_modules, weights)

    def state_dict(self) -> dict[str, Any] | None:
        return {"best": self.best, "since_best": self.since_best, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The best evaluation before the checkpoint; forgotten, with a warning, where its weights are gone (a
        later best replaced them before the run stopped: a resumed run finds that one again as it goes on)."""
        self.best, self.since_best = state.get("best"), state.get("since_best", 0)
        if self.best is not None and "score" not in self.best:  # saved before eval_metric: ranked by accuracy
            self.best = {**self.best, "metric": "accuracy", "score": self.best["mean_accuracy"]}
        self.stopped_at = state.get("stopped_at")
        if self.keep_best_in is not None and self.best is not None:
            if not self.best_file(self.best["step"]).is_file():
                print(
                    f"loramix: warning: the weights of the best evaluation before the checkpoint (step "
                    f"{self.best['step']}) are gone from {self.keep_best_in}; keep_best chooses among the "
                    "evaluations from here on",
                    file=sys.stderr,
                )
                self.best = None


def eval_entry(split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What a log keeps of an evaluation's metrics: the split, the means, the routing purity (where a router
    routes) and each task's scores without their counts."""
    routing = metrics.get("routing") or {}
    summary = routing.get("model") or routing.get("aggregate") or {}
    entry: dict[str, Any] = {"split": split}
    entry.update({key: value for key, value in metrics.items() if key.startswith("mean_")})
    if summary.get("purity") is not None:
        entry["purity"] = summary["purity"]
    entry["tasks"] = {
        name: {key: value for key, value in scores.items() if key != "n" and _is_score(value)}
        for name, scores in (metrics.get("tasks") or {}).items()
    }
    return entry


def _is_score(value: Any) -> bool:
    """A number to log, not a count flag, a scorer's name or a generation task's sample answers."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def eval_scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """An `eval` log entry as flat scalars: `eval/mean_accuracy`, `eval/purity`, `eval/<task>/<score>`."""
    scalars = {f"eval/{key}": value for key, value in entry.items() if _is_score(value)}
    for task, scores in (entry.get("tasks") or {}).items():
        scalars.update({f"eval/{task}/{key}": value for key, value in scores.items() if _is_score(value)})
    return {key: float(value) for key, value in scalars.items()}


def step_scalars(logs: Mapping[str, Any]) -> dict[str, float]:
    """A step's log entry as flat scalars: its numbers (loss, lr, samples/s, auxiliary losses) and its
    evaluation's (`eval_scalars`)."""
    scalars = {key: float(value) for key, value in logs.items() if key != "step" and _is_score(value)}
    return {**scalars, **eval_scalars(logs.get("eval") or {})}


class ProgressBar(Callback):
    """A tqdm bar with loss, learning rate and samples per second, labelled `desc` (default: the method's name;
    a method of several phases names the phase)."""

    def __init__(self, desc: str | None = None) -> None:
        self.desc = desc
        self.postfix: dict[str, str] = {}

    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=trainer.run.steps,
            initial=trainer.step,
            desc=self.desc or trainer.run.method,
            dynamic_ncols=True,
            disable=not trainer.accelerator.is_main_process,
        )

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self.bar.update(1)
        if "loss" in logs:
            self.postfix.update(
                loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", sps=f"{logs['samples_per_s']:.0f}"
            )
            if "route_purity" in logs:  # the learned routers' training choices (routing_log.py)
                self.postfix["purity"] = f"{logs['route_purity']:.2f}"
        entry = logs.get("eval")
        if entry:  # the mean of the score the run ranks its evaluations by (`eval_metric`)
            metric = trainer.run.eval_metric
            score = mean_score(entry, metric)
            if score is not None:
                self.postfix[f"eval_{metric}"] = f"{score:.3f}"
        if "loss" in logs or entry:
            self.bar.set_postfix(self.postfix)

    def on_train_end(self, trainer: Trainer) -> None:
        self.bar.close()


class JsonlLogger(Callback):
    """Appends every logged step to `metrics.jsonl` (and keeps it in `trainer.history`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer) -> None:
        """Drop lines of steps after the trainer's step (a resumed run logs them again) and half-written lines."""
        if self.path.is_file() and trainer.accelerator.is_main_process:
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if _logged_step(line) <= trainer.step]
            if len(kept) != len(lines):
                self.path.write_text("".join(kept), encoding="utf-8")

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if ("loss" in logs or "eval" in logs) and trainer.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(logs) + "\n")


def _logged_step(line: str) -> float:
    """The step of one `metrics.jsonl` line; infinity for a line that is not a complete record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class Checkpointer(Callback):
    """Writes a resumable checkpoint every `every` steps (0: only at the end)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.every and trainer.step % self.every == 0 and trainer.step < trainer.run.steps:
            trainer.save_checkpoint()

    def on_train_end(self, trainer: Trainer) -> None:
        trainer.save_checkpoint()
