"""A finished continual run's accuracy matrix answered another way, from the states it kept after each task
(`after-task-<t>/`; every one is kept unless `keep_task_states` says otherwise). Each row is scored again on the
state of its stage, with the run's own settings (checked equal to the matrix the run wrote: the replay is the run)
and with the answering settings `--with` changes, so the second matrix is what the same run would have written
answering that way. Only settings that answer, not ones that train or fit the selector, can change: `ddas_mix`
(`none` routes hard where the run mixed answers by the selector's posterior, or the reverse).

    python benchmarks/continual_stages.py RUN_DIR --with ddas_mix=none [--out FILE]

Row 0 (the model before any task) is scored on the untouched base with nothing learned, as the run scores it.
Prints both matrices' Transfer / Average / Last / BWT and the selector's rates over the rows; writes them to
RUN_DIR/stages.json and adds them to the list in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _results import write_results  # noqa: E402

from loramix.data import MultiTaskData  # noqa: E402
from loramix.methods import get_method  # noqa: E402
from loramix.methods.continual.learner import Learner, new_selector  # noqa: E402
from loramix.methods.continual.report import continual_metrics, selector_rates  # noqa: E402
from loramix.methods.continual.scoring import accuracy_row  # noqa: E402
from loramix.methods.continual.state import restore  # noqa: E402
from loramix.train.config import RunConfig  # noqa: E402
from loramix.train.run import load_trained, make_collator, task_specs  # noqa: E402

# settings read only when answering: training and the selector's fit never consult them
ANSWERING = ("ddas_mix",)


def stage_matrix(learner: Learner, method, run_dir: Path, run: RunConfig) -> tuple[list[list[float]], list]:
    """Every row of the run's accuracy matrix scored with settings `run`: row 0 on the base with nothing learned,
    row t + 1 on the state kept after task t; and the selector's rows (where it sent seen and unseen inputs)."""
    learner.run = run
    tasks = learner.data.num_tasks
    learner.learned = [False] * tasks
    method.mark_learned(learner)
    if method.uses_selector:
        learner.selector = new_selector(run, learner.backbone)
    learner.records = {}
    matrix = [accuracy_row(learner, method.answer)]
    rows = list(learner.records.get("selector_rows", []))
    for task in range(tasks):
        restore(learner, run_dir / f"after-task-{task}")
        method.mark_learned(learner)
        learner.records = {}
        matrix.append(accuracy_row(learner, method.answer))
        rows += learner.records.get("selector_rows", [])
    return matrix, rows


def summary(matrix: list[list[float]], rows: list) -> dict:
    metrics = continual_metrics(np.array(matrix))
    return {"matrix": matrix, **metrics, **({"selector_rates": selector_rates(rows)} if rows else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--with",
        dest="changes",
        nargs="+",
        required=True,
        metavar="KEY=VALUE",
        help=f"the answering settings to change ({', '.join(ANSWERING)})",
    )
    parser.add_argument("--out", type=Path, help="a JSON list of runs' results to add this one to")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    changes = {}
    for pair in args.changes:
        key, sep, value = pair.partition("=")
        if not sep or key not in ANSWERING:
            parser.error(f"--with {pair!r}: expected KEY=VALUE with KEY one of {', '.join(ANSWERING)}")
        changes[key] = yaml.safe_load(value)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run, model, tokenizer, _ = load_trained(args.run_dir)
    model.eval()
    data = MultiTaskData(task_specs(run))
    method = get_method(run.method)
    missing = [
        t for t in range(data.num_tasks) if not (args.run_dir / f"after-task-{t}" / "adapter").is_dir()
    ]
    if missing:
        names = ", ".join(f"after-task-{t}" for t in missing)
        raise SystemExit(f"{args.run_dir}: {names} not kept (keep_task_states); every task's state is needed")
    learner = Learner(run, data, model, make_collator(run, data, tokenizer))
    recorded = json.loads((args.run_dir / "progress.json").read_text())["matrix"]
    own = stage_matrix(learner, method, args.run_dir, run)
    if own[0] != recorded:
        raise SystemExit(
            f"{args.run_dir}: the replay with the run's own settings differs from its matrix:\n{own[0]}\n{recorded}"
        )
    other = stage_matrix(learner, method, args.run_dir, RunConfig.model_validate(run.model_dump() | changes))
    label = " ".join(f"{k}={v}" for k, v in changes.items())
    results = {
        "run": f"{args.run_dir.name} {label}",
        "method": run.method,
        "seed": run.seed,
        "tasks": data.task_names,
        "changes": changes,
        "own": summary(*own),
        "changed": summary(*other),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(args.run_dir / "stages.json", args.out, results)
    for name in ("own", "changed"):
        entry = results[name]
        rates = entry.get("selector_rates") or {}
        print(
            f"{'as run' if name == 'own' else label:>14}: Transfer {100 * entry['Transfer']:.2f}  Average "
            f"{100 * entry['Average']:.2f}  Last {100 * entry['Last']:.2f}  BWT {100 * entry['BWT']:+.2f}  {rates}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
