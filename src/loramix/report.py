"""One Markdown report comparing methods: accuracy tables, what each router learned, and training curves.

`write_report` takes the `metrics.json` dict of every method and writes `run_dir/report.md` with PNG plots in
`run_dir/plots/`, linked relatively so the folder can be moved or viewed on GitHub. `print_table` gives the
accuracy table as plain text for the terminal.

A result dict (missing keys are fine: a method without routing, an empty history):

    {"method": "mola-router",
     "tasks": {"sst2": {"accuracy": 0.81, "macro_f1": 0.8, "n": 100}, ...},
     "mean_accuracy": 0.8,
     "routing": {"model": summary} | {"layers": {layer: summary}, "aggregate": summary} | {},
     "history": [{"step": 10, "loss": 1.2, "lr": 1e-4, "task_loss": 1.1, "twd_loss": 0.1}, ...]}

where each `summary` comes from `loramix.train.routing_stats.routing_summary`. A router whose warnings say it
routes nothing gets that line above its numbers, where a reader skimming the metrics sees it.

Training curves: each logged loss is one batch's, so a curve of them is mostly noise. The loss plot draws each
logged value as a faint dot and its running mean as a line; its first panel is every method's task loss (the one
quantity all methods share), and a method that adds auxiliary terms gets its total in a panel titled with them.
The auxiliary terms get a plot of their own only when some method logs one.

Plots are drawn on `matplotlib.figure.Figure` objects and saved with the Agg renderer, never through pyplot,
so writing a report leaves the caller's matplotlib backend and global state alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loramix.train.routing_stats import ROUTES_NOTHING

MAX_LAYER_HEATMAPS = 6
MAX_WARNINGS_SHOWN = 30
SMOOTHING_WINDOW = 10  # logged batches in the running mean of a loss curve
TASK_LOSS = "task_loss"


# ----------------------------------------------------------------------------------------------- tables


def _number(value: Any) -> float | None:
    """A finite float, or None for anything missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value) if math.isfinite(value) else None


def _method_names(results: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(result.get("method", f"method {index}")) for index, result in enumerate(results)]


def _task_names(results: Sequence[Mapping[str, Any]]) -> list[str]:
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
    tasks = _task_names(results)
    grid = [
        [_number(((result.get("tasks") or {}).get(task) or {}).get(metric)) for result in results]
        for task in tasks
    ]
    means, notes = [], []
    for column, result in enumerate(results):
        own = _number(result.get(mean_key))
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


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown_table(results: Sequence[Mapping[str, Any]], metric: str, mean_key: str) -> list[str]:
    """Tasks as rows, one column per method, the best value of each row in bold, the mean row last."""
    rows, grid, notes = _metric_grid(results, metric, mean_key)
    methods = _method_names(results)
    sizes = [*_task_sizes(results, rows[:-1]), ""]
    lines = [
        "| task | n | " + " | ".join(_cell(method) for method in methods) + " |",
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
        name = f"**{label}**" if is_mean else _cell(label)
        lines.append(f"| {name} | {size} | " + " | ".join(cells) + " |")
    return lines


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
    header = ["task", *_method_names(results)]
    body = [
        [label] + ["-" if value is None else f"{value:.3f}" for value in values]
        for label, values in zip(rows, grid)
    ]
    body[-1] = [body[-1][0]] + [f"{cell} {note}" if note else cell for cell, note in zip(body[-1][1:], notes)]
    widths = [max(len(row[column]) for row in [header, *body]) for column in range(len(header))]
    widths = [widths[0]] + [max(width, 6) for width in widths[1:]]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            [cells[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        )

    rule = line(["-" * width for width in widths])
    return "\n".join([line(header), rule, *(line(row) for row in body[:-1]), rule, line(body[-1])])


# ------------------------------------------------------------------------------------------------ plots


def _save(figure: Figure, path: Path) -> None:
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


def _layer_panels(routing: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Up to MAX_LAYER_HEATMAPS layers, evenly spaced with the first and last included, then the aggregate."""
    layers = list((routing.get("layers") or {}).items())
    if len(layers) > MAX_LAYER_HEATMAPS:
        picks = np.linspace(0, len(layers) - 1, MAX_LAYER_HEATMAPS).round().astype(int)
        layers = [layers[index] for index in sorted(set(picks.tolist()))]
    return [*layers, ("aggregate", routing.get("aggregate") or {})]


def _plot_gates(path: Path, method: str, panels: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
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
    _save(figure, path)


def _plot_load(path: Path, method: str, summary: Mapping[str, Any]) -> None:
    """Mean gate and argmax share per expert, side by side, with the uniform share as a dashed line."""
    load = [_number(value) or 0.0 for value in summary.get("load") or []]
    share = [_number(value) or 0.0 for value in summary.get("argmax_share") or []]
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
    _save(figure, path)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for index, entry in enumerate(history):
        value = _number(entry.get(key))
        if value is not None:
            step = _number(entry.get("step"))
            steps.append(step if step is not None else float(index))
            values.append(value)
    return steps, values


def _loss_keys(histories: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """Numeric history keys naming an auxiliary loss (`twd_loss`, `balance_loss`, ...): every loss but the total
    and the task loss, first seen first. Empty for methods that log none."""
    keys: dict[str, None] = {}
    for history in histories:
        for entry in history:
            keys.update(
                {
                    key: None
                    for key, value in entry.items()
                    if "loss" in key and key not in ("loss", TASK_LOSS) and _number(value) is not None
                }
            )
    return list(keys)


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


def _task_series(history: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """The task loss; the total where a history has no task loss (it then has no auxiliary terms either)."""
    series = _series(history, TASK_LOSS)
    return series if series[1] else _series(history, "loss")


Series = tuple[str, list[float], list[float]]  # (method, steps, values)


def _plot_curves(path: Path, panels: Sequence[tuple[str, Sequence[Series]]], title: str) -> Figure:
    """One panel per `(panel title, series)`, one colour per method (the same in every panel): each logged value
    as a faint dot, its running mean as a line; a log scale when a panel spans more than two decades. Returns the
    figure (saved to `path`)."""
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
            axes.plot(steps, values, linestyle="none", marker=".", markersize=3, alpha=0.25, color=colour)
            axes.plot(steps, running_mean(values), label=method, linewidth=1.4, color=colour)
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
    _save(figure, path)
    return figure


def _aux_names(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The auxiliary terms one method logged (`twd`, `balance`, ...)."""
    return [key.removesuffix("_loss") for key in _loss_keys([history])]


def _curve_lines(plots: Path, curves: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> list[str]:
    """The training-curve plots and their captions: the task loss of every method; the total where a method adds
    auxiliary terms to it, labelled with them; the auxiliary terms alone, only when some method has any."""
    task = [(method, *_task_series(history)) for method, history in curves]
    if not any(values for _, _, values in task):
        return ["No training history recorded.", ""]
    mixed = [(method, history) for method, history in curves if _aux_names(history)]
    panels: list[tuple[str, Sequence[Series]]] = [("task loss", task)]
    if mixed:
        terms = sorted({name for _, history in mixed for name in _aux_names(history)})
        total = [(method, *_series(history, "loss")) for method, history in mixed]
        panels.append((f"total loss: task + weighted {', '.join(terms)}", total))
    _plot_curves(plots / "loss.png", panels, "training loss")
    caption = (
        f"Each dot is one logged batch's loss; each line, the running mean of the last {SMOOTHING_WINDOW} logged "
        "batches."
    )
    if mixed:
        caption += (
            " The total loss, the one optimised, adds weighted auxiliary terms to the task loss: "
            + "; ".join(f"{method}: {', '.join(_aux_names(history))}" for method, history in mixed)
            + "."
        )
    lines = ["![training loss](plots/loss.png)", "", caption, ""]
    aux_keys = _loss_keys([history for _, history in curves])
    if aux_keys:
        aux_panels = [
            (f"{key.removesuffix('_loss')} (unweighted)", [(m, *_series(h, key)) for m, h in mixed])
            for key in aux_keys
        ]
        _plot_curves(plots / "aux_losses.png", aux_panels, "auxiliary losses")
        lines += ["![auxiliary losses](plots/aux_losses.png)", ""]
    return lines


# ----------------------------------------------------------------------------------------------- report


def _slug(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique version of a method name."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "method"
    slug, counter = base, 2
    while slug in taken:
        slug, counter = f"{base}-{counter}", counter + 1
    taken.add(slug)
    return slug


def _format(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def _summary_lines(summary: Mapping[str, Any]) -> list[str]:
    probe = _format(summary.get("probe_accuracy"))
    if summary.get("probe_folds"):
        probe += f" ({summary['probe_folds']}-fold)"
    lines = [
        f"- routing purity: {_format(summary.get('purity'))} (largest task share {_format(summary.get('majority_share'))})",
        f"- NMI(argmax expert, task): {_format(summary.get('nmi'))}",
        f"- linear probe accuracy (gates → task): {probe}",
        f"- normalised gate entropy: {_format(summary.get('entropy'))} (1 = uniform, 0 = one expert)",
    ]
    if summary.get("spread") is not None:
        lines.append(
            f"- gate spread over inputs: {_format(summary.get('spread'))} (0 = the same gate for every input)"
        )
    if summary.get("num_layers") is not None:
        lines.append(
            f"- over {summary['num_layers']} layers: mean purity {_format(summary.get('mean_layer_purity'))}, "
            f"mean NMI {_format(summary.get('mean_layer_nmi'))}, mean entropy {_format(summary.get('mean_layer_entropy'))}"
        )
    expert_task = summary.get("expert_task")
    if expert_task:
        pairs = ", ".join(f"e{expert}→{task}" for expert, task in enumerate(expert_task) if task is not None)
        lines.append(f"- majority task per expert: {pairs or 'none'}")
    return lines


def _warning_lines(warnings: Sequence[str]) -> list[str]:
    if not warnings:
        return ["No routing warnings."]
    lines = [f"**Warnings ({len(warnings)}):**", ""]
    lines += [f"- ⚠️ {_cell(str(warning))}" for warning in warnings[:MAX_WARNINGS_SHOWN]]
    if len(warnings) > MAX_WARNINGS_SHOWN:
        lines.append(f"- … and {len(warnings) - MAX_WARNINGS_SHOWN} more (see metrics.json)")
    return lines


def _routing_section(plots: Path, slug: str, method: str, routing: Mapping[str, Any]) -> list[str]:
    """The model-level router's part, then the per-layer routers' part, each where present."""
    parts = []
    if isinstance(routing.get("model"), Mapping) and routing["model"]:
        parts.append(("model", "Model-level router", routing["model"], [("model", routing["model"])]))
    if isinstance(routing.get("layers"), Mapping) and routing["layers"]:
        title = f"Per-layer routers, {len(routing['layers'])} layers (metrics of the aggregate)"
        parts.append(("layers", title, routing.get("aggregate") or {}, _layer_panels(routing)))
    lines = [f"### {method}", ""]
    if not parts:
        return [*lines, "No routing statistics (no learned router, or none recorded).", ""]
    for kind, title, summary, panels in parts:
        gates_png, load_png = plots / f"{slug}-{kind}-gates.png", plots / f"{slug}-{kind}-load.png"
        _plot_gates(gates_png, method, panels)
        _plot_load(load_png, method, summary)
        lines += _part_lines(f"{method} ({kind})", title, summary, gates_png.name, load_png.name)
    return lines


def _alarm_lines(summary: Mapping[str, Any]) -> list[str]:
    """One line above the metrics when the router routes nothing (its own warning, or that of some of its layers):
    the failure that matters most, and the one a reader skimming the numbers misses."""
    warnings = [str(w) for w in summary.get("warnings") or []]
    own = [w for w in warnings if w.startswith(ROUTES_NOTHING)]
    layers = [w.split(":", 1)[0] for w in warnings if f": {ROUTES_NOTHING}" in w and w not in own]
    if own:
        return [f"> ⚠️ **This router {_cell(own[0])}.**", ""]
    if layers:
        shown = ", ".join(layers[:5]) + (", …" if len(layers) > 5 else "")
        of = f" of {summary['num_layers']}" if summary.get("num_layers") else ""
        return [
            f"> ⚠️ **In {len(layers)}{of} layers the router routes nothing** ({_cell(shown)}): those layers give "
            "every input nearly the same mixture.",
            "",
        ]
    return []


def _part_lines(
    label: str, title: str, summary: Mapping[str, Any], gates_png: str, load_png: str
) -> list[str]:
    return [
        f"**{title}**",
        "",
        *_alarm_lines(summary),
        *_summary_lines(summary),
        "",
        *_warning_lines(list(summary.get("warnings") or [])),
        "",
        f"![{label}: mean gate per task and expert](plots/{gates_png})",
        "",
        f"![{label}: expert load](plots/{load_png})",
        "",
    ]


def write_report(run_dir: Path, results: Sequence[Mapping[str, Any]]) -> Path:
    """Write `run_dir/report.md` comparing `results` (one `metrics.json` dict per method), plots in `plots/`.

    Args:
        run_dir: folder to write into; created if missing.
        results: one dict per method, see the module docstring; missing keys are skipped.

    Returns:
        The path of `report.md`.

    Example:
        >>> import tempfile
        >>> path = write_report(Path(tempfile.mkdtemp()), [{"method": "lora", "tasks": {"sst2": {"accuracy": 0.8}}}])
        >>> path.name
        'report.md'
    """
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    methods = _method_names(results)
    taken: set[str] = set()
    slugs = [_slug(method, taken) for method in methods]

    lines = ["# loramix report", ""]
    if not results:
        lines += ["No results.", ""]
    else:
        tasks = _task_names(results)
        lines += [f"{len(results)} methods on {len(tasks)} tasks: {', '.join(tasks) or 'none'}.", ""]
        lines += ["## Accuracy per task", "", *_markdown_table(results, "accuracy", "mean_accuracy"), ""]
        lines += ["## Macro-F1 per task", "", *_markdown_table(results, "macro_f1", "mean_macro_f1"), ""]

        lines += ["## Routing", ""]
        for method, slug, result in zip(methods, slugs, results):
            lines += _routing_section(plots, slug, method, result.get("routing") or {})

        lines += ["## Training curves", ""]
        curves = [(method, result.get("history") or []) for method, result in zip(methods, results)]
        curves = [(method, history) for method, history in curves if history]
        lines += _curve_lines(plots, curves)

    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
