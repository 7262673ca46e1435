"""Methods: each plugs its adapter config, auxiliary losses and schedule into the shared training parts, and is
found by name in :data:`METHODS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramix.methods import mola
from loramix.methods.base import METHODS, Method, get_method, register_method
from loramix.methods.elrea.method import Elrea
from loramix.train.config import RunConfig

__all__ = [
    "METHODS",
    "Elrea",
    "Method",
    "get_method",
    "load_run_config",
    "mola",
    "register_method",
    "run_training",
]


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run config read from YAML, with its method's own checks: everything validated before any work."""
    run = RunConfig.from_yaml(path, overrides)
    get_method(run.method).validate(run)
    return run


def run_training(run: RunConfig, output_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate and save one run into `output_dir` with the method it names; returns its metrics."""
    method = get_method(run.method)
    method.validate(run)
    return method.train(run, Path(output_dir), resume=resume)
