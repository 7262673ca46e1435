"""What `loramix inspect` prints of a finished run, as lines of text: the adapter (method, config, adapted layers,
tensors and parameters, tasks) from its checkpoint record, then its scores and what its routers learned from its
`metrics.json`. A continual run's lines (`loramix.methods.continual.report.continual_lines`) go between the two."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def shown(value: object) -> str:
    """A value for display: floats to 4 significant digits (0.57, not 0.5700000000000001), also inside lists."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def percent(value: object) -> str:
    """A rate in 0..1 as a percentage (`0.904` -> `90.4%`); anything else as `shown` gives it."""
    return (
        f"{100 * value:.1f}%"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else shown(value)
    )


def task_kind(task: dict[str, Any]) -> str:
    if task.get("task_type") == "generation":
        return f"generation, scorer {task.get('scorer', 'exact')}"
    return f"{len(task.get('labels') or [])} labels"


def adapter_lines(run: str | Path, record: dict[str, Any], tensors: dict[str, Any]) -> list[str]:
    """The run's adapter (`run`: how to name the run), from its checkpoint's `record` and `tensors`
    (`loramix.io.read_checkpoint`); of its config, the set fields its kind of experts reads (an adapter's width is
    its `rank`, and `alpha` means nothing to it), and no `targets` where `target_regex` chooses the layers
    instead."""
    from loramix.experts import EXPERT_KINDS

    config = record["config"]
    kind = EXPERT_KINDS.get(config.get("experts", "lora"))
    unread = (kind.unread if kind is not None else ()) + (("targets",) if config.get("target_regex") else ())
    settings = ", ".join(
        f"{k}={shown(v)}" for k, v in config.items() if v not in (None, [], False) and k not in unread
    )
    tasks = record["metadata"].get("tasks", [])
    return [
        f"run: {run}",
        f"method: {record['metadata'].get('run', {}).get('method', '?')}",
        f"adapter config: {settings}",
        f"adapted layers: {len(record['layers'])} (e.g. {', '.join(record['layers'][:3])})",
        f"tensors: {len(tensors)}, parameters: {sum(t.numel() for t in tensors.values()):,}",
        "tasks: " + ", ".join(f"{t['name']} ({task_kind(t)})" for t in tasks),
    ]


def score_lines(metrics: dict[str, Any]) -> list[str]:
    """The mean accuracy, the best evaluation during training (`eval_every`), and each generation task's exact
    match, F1 and perplexity."""
    lines = [f"mean accuracy: {shown(metrics.get('mean_accuracy'))}"]
    best = metrics.get("best_eval")
    if isinstance(best, dict):
        kept = "the weights the run ended with (keep_best)" if best.get("kept") else "not kept"
        stopped = f"; training stopped early at step {best['stopped_at']}" if best.get("stopped_at") else ""
        metric = best.get("metric", "accuracy")  # runs saved before eval_metric ranked by accuracy
        lines.append(
            f"best evaluation during training: step {best.get('step')}, mean {metric} "
            f"{shown(best.get('score', best.get('mean_accuracy')))} on {best.get('split')}; {kept}{stopped}"
        )
    for name, scores in metrics.get("tasks", {}).items():
        if isinstance(scores, dict) and "exact_match" in scores:
            lines.append(
                f"  {name}: exact match {shown(scores['exact_match'])}, F1 {shown(scores['f1'])}, "
                f"perplexity {shown(scores['perplexity'])}"
            )
    return lines


def routing_lines(metrics: dict[str, Any]) -> list[str]:
    """Each routing summary's purity, NMI and load, the majority task of each expert, and its warnings."""
    lines = []
    for scope, summary in metrics.get("routing", {}).items():
        if not (isinstance(summary, dict) and "purity" in summary):
            continue
        lines.append(
            f"routing ({scope}): purity {summary['purity']:.3f}, NMI {summary['nmi']:.3f}, "
            f"load {[round(x, 3) for x in summary['load']]}"
        )
        majority = [f"{e}: {t}" for e, t in enumerate(summary.get("expert_task") or []) if t is not None]
        if majority:
            lines.append(f"  majority task of each expert's top-choice inputs: {', '.join(majority)}")
        lines += [f"  warning: {warning}" for warning in summary.get("warnings", [])]
    return lines
