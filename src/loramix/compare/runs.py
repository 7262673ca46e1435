"""Finished runs side by side, one column a run, as the demo compares its methods.

Each run's scores come from its `metrics.json` (the split training's own evaluation scored), or from the
`eval-<split>.json` that `loramix eval RUN --split SPLIT` wrote when a split is asked for; its training curves from
`metrics.json` either way. A column is named by its run's folder, or by the last parts of its path where two folders share a
name. Scores of different splits are not put side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loramix.errors import CheckpointError, ConfigError
from loramix.io.files import read_json
from loramix.train.config import CONFIG_FILE

METRICS_FILE = "metrics.json"


def read_scores(path: Path, what: str) -> dict[str, Any]:
    """A run's scores file (:func:`loramix.io.files.read_json`), or a CheckpointError naming it: where it is
    missing, what would write it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {what}")
    value = read_json(path)
    if not isinstance(value.get("tasks"), dict):
        raise CheckpointError(f"{path}: not the scores of a loramix run (no 'tasks' mapping)")
    return value


def labels_of(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run's column name: its folder's name, or as many of its path's last parts as tell the runs apart."""
    parts = [Path(run).resolve().parts for run in run_dirs]
    for depth in range(1, max(map(len, parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(run) for run in run_dirs]  # the same folder named twice


def in_run_order(folder: Path, tasks: dict[str, Any]) -> dict[str, Any]:
    """A run's task scores in the order its config lists the tasks (the JSON files keep their keys sorted); as
    they are where the config cannot be read."""
    try:
        listed = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))["tasks"]
        order = [task["name"] if isinstance(task, dict) else str(task) for task in listed]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return tasks
    return {**{name: tasks[name] for name in order if name in tasks}, **tasks}


def read_runs(
    run_dirs: Sequence[str | Path], split: str | None = None, labels: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One result a run, as the report and the tables take them: its scores (`metrics.json`, or `eval-<split>.json`
    with `split`), its history, `method` its column name (`labels`, else `labels_of` the folders) and
    `trained_method` the method that trained it."""
    if not run_dirs:
        raise ConfigError("compare: name at least one run folder")
    results = []
    for run, label in zip(run_dirs, labels or labels_of(run_dirs)):
        folder = Path(run)
        metrics = read_scores(
            folder / METRICS_FILE,
            "was this folder written by `loramix train`, and did the run finish? (it writes metrics.json last)",
        )
        scores = metrics
        if split is not None and metrics.get("split") != split:
            scores = read_scores(
                folder / f"eval-{split}.json",
                f"score the run on that split first: loramix eval {run} --split {split}",
            )
        results.append(
            {
                **{
                    k: v for k, v in scores.items() if k != "continual"
                },  # its own report holds the sequence's
                "tasks": in_run_order(folder, scores["tasks"]),
                "history": metrics.get("history") or [],
                "method": label,
                "trained_method": metrics.get("method"),
                "split": scores.get("split", split),
            }
        )
    splits = {result["split"] for result in results} - {None}  # runs saved before metrics named it: unknown
    if len(splits) > 1:
        scored = ", ".join(f"{r['method']}: {r['split']}" for r in results)
        raise ConfigError(
            f"compare: the runs were scored on different splits ({scored}); pass --split to compare them on one "
            "(loramix eval RUN --split SPLIT scores a run on it)"
        )
    return results


def legend(results: Sequence[dict[str, Any]]) -> list[str]:
    """A line a run: its column, the method that trained it, the split, and its routing purity where a router
    routed."""
    lines = []
    for result in results:
        routing = result.get("routing") or {}
        summary = routing.get("model") or routing.get("aggregate") or {}
        purity = summary.get("purity") if isinstance(summary, dict) else None
        extra = f", routing purity {purity:.3f}" if isinstance(purity, int | float) else ""
        split = f"{result['split']} split" if result["split"] else "split not recorded"
        lines.append(f"{result['method']}: {result['trained_method']}, {split}{extra}")
    return lines


def check_report_folder(out: str | Path, run_dirs: Sequence[str | Path]) -> None:
    """The comparison's report must not land in a run's own folder, where it would replace that run's report."""
    for run in run_dirs:
        if Path(out).resolve() == Path(run).resolve():
            raise ConfigError(
                f"--out {out} is the folder of run {run}, whose own report.md it would replace; pass another folder"
            )
