"""`loramix demo`: the main job on built-in synthetic tasks with the offline all-MiniLM-L6-v2 encoder.

It writes the task suite (see `loramix.data.synthetic`), trains each method with the same steps and batches,
prints a per-task table side by side and writes a combined report. No downloads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from loramix.data.synthetic import write_suite
from loramix.io.files import atomic_write_json

DEMO_SETTINGS: dict[str, Any] = {
    "model": "minilm",
    "steps": 300,
    "batch_size": 32,
    "max_length": 32,
    "lr": 1e-3,
    "head_lr": 3e-3,
    "rank": 8,
    "log_every": 20,
    "sampling": "uniform",
    "eval_batch_size": 128,
}


def run_demo(
    output_dir: Path,
    *,
    steps: int | None = None,
    methods: list[str] | None = None,
    threads: int | None = None,
    seed: int = 0,
    scale: float = 1.0,
) -> list[dict[str, Any]]:
    """Train every method in `methods` on the synthetic suite; returns their metrics."""
    from loramix.methods import run_training
    from loramix.report import print_table, write_report
    from loramix.train.config import RunConfig

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    methods = methods or ["lora", "mola-grad", "mola-router"]
    task_dirs = write_suite(output_dir / "data", seed=seed, scale=scale)
    results = []
    for method in methods:
        settings = {
            **DEMO_SETTINGS,
            "method": method,
            "tasks_dir": str(output_dir / "data"),
            "tasks": [d.name for d in task_dirs],
            "seed": seed,
            "threads": threads,
        }
        if steps is not None:
            settings["steps"] = steps
        run = RunConfig.from_dict(settings)
        print(f"\n== {method}: {run.steps} steps of {run.batch_size} on {len(task_dirs)} tasks")
        started = time.perf_counter()
        metrics = run_training(run, output_dir / method)
        metrics["seconds"] = round(time.perf_counter() - started, 1)
        results.append(metrics)
    print("\nTest accuracy per task, same steps and batches for every method:\n")
    print(print_table(results))
    write_report(output_dir, results)
    atomic_write_json(
        output_dir / "summary.json",
        [{k: r[k] for k in ("method", "mean_accuracy", "tasks", "seconds")} for r in results],
    )
    print(f"\nreport: {output_dir / 'report.md'}")
    return results
