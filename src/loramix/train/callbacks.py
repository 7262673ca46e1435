"""Callbacks: logging, progress and checkpoints stay out of the loop. Each hook gets the trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loramix.train.loop import Callback, Trainer  # the trainer defines the hooks; these are its callbacks

__all__ = ["Callback", "Checkpointer", "JsonlLogger", "ProgressBar", "TensorBoardLogger"]


class ProgressBar(Callback):
    """A tqdm bar with loss, learning rate and samples per second, labelled `desc` (default: the method's name;
    a method of several phases names the phase)."""

    def __init__(self, desc: str | None = None) -> None:
        self.desc = desc

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
            self.bar.set_postfix(
                loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", sps=f"{logs['samples_per_s']:.0f}"
            )

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
        if "loss" in logs and trainer.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(logs) + "\n")


def _logged_step(line: str) -> float:
    """The step of one `metrics.jsonl` line; infinity for a line that is not a complete record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class TensorBoardLogger(Callback):
    """Scalars to TensorBoard when `tensorboard` is installed; silently nothing otherwise."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(log_dir))

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.writer is not None and "loss" in logs:
            for key, value in logs.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, logs["step"])

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class Checkpointer(Callback):
    """Writes a resumable checkpoint every `every` steps (0: only at the end)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.every and trainer.step % self.every == 0 and trainer.step < trainer.run.steps:
            trainer.save_checkpoint()

    def on_train_end(self, trainer: Trainer) -> None:
        trainer.save_checkpoint()
