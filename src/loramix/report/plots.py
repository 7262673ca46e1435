"""The report's figures: mean-gate heatmaps, expert load and loss curves.

Drawn on `matplotlib.figure.Figure` objects and saved with the Agg renderer, never through pyplot, so writing a
report leaves the caller's matplotlib backend and global state alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loramix.report.tables import number

SMOOTHING_WINDOW = 10  # logged batches in the running mean of a loss curve
Series = tuple[str, list[float], list[float]]  # (method, steps, values)


def save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def _gate_matrix(summary: Mapping[str, Any]) -> np.ndarray | None:
    """`gate_mean` as a `(t, e)` float array, NaN for a task without samples; None if absent or malformed."""
    try:
        gate_mean = np.array(summary.get("gate_mean") or [[]], dtype=float)  # (t, e)
    except (TypeError, ValueError):
        return None
    if gate_mean.ndim != 2 or gate_mean.size == 0 or np.isnan(gate_mean).all():
        return None
    return gate_mean


def _heatmap(axes: Any, summary: Mapping[str, Any], title: str, vmax: float) -> Any:
    """Mean gate per task (rows) and expert (columns), each cell annotated; returns the image for a colorbar."""
    gate_mean = _gate_matrix(summary)  # (t, e)
    if gate_mean is None:
        axes.set_axis_off()
        axes.set_title(f"{title}\n(no gates)", fontsize=9)
        return None
    num_tasks, num_experts = gate_mean.shape
    tasks = list(summary.get("task_names") or [f"task {task}" for task in range(num_tasks)])[:num_tasks]
    image = axes.imshow(gate_mean, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    if num_tasks * num_experts <= 400:
        threshold = 0.6 * image.norm.vmax
        for task in range(num_tasks):
            for expert in range(num_experts):
                value = gate_mean[task, expert]
                text = "–" if np.isnan(value) else f"{value:.2f}"
                color = "black" if not np.isnan(value) and value > threshold else "white"
                axes.text(expert, task, text, ha="center", va="center", fontsize=7, color=color)
    axes.set_yticks(range(num_tasks), tasks, fontsize=8)
    step = max(1, num_experts // 16)
    axes.set_xticks(
        range(0, num_experts, step), [f"e{expert}" for expert in range(0, num_experts, step)], fontsize=8
    )
    axes.set_xlabel("expert", fontsize=8)
    axes.set_title(title, fontsize=9)
    return image


def plot_gates(path: Path, method: str, panels: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """A grid of mean-gate heatmaps, one per (title, summary) panel, at most four a row.

    All panels share one colour scale, so a layer that barely specialises looks flat next to one that does.
    """
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    matrices = [matrix for _, summary in panels if (matrix := _gate_matrix(summary)) is not None]
    num_tasks, num_experts = matrices[0].shape if matrices else (1, 1)
    vmax = max([float(np.nanmax(matrix)) for matrix in matrices] + [1e-9])
    figure = Figure(
        figsize=(columns * max(3.2, 0.45 * num_experts + 1.6), rows * max(2.4, 0.4 * num_tasks + 1.2))
    )
    figure.suptitle(f"{method}: mean gate per task and expert", fontsize=10)
    grid = figure.subplots(rows, columns, squeeze=False)
    for index, axes in enumerate(grid.flat):
        if index >= len(panels):
            axes.set_axis_off()
            continue
        name, summary = panels[index]
        image = _heatmap(axes, summary, name, vmax)
        if image is not None:
            figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    save(figure, path)


def plot_load(path: Path, method: str, summary: Mapping[str, Any]) -> None:
    """Mean gate and argmax share per expert, side by side, with the uniform share as a dashed line."""
    load = [number(value) or 0.0 for value in summary.get("load") or []]
    share = [number(value) or 0.0 for value in summary.get("argmax_share") or []]
    num_experts = max(len(load), len(share), 1)
    figure = Figure(figsize=(max(4.0, 0.5 * num_experts + 2.0), 2.8))
    axes = figure.subplots()
    positions = np.arange(num_experts)
    if load:
        axes.bar(positions[: len(load)] - 0.2, load, width=0.4, label="mean gate")
    if share:
        axes.bar(positions[: len(share)] + 0.2, share, width=0.4, label="argmax share")
    axes.axhline(1.0 / num_experts, color="gray", linestyle="--", linewidth=1, label="uniform")
    step = max(1, num_experts // 16)
    axes.set_xticks(positions[::step], [f"e{expert}" for expert in positions[::step]])
    axes.set_xlabel("expert")
    axes.set_title(f"{method}: expert load", fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    save(figure, path)


def running_mean(values: Sequence[float], window: int = SMOOTHING_WINDOW) -> list[float]:
    """The trailing mean of the last `window` values at each point (fewer at the start). Each logged loss is one
    batch's, so the raw curve is mostly batch-to-batch noise; the running mean shows the trend."""
    sums = np.cumsum(np.asarray(values, dtype=float))
    means = []
    for index in range(len(values)):
        low = max(0, index + 1 - window)
        total = sums[index] - (sums[low - 1] if low > 0 else 0.0)
        means.append(float(total / (index + 1 - low)))
    return means


def plot_curves(
    path: Path, panels: Sequence[tuple[str, Sequence[Series]]], title: str, *, smooth: bool = True
) -> Figure:
    """One panel per `(panel title, series)`, one colour per method (the same in every panel): each logged value
    as a faint dot, its running mean as a line (`smooth`; otherwise the values themselves, joined, each marked); a
    log scale when a panel spans more than two decades. Returns the figure (saved to `path`)."""
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.2 * rows))
    figure.suptitle(title, fontsize=10)
    grid = figure.subplots(rows, columns, squeeze=False)
    methods = list(dict.fromkeys(method for _, series in panels for method, _, _ in series))
    colours = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    for index, axes in enumerate(grid.flat):
        if index >= len(panels):
            axes.set_axis_off()
            continue
        panel_title, series = panels[index]
        drawn = []
        for method, steps, values in series:
            if not values:
                continue
            colour = colours[method]
            if smooth:
                axes.plot(steps, values, linestyle="none", marker=".", markersize=3, alpha=0.25, color=colour)
                axes.plot(steps, running_mean(values), label=method, linewidth=1.4, color=colour)
            else:
                axes.plot(steps, values, label=method, marker="o", markersize=3, linewidth=1.2, color=colour)
            drawn += values
        positive = [value for value in drawn if value > 0]
        if positive and len(positive) == len(drawn) and max(positive) / min(positive) > 100:
            axes.set_yscale("log")
        axes.set_title(panel_title, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.grid(alpha=0.3)
        if drawn:
            axes.legend(fontsize=7)
    figure.tight_layout()
    save(figure, path)
    return figure
