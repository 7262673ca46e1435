"""Training: run config, per-task heads, the step (the only place losses are combined), the loop, callbacks."""

from loramix.train.callbacks import Callback, Checkpointer, JsonlLogger, ProgressBar, TensorBoardLogger
from loramix.train.config import RunConfig
from loramix.train.loop import Trainer
from loramix.train.model import MultiTaskModel
from loramix.train.step import compute_loss

__all__ = [
    "Callback",
    "Checkpointer",
    "JsonlLogger",
    "MultiTaskModel",
    "ProgressBar",
    "RunConfig",
    "Trainer",
    "TensorBoardLogger",
    "compute_loss",
]
