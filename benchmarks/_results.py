"""The results files the benchmarks keep their entries in (a JSON list, one entry per run)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from loramix.io.files import atomic_write_json
from loramix.train.evaluate import mean_accuracy


def read_results(path: Path) -> list[dict]:
    """The entries in `path`, none if it does not exist yet. A benchmark reads them again just before it writes
    one, so that another run writing to the same file meanwhile keeps its entries."""
    return json.loads(path.read_text()) if path.is_file() else []


def write_results(path: Path, out: Path | None, results: dict) -> None:
    """A run's `results` to `path`, and into the list in `out` (if given), replacing an earlier entry of the same
    run (`results["run"]`)."""
    atomic_write_json(path, results)
    if out is not None:
        atomic_write_json(out, [r for r in read_results(out) if r["run"] != results["run"]] + [results])


def routing_scores(mode: str, tasks: dict[str, dict], started: float) -> dict:
    """One way of routing a finished run's test inputs, scored (`tasks`: an evaluation's per-task scores): the mean
    accuracy, each task's accuracy and the seconds since `started`; the mean printed."""
    scores = {
        "mean_accuracy": mean_accuracy(tasks),
        "tasks": {name: task["accuracy"] for name, task in tasks.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"{mode}: mean accuracy {100 * scores['mean_accuracy']:.2f}", flush=True)
    return scores
