"""Training: run config, per-task heads, the step (the only place losses are combined), the loop, callbacks.

Only the run config is imported with the package; the rest (torch, accelerate) on first use, so that
`loramix.train.config` validates a run config before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loramix.train.config import RunConfig

if TYPE_CHECKING:
    from loramix.train.callbacks import Callback, Checkpointer, JsonlLogger, ProgressBar
    from loramix.train.loop import Trainer
    from loramix.train.model import MultiTaskModel
    from loramix.train.step import compute_loss
    from loramix.train.trackers import Trackers

# name -> the module that defines it
_LAZY = {
    "Callback": "loramix.train.callbacks",
    "Checkpointer": "loramix.train.callbacks",
    "JsonlLogger": "loramix.train.callbacks",
    "ProgressBar": "loramix.train.callbacks",
    "Trackers": "loramix.train.trackers",
    "Trainer": "loramix.train.loop",
    "MultiTaskModel": "loramix.train.model",
    "compute_loss": "loramix.train.step",
}

__all__ = [
    "Callback",
    "Checkpointer",
    "JsonlLogger",
    "MultiTaskModel",
    "ProgressBar",
    "RunConfig",
    "Trainer",
    "Trackers",
    "compute_loss",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loramix.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
