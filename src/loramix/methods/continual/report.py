"""What a continual run shows a reader: its metrics (Transfer, Average, Last, BWT, the auto-selector's rates, one
history over the sequence) and `continual.md` beside `report.md`, with the accuracy matrix as a heatmap, the
auto-selector's confusion matrix (true task x chosen task or the base), each task's expert use in the first and
last adapted block, and which experts were frozen after which task.

Legend: T tasks, E experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loramix.io.files import atomic_write_bytes
from loramix.report.run_summary import percent, shown


def continual_metrics(matrix: np.ndarray) -> dict[str, float]:
    """Transfer, Average, Last and BWT of a `(T + 1, T)` accuracy matrix (row 0 before training, row i after task
    i; column j is task j):

    - Transfer: the mean over tasks j of their accuracy in the rows before task j is learned (rows 0..j);
    - Average: the mean of all entries of rows 1..T;
    - Last: the mean of the last row;
    - BWT: the mean over j of (last-row accuracy of j - accuracy right after learning j, row j + 1).
    Tasks whose "before" set is empty do not exist here, since row 0 always precedes.
    """
    tasks = matrix.shape[1]
    transfer = [matrix[: j + 1, j].mean() for j in range(tasks)]
    bwt = [matrix[-1, j] - matrix[j + 1, j] for j in range(tasks - 1)]  # the last task has no later row
    return {
        "Transfer": float(np.mean(transfer)),
        "Average": float(matrix[1:].mean()),
        "Last": float(matrix[-1].mean()),
        "BWT": float(np.mean(bwt)) if bwt else 0.0,
    }


def sequence_history(histories: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The logged steps of every task in the order learned, as one history: each entry with the task it trained
    (`task`, its index) and its step counted from the start of the sequence."""
    history, done = [], 0
    for task in sorted(histories, key=int):
        steps = histories[task]
        history += [{**entry, "step": entry["step"] + done, "task": int(task)} for entry in steps]
        done += max((entry["step"] for entry in steps), default=0)
    return history


def selector_rates(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None] | None:
    """The auto-selector's rates over a sequence, as its targets are stated: the share of learned tasks' test inputs
    sent to their own task, meaned over the rows after each task (`own_task_mean`) and after the last
    (`own_task_last`), and the share of not yet learned tasks' inputs sent to the base, meaned over the rows that
    have both kinds (`unseen_base_mean`; None when none does); None for no row after a task."""
    learned = [r for r in rows if r.get("own_task_rate") is not None]
    if not learned:
        return None
    unseen = [r["base_rate_unlearned"] for r in learned if r.get("base_rate_unlearned") is not None]
    return {
        "own_task_mean": sum(r["own_task_rate"] for r in learned) / len(learned),
        "own_task_last": learned[-1]["own_task_rate"],
        "unseen_base_mean": sum(unseen) / len(unseen) if unseen else None,
    }


def continual_lines(metrics: dict[str, Any]) -> list[str]:
    """What `loramix inspect` shows of a continual run's `metrics.json` (none for another run): the order learned,
    Transfer / Average / Last / BWT, the auto-selector's rates, and which experts were frozen after each task."""
    if "accuracy_matrix" not in metrics:
        return []
    continual = metrics.get("continual", {})
    order = metrics.get("tasks_in_order", [])
    known = continual.get("task_names") or order
    earlier = known[: len(known) - len(order)]
    lines = [
        f"continual: {len(order)} task{'s' * (len(order) != 1)} in order {', '.join(order)}"
        + (f", after {', '.join(earlier)} learned by the runs it continued" if earlier else ""),
        "  "
        + ", ".join(
            f"{k} {shown(metrics[k])}" for k in ("Transfer", "Average", "Last", "BWT") if k in metrics
        ),
    ]
    selector = metrics.get("selector")
    if selector:
        task_free = selector.get("task_free_mean")
        lines.append(
            f"  auto-selector: {percent(selector.get('own_task_rate'))} of test inputs to their own task"
            + ("" if task_free is None else f"; with no task given, {percent(task_free)} answered right")
        )
    means = selector_rates(continual.get("selector_rows", []))
    if means is not None:
        unseen = means["unseen_base_mean"]
        lines.append(
            f"  over the sequence: {percent(means['own_task_mean'])} of learned tasks' inputs to their own task"
            + ("" if unseen is None else f", {percent(unseen)} of not yet learned tasks' inputs to the base")
        )
    for task, layers in continual.get("frozen", {}).items():
        label = known[int(task)] if int(task) < len(known) else task
        if isinstance(layers, dict):  # per adapted block: every expert frozen so far
            count = sum(len(experts) for experts in layers.values())
            first = next(iter(layers.values()), [])
            frozen = f"{count} experts frozen over {len(layers)} blocks (first block: {first})"
        else:
            frozen = f"experts {layers} frozen"
        lines.append(f"  after task {task} ({label}): {frozen}")
    return lines


def _heatmap(
    path: Path,
    values: np.ndarray,
    rows: list[str],
    columns: list[str],
    title: str,
    fmt: str,
    full_scale: bool = True,
) -> None:
    """`full_scale`: colours span 0..1 (accuracies and rates, comparable between runs); else the values' range."""
    figure = Figure(figsize=(max(5.0, 0.55 * len(columns) + 2.5), max(3.0, 0.4 * len(rows) + 1.5)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    low, high = (0.0, 1.0) if full_scale else (float(np.nanmin(values)), float(np.nanmax(values)))
    image = axes.imshow(values, cmap="viridis", aspect="auto", vmin=low, vmax=high)
    axes.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(len(rows)), rows, fontsize=7)
    for (i, j), value in np.ndenumerate(values):
        # viridis is light at its top: dark text there
        color = "black" if high > low and (value - low) / (high - low) > 0.6 else "white"
        axes.text(j, i, format(value, fmt), ha="center", va="center", fontsize=6, color=color)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_continual_report(output_dir: Path, metrics: dict[str, Any]) -> Path:
    """Plots and `continual.md` for one finished continual run; returns the markdown's path."""
    names = metrics.get("tasks_in_order") or list(metrics.get("tasks", {}))
    matrix = np.array(metrics["accuracy_matrix"], dtype=float)
    at_once = matrix.shape[0] == 2 and len(names) > 1  # one row after training: every task in one phase
    how = "every task at once" if at_once else "tasks learned in turn"
    lines = [f"# {metrics.get('method', 'continual run')}: {how}", ""]
    summary = ", ".join(
        f"{k} {100 * metrics[k]:.2f}" for k in ("Transfer", "Average", "Last", "BWT") if k in metrics
    )
    lines += [f"{summary} (accuracy in %).", ""]
    rows = ["before"] + [f"after {name}" for name in names][: matrix.shape[0] - 1]
    _heatmap(
        output_dir / "accuracy_matrix.png",
        matrix,
        rows,
        names,
        "accuracy (row: after task; column: task)",
        ".2f",
    )
    lines += ["![accuracy matrix](accuracy_matrix.png)", ""]
    selector = metrics.get("selector")
    if selector:
        confusion = np.array(selector["confusion"], dtype=float)
        shares = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
        columns = list(selector.get("task_names", names)) + ["base"]
        _heatmap(
            output_dir / "selector_confusion.png", shares, names, columns, "auto-selector: share sent", ".2f"
        )
        lines += [
            f"The auto-selector sent {100 * selector['own_task_rate']:.1f}% of the test inputs to their own task once "
            "every task was learned.",
            "",
        ]
        if "task_free_mean" in selector:  # runs saved before it was scored have none
            lines += [
                f"Given no input's task (the selector chooses it), {100 * selector['task_free_mean']:.2f}% of the "
                "test inputs are answered with their own task and class.",
                "",
            ]
        lines += [
            "![selector confusion](selector_confusion.png)",
            "",
        ]
    records = metrics.get("continual", {})
    known = records.get("task_names") or names  # with `continue_from`, the earlier run's tasks first
    rates = records.get("selector_rows")
    if rates:
        lines += [
            "Where the auto-selector sent the test inputs of this run's tasks after each task (a run that continues "
            "another carries that run's rows first):",
            "",
            "| after | own task (learned tasks) | base (tasks not learned yet) |",
            "|---|---|---|",
        ]
        unlabelled = ["nothing"] + names  # rows saved before they carried their own label
        start = (
            len(rates) - len(names) - 1
        )  # this run's first row (before its first task); > 0 when continued
        for i, rate in enumerate(rates):
            after = (rate["after"] or "nothing") if "after" in rate else unlabelled[min(i, len(names))]
            if i == start and start > 0:
                after += ", this run's tasks"  # the same state as the row before, scored on other tasks
            own, base = rate.get("own_task_rate"), rate.get("base_rate_unlearned")
            lines.append(
                f"| {after} | {'' if own is None else f'{own:.3f}'} | {'' if base is None else f'{base:.3f}'} |"
            )
        means = selector_rates(rates)
        if means is not None:
            unseen = means["unseen_base_mean"]
            lines += [
                "",
                f"Over the sequence: {means['own_task_mean']:.3f} of learned tasks' inputs to their own task"
                + ("" if unseen is None else f", {unseen:.3f} of not yet learned tasks' inputs to the base")
                + ".",
            ]
        lines.append("")
    use = records.get("expert_use", {})
    if use:
        layers = list(next(iter(use.values())))
        for layer in dict.fromkeys([layers[0], layers[-1]]):
            grid = np.array([use[task][layer] for task in use], dtype=float)
            grid = grid / np.maximum(grid.sum(1, keepdims=True), 1)
            file = f"expert_use_{layer.replace('.', '_')}.png"
            tasks = [known[int(task)] if int(task) < len(known) else task for task in use]
            experts = [str(e) for e in range(grid.shape[1])]
            title = f"expert use while training, {layer}"
            _heatmap(output_dir / file, grid, tasks, experts, title, ".2f", full_scale=False)
            lines += [f"![expert use {layer}]({file})", ""]
    frozen = records.get("frozen", {})
    if frozen:
        lines += ["| after task | experts frozen so far (first adapted block) |", "|---|---|"]
        for task, layers in frozen.items():
            experts = next(iter(layers.values())) if isinstance(layers, dict) and layers else layers
            label = known[int(task)] if int(task) < len(known) else task
            lines.append(f"| {label} | {experts} |")
    path = output_dir / "continual.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
