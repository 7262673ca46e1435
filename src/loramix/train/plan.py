"""What a run is about to do, in a few lines: its tasks (examples per split, classes, the share of the batches
each draws and how many passes over its training examples that makes) and the model's parameters by role
(experts, routers, heads, ...), trainable and in all. `loramix train` prints it before training, and
`loramix train --dry-run` prints it and stops, having read the config, the data and the model and written
nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn

from loramix.data import MultiTaskData
from loramix.data.sampling import task_probabilities
from loramix.report.tables import aligned
from loramix.roles import ROLES, parameters_by_role
from loramix.train.config import RunConfig

SPLITS = ("train", "validation", "test")


def millions(count: int) -> str:
    """A parameter count the way people say it: 22.7M, 0.30M, 4,224."""
    if count >= 10_000_000:
        return f"{count / 1e6:.1f}M"
    if count >= 100_000:
        return f"{count / 1e6:.2f}M"
    return f"{count:,}"


def task_lines(run: RunConfig, data: MultiTaskData, steps: int, one_at_a_time: bool = False) -> list[str]:
    """A table a task: examples per split, classes (or the task's kind), the expected share of the training
    samples it draws (the run's task sampling) and the passes over its training examples that `steps` make;
    `one_at_a_time`: each task trains alone for `steps` (a continual sequence), so each draws every sample."""
    sizes = [task.sizes.get("train", 0) for task in data.tasks]
    shares = (
        [1.0] * len(sizes)
        if one_at_a_time
        else task_probabilities(
            sizes, run.sampling, run.sampling_temperature, run.sampling_factors(data.task_names)
        )
    )
    samples = steps * run.batch_size * run.grad_accum
    header = ["task", *SPLITS, "classes", "share", "epochs"]
    rows = []
    for task, share, size in zip(data.tasks, shares, sizes):
        kind = {"regression": "number", "generation": "text"}.get(task.task_type, str(task.num_labels))
        counts = [f"{task.sizes[s]:,}" if task.sizes.get(s) else "-" for s in SPLITS]
        epochs = f"{samples * share / size:.2f}" if size else "-"
        rows.append([task.name, *counts, kind, "-" if one_at_a_time else f"{share:.3f}", epochs])
    return aligned([header, *rows])


def parameter_line(model: nn.Module) -> str:
    """`parameters: N in all, M trainable (p%): expert a, router b, head c`."""
    everything = sum(p.numel() for p in model.parameters())
    trainable = parameters_by_role(model)
    counts = {role: sum(p.numel() for p in trainable[role]) for role in ROLES}
    total = sum(counts.values())
    parts = ", ".join(f"{role} {millions(n)}" for role, n in counts.items() if n)
    share = f"{100 * total / everything:.2f}%" if everything else "-"
    return (
        f"parameters: {millions(everything)} in all, {millions(total)} trainable ({share}): {parts or 'none'}"
    )


def plan_lines(
    run: RunConfig, data: MultiTaskData, model: nn.Module | None, steps: int, one_at_a_time: bool = False
) -> list[str]:
    """The run's plan: what trains, on what, for how long (`steps`: every task's together, or each task's with
    `one_at_a_time`), then the task table and the parameter line (left out without a model)."""
    batch = run.batch_size * run.grad_accum
    if one_at_a_time:
        how = f"one after another, {steps:,} steps of {batch} samples each"
    else:
        how = f"{steps:,} steps of {batch} samples ({steps * batch:,} in all), {run.sampling} task sampling"
    scored = (
        f"; evaluations score at most {run.max_eval_examples:,} examples a task"
        if run.max_eval_examples
        else ""
    )
    lines = [f"{run.method} on {run.model}: {data.num_tasks} task(s), {how}{scored}"]
    lines += ["  " + line for line in task_lines(run, data, steps, one_at_a_time)]
    return [*lines, parameter_line(model)] if model is not None else lines


def announce(lines: Sequence[str]) -> None:
    """The plan on stderr, from the main process alone, each line led by `loramix: `."""
    from loramix.train.loop import processes

    if processes().is_main_process:
        print("\n".join(f"loramix: {line}" for line in lines), file=sys.stderr, flush=True)
