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

where each `summary` comes from `loramix.report.routing_stats.routing_summary`. A router whose warnings say it
routes nothing gets that line above its numbers, where a reader skimming the metrics sees it.

Training curves: each logged loss is one batch's, so a curve of them is mostly noise. The loss plot draws each
logged value as a faint dot and its running mean as a line; its first panel is every method's task loss (the one
quantity all methods share), and a method that adds auxiliary terms gets its total in a panel titled with them.
The auxiliary terms get a plot of their own only when some method logs one.

The tables are in `tables`, the figures (matplotlib only there) in `plots`; this module puts them together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loramix.report.plots import SMOOTHING_WINDOW, Series, plot_curves, plot_gates, plot_load, running_mean
from loramix.report.routing_stats import ROUTES_NOTHING
from loramix.report.tables import cell, markdown_table, method_names, number, print_table, task_names

__all__ = ["print_table", "running_mean", "write_report"]

MAX_LAYER_HEATMAPS = 6
MAX_WARNINGS_SHOWN = 30
TASK_LOSS = "task_loss"


def _layer_panels(routing: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Up to MAX_LAYER_HEATMAPS layers, evenly spaced with the first and last included, then the aggregate."""
    layers = list((routing.get("layers") or {}).items())
    if len(layers) > MAX_LAYER_HEATMAPS:
        picks = np.linspace(0, len(layers) - 1, MAX_LAYER_HEATMAPS).round().astype(int)
        layers = [layers[index] for index in sorted(set(picks.tolist()))]
    return [*layers, ("aggregate", routing.get("aggregate") or {})]


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for index, entry in enumerate(history):
        value = number(entry.get(key))
        if value is not None:
            step = number(entry.get("step"))
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
                    if "loss" in key and key not in ("loss", TASK_LOSS) and number(value) is not None
                }
            )
    return list(keys)


def _task_series(history: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """The task loss; the total where a history has no task loss (it then has no auxiliary terms either)."""
    series = _series(history, TASK_LOSS)
    return series if series[1] else _series(history, "loss")


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
    plot_curves(plots / "loss.png", panels, "training loss")
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
        plot_curves(plots / "aux_losses.png", aux_panels, "auxiliary losses")
        lines += ["![auxiliary losses](plots/aux_losses.png)", ""]
    return lines


def _eval_series(history: Sequence[Mapping[str, Any]], read: Any) -> tuple[list[float], list[float]]:
    """`read(entry)` of each evaluation during training (`eval` in a logged step) that has it, by step."""
    scored = [
        {"step": entry.get("step"), "value": read(entry["eval"])}
        for entry in history
        if isinstance(entry.get("eval"), Mapping)
    ]
    return _series(scored, "value")


def _eval_lines(plots: Path, curves: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> list[str]:
    """The evaluations during training (`eval_every`), where a run made some: the mean score, the routing purity
    where a router routes, and each task's score, one line per method."""
    entries = [entry["eval"] for _, h in curves for entry in h if isinstance(entry.get("eval"), Mapping)]
    if not entries:
        return []
    means = [k for k in dict.fromkeys(k for e in entries for k in e) if k.startswith("mean_")]
    score = means[0].removeprefix("mean_") if means else "accuracy"
    tasks = list(dict.fromkeys(task for e in entries for task in e.get("tasks") or {}))
    reads: list[tuple[str, Any]] = [(f"mean {score}", lambda e: e.get(f"mean_{score}"))]
    if any(e.get("purity") is not None for e in entries):
        reads.append(("routing purity", lambda e: e.get("purity")))
    reads += [(task, lambda e, t=task: (e.get("tasks") or {}).get(t, {}).get(score)) for task in tasks]
    panels = [(title, [(m, *_eval_series(h, read)) for m, h in curves]) for title, read in reads]
    plot_curves(plots / "evaluation.png", panels, f"evaluation during training ({score})", smooth=False)
    split = entries[0].get("split", "?")
    return [
        "![evaluation during training](plots/evaluation.png)",
        "",
        f"Each point scores the model at that step on the {split} split (`eval_every`), on the same inputs of each "
        "task at every step.",
        "",
    ]


def _slug(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique version of a method name."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "method"
    slug, counter = base, 2
    while slug in taken:
        slug, counter = f"{base}-{counter}", counter + 1
    taken.add(slug)
    return slug


def _format(value: Any, digits: int = 3) -> str:
    value = number(value)
    return "n/a" if value is None else f"{value:.{digits}f}"


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


TASK_TABLES = (  # (section title, per-task key, the result's own mean of it); higher is better in each
    ("Accuracy per task", "accuracy", "mean_accuracy"),
    ("Macro-F1 per task", "macro_f1", "mean_macro_f1"),
    ("Exact match per task (generation)", "exact_match", "mean_exact_match"),
    ("Token F1 per task (generation)", "f1", "mean_f1"),
)


def _all_scores(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [s for r in results for s in (r.get("tasks") or {}).values() if isinstance(s, Mapping)]


def _warning_lines(warnings: Sequence[str]) -> list[str]:
    if not warnings:
        return ["No routing warnings."]
    lines = [f"**Warnings ({len(warnings)}):**", ""]
    lines += [f"- ⚠️ {cell(str(warning))}" for warning in warnings[:MAX_WARNINGS_SHOWN]]
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
        plot_gates(gates_png, method, panels)
        plot_load(load_png, method, summary)
        lines += _part_lines(f"{method} ({kind})", title, summary, gates_png.name, load_png.name)
    return lines


def _alarm_lines(summary: Mapping[str, Any]) -> list[str]:
    """One line above the metrics when the router routes nothing (its own warning, or that of some of its layers):
    the failure that matters most, and the one a reader skimming the numbers misses."""
    warnings = [str(w) for w in summary.get("warnings") or []]
    own = [w for w in warnings if w.startswith(ROUTES_NOTHING)]
    layers = [w.split(":", 1)[0] for w in warnings if f": {ROUTES_NOTHING}" in w and w not in own]
    if own:
        return [f"> ⚠️ **This router {cell(own[0])}.**", ""]
    if layers:
        shown = ", ".join(layers[:5]) + (", …" if len(layers) > 5 else "")
        of = f" of {summary['num_layers']}" if summary.get("num_layers") else ""
        return [
            f"> ⚠️ **In {len(layers)}{of} layers the router routes nothing** ({cell(shown)}): those layers give "
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
    methods = method_names(results)
    taken: set[str] = set()
    slugs = [_slug(method, taken) for method in methods]

    lines = ["# loramix report", ""]
    if not results:
        lines += ["No results.", ""]
    else:
        tasks = task_names(results)
        lines += [f"{len(results)} methods on {len(tasks)} tasks: {', '.join(tasks) or 'none'}.", ""]
        if any("continual" in result for result in results):  # a sequence's own report lies beside this one
            lines += [
                "Tasks learned one after another: the accuracy after each task, the auto-selector's choices and "
                "the experts each task used and froze are in [continual.md](continual.md).",
                "",
            ]
        for title, metric, mean_key in TASK_TABLES:  # the scores some task has: classification, generation
            if any(metric in scores for scores in _all_scores(results)):
                lines += [f"## {title}", "", *markdown_table(results, metric, mean_key), ""]

        lines += ["## Routing", ""]
        for method, slug, result in zip(methods, slugs, results):
            if "continual" in result and not result.get("routing"):  # routed per task: continual.md shows it
                lines += [f"### {method}", "", "Routing per task: see [continual.md](continual.md).", ""]
                continue
            lines += _routing_section(plots, slug, method, result.get("routing") or {})

        lines += ["## Training curves", ""]
        curves = [(method, result.get("history") or []) for method, result in zip(methods, results)]
        curves = [(method, history) for method, history in curves if history]
        lines += _curve_lines(plots, curves)
        lines += _eval_lines(plots, curves)

    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
