"""`loramix compare --over-seeds`: runs whose configs differ only in their seed are one column, so that a reader sees
which differences between settings are larger than the seeds' own spread.

A column shows each task's mean accuracy over its seeds with the lowest and highest, and the mean over tasks the
same way. With two columns or more, every column after the first is compared with the first, seed by seed (on the
seeds both ran): each seed's difference of mean accuracy, their mean, and its 95% t-interval, the test a paired
comparison of methods calls for (`benchmarks/quality.py --paired` reports the same for the benchmark's runs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loramix.errors import CheckpointError, ConfigError
from loramix.report.tables import aligned, task_names
from loramix.train.config import BOOKKEEPING_KEYS, CONFIG_FILE, RunConfig

IGNORED = BOOKKEEPING_KEYS | {"seed"}  # what may differ between the runs of one column


@dataclass
class Column:
    """Runs of one setting: their settings (the seed and bookkeeping left out) and, by seed, their results."""

    settings: dict[str, Any]
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    label: str = ""


def settings_of(run_dir: str | Path) -> tuple[dict[str, Any], int]:
    """A run's settings as its `config.yaml` holds them (paths resolved, the seed and bookkeeping left out), and
    its seed."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; --over-seeds reads each run's config to find its seed")
    run = RunConfig.from_yaml(path)
    return {k: v for k, v in run.to_dict().items() if k not in IGNORED}, run.seed


def short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 24 else text[:21] + "..."


def columns_of(run_dirs: Sequence[str | Path], results: Sequence[dict[str, Any]]) -> list[Column]:
    """The runs grouped by setting, in the order each setting first appears; a column is named by its method and
    the settings it differs from the others in."""
    columns: list[Column] = []
    for run, result in zip(run_dirs, results):
        settings, seed = settings_of(run)
        column = next((c for c in columns if c.settings == settings), None)
        if column is None:
            column = Column(settings)
            columns.append(column)
        if seed in column.runs:
            raise ConfigError(
                f"compare --over-seeds: {column.runs[seed]['run']} and {run} have the same settings and seed {seed}; "
                "name one of them"
            )
        column.runs[seed] = {**result, "run": str(run)}
    differing = sorted(
        key
        for key in set().union(*(c.settings for c in columns))
        if key != "method" and len({json.dumps(c.settings.get(key)) for c in columns}) > 1
    )
    for column in columns:
        shown = [f"{key}={short(column.settings.get(key))}" for key in differing]
        column.label = column.settings["method"] + (f" ({', '.join(shown)})" if shown else "")
    return columns


def accuracy(result: dict[str, Any], task: str | None) -> float | None:
    """A run's accuracy on `task`, or its mean accuracy (`task` None)."""
    if task is None:
        value = result.get("mean_accuracy")
    else:
        value = (result.get("tasks") or {}).get(task, {}).get("accuracy")
    return None if value is None else float(value)


def spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def seed_table(columns: Sequence[Column]) -> list[str]:
    """Per task and for the mean: each column's mean over its seeds with the lowest and highest."""
    tasks = task_names([result for c in columns for result in c.runs.values()])
    header = ["task", *(c.label for c in columns)]
    rows = []
    for task in [*tasks, None]:
        cells = []
        for column in columns:
            values = [v for v in (accuracy(r, task) for r in column.runs.values()) if v is not None]
            cells.append(spread(values))
        rows.append(["mean" if task is None else task, *cells])
    rows.append(["seeds", *(" ".join(map(str, sorted(c.runs))) for c in columns)])
    return aligned([header, *rows], rules_before=(1, len(rows) - 1))


def paired_lines(columns: Sequence[Column]) -> list[str]:
    """Each column after the first against the first, paired by seed: the differences of mean accuracy, their
    mean and its 95% t-interval (from two seeds on)."""
    from scipy import stats

    lines = []
    first = columns[0]
    for column in columns[1:]:
        seeds = sorted(set(first.runs) & set(column.runs))
        gaps = [(accuracy(column.runs[s], None), accuracy(first.runs[s], None)) for s in seeds]
        pairs = [(s, a - b) for s, (a, b) in zip(seeds, gaps) if a is not None and b is not None]
        name = f"{column.label} - {first.label}"
        if not pairs:
            lines.append(f"{name}: no seed ran both")
            continue
        diffs = np.array([d for _, d in pairs])
        each = ", ".join(f"{d:+.4f} (seed {s})" for s, d in pairs)
        if len(diffs) < 2:
            lines.append(f"{name}: {each}; one seed, no interval")
            continue
        half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
        mean = diffs.mean()
        lines.append(
            f"{name}: mean {mean:+.4f}, 95% interval {mean - half:+.4f} to {mean + half:+.4f} over {len(diffs)} "
            f"seeds ({each})"
        )
    return lines
