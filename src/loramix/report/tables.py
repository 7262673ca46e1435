"""The report's numbers as tables: Markdown for `report.md`, fixed-width text for the terminal.

Each result is one method's `metrics.json` dict (see `loramix.report`); a task or metric a result lacks is a
blank cell, and a mean over fewer tasks than the table has says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def number(value: Any) -> float | None:
    """A finite float, or None for anything missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value) if math.isfinite(value) else None


def method_names(results: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(result.get("method", f"method {index}")) for index, result in enumerate(results)]


def task_names(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every task of every result, in first-seen order."""
    names: dict[str, None] = {}
    for result in results:
        names.update(dict.fromkeys(result.get("tasks") or {}))
    return list(names)


def _metric_grid(
    results: Sequence[Mapping[str, Any]], metric: str, mean_key: str
) -> tuple[list[str], list[list[float | None]], list[str]]:
    """Row labels (tasks then "mean"), a `(rows, methods)` grid of values (None where missing), and per method
    a note for its mean: "" or "(2/3 tasks)".

    The mean is the result's own `mean_key` when present, else the mean over the tasks it has; a mean over
    fewer tasks than the table has carries the note, since it cannot be compared with the others.
    """
    tasks = task_names(results)
    grid = [
        [number(((result.get("tasks") or {}).get(task) or {}).get(metric)) for result in results]
        for task in tasks
    ]
    means, notes = [], []
    for column, result in enumerate(results):
        own = number(result.get(mean_key))
        present = [row[column] for row in grid if row[column] is not None]
        partial = own is None and 0 < len(present) < len(tasks)
        means.append(own if own is not None else (float(np.mean(present)) if present else None))
        notes.append(f"({len(present)}/{len(tasks)} tasks)" if partial else "")
    return [*tasks, "mean"], [*grid, means], notes


def _task_sizes(results: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[str]:
    sizes = []
    for task in tasks:
        found = [((result.get("tasks") or {}).get(task) or {}).get("n") for result in results]
        sizes.append(next((str(n) for n in found if n is not None), ""))
    return sizes


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(results: Sequence[Mapping[str, Any]], metric: str, mean_key: str) -> list[str]:
    """Tasks as rows, one column per method, the best value of each row in bold, the mean row last."""
    rows, grid, notes = _metric_grid(results, metric, mean_key)
    methods = method_names(results)
    sizes = [*_task_sizes(results, rows[:-1]), ""]
    lines = [
        "| task | n | " + " | ".join(cell(method) for method in methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for index, (label, size, values) in enumerate(zip(rows, sizes, grid)):
        is_mean = index == len(rows) - 1
        row_notes = notes if is_mean else [""] * len(values)
        comparable = [value for value, note in zip(values, row_notes) if value is not None and not note]
        best = max(comparable) if comparable else None
        cells = []
        for value, note in zip(values, row_notes):
            if value is None:
                cells.append("–")
            elif note:
                cells.append(f"{value:.3f} {note}")
            elif len(comparable) > 1 and math.isclose(value, best, abs_tol=5e-4):
                cells.append(f"**{value:.3f}**")
            else:
                cells.append(f"{value:.3f}")
        name = f"**{label}**" if is_mean else cell(label)
        lines.append(f"| {name} | {size} | " + " | ".join(cells) + " |")
    return lines


def _scored_by(results: Sequence[Mapping[str, Any]], task: str) -> str:
    """A task's row label: a generation task's names what its accuracy counts (`add (number)`)."""
    scorers = {((r.get("tasks") or {}).get(task) or {}).get("scorer") for r in results} - {None}
    return f"{task} ({', '.join(sorted(scorers))})" if scorers else task


def print_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Per-task accuracy as fixed-width plain text, one column per method, the mean on the last line.

    Example:
        >>> results = [{"method": "lora", "tasks": {"sst2": {"accuracy": 0.8}}},
        ...            {"method": "mola", "tasks": {"sst2": {"accuracy": 0.9}}}]
        >>> print(print_table(results))  # doctest: +NORMALIZE_WHITESPACE
        task    lora    mola
        ----  ------  ------
        sst2   0.800   0.900
        ----  ------  ------
        mean   0.800   0.900
    """
    rows, grid, notes = _metric_grid(results, "accuracy", "mean_accuracy")
    header = ["task", *method_names(results)]
    body = [
        [_scored_by(results, label)] + ["-" if value is None else f"{value:.3f}" for value in values]
        for label, values in zip(rows, grid)
    ]
    body[-1] = [body[-1][0]] + [f"{cell} {note}" if note else cell for cell, note in zip(body[-1][1:], notes)]
    return "\n".join(aligned([header, *body], rules_before=(1, len(body)), min_width=6))


def aligned(
    rows: Sequence[Sequence[str]], *, rules_before: Sequence[int] = (), min_width: int = 0
) -> list[str]:
    """Rows of cells as fixed-width lines, two spaces apart: the first column left-aligned, the others
    right-aligned and at least `min_width` wide; a rule of dashes before each row whose index is in
    `rules_before`."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    widths = [widths[0], *(max(width, min_width) for width in widths[1:])]

    def line(cells: Sequence[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    rule = line(["-" * width for width in widths])
    return [
        text for i, row in enumerate(rows) for text in ([rule] if i in rules_before else []) + [line(row)]
    ]
