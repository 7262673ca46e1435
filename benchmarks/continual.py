"""Continual-learning benchmark: the ten tasks of shared/data learned one after another with all-MiniLM-L6-v2, every
method with the same steps per task, batch, sequence length and fixed test sample per task; classes scored by the
label-prompt head (label smoothing 0.2), so tasks not learned yet are answered zero-shot.

    python benchmarks/continual.py                                   # every method (hours on 2 CPU cores)
    python benchmarks/continual.py --methods moe-adapters lae --steps-per-task 30 --max-eval 100

Writes benchmarks/results/continual.json (one entry per method: the accuracy matrix, Transfer / Average / Last /
BWT, the auto-selector's routing rates after each task, seconds), appending after each method (`--skip-done`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _timing import device_name  # noqa: E402

from loramix.io.files import atomic_write_json  # noqa: E402
from loramix.methods import run_training  # noqa: E402
from loramix.train.config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent
ORDER = ["ag_news", "sst2", "trec", "emotion", "sms_spam", "subj", "banking77", "cola", "mrpc", "rte"]
METHODS = [
    "zero-shot",
    "sequential-lora",
    "moe-adapters",
    "moe-adapters-task-id",
    "continual-mola-grad",
    "lae",
    "joint",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-per-task", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--max-train", type=int, default=2000, help="train examples kept per task (seeded)")
    parser.add_argument(
        "--max-eval", type=int, default=200, help="test examples per task (a fixed-seed sample)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "continual.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/loramix-continual"))
    parser.add_argument(
        "--skip-done", action="store_true", help="keep entries already in --out and skip them"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    done = {(r["method"], r["seed"], r["steps_per_task"]) for r in results} if args.skip_done else set()
    for method in args.methods:
        if (method, args.seed, args.steps_per_task) in done:
            continue
        run = RunConfig.from_dict(
            {
                "method": method,
                "model": "minilm",
                "tasks_dir": str(args.data),
                "tasks": ORDER,
                "head": "label-prompt",
                "label_smoothing": 0.2,
                "steps": 1,  # unused: continual methods train steps_per_task on each task
                "steps_per_task": args.steps_per_task,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "max_train_examples": args.max_train,
                "max_eval_examples": args.max_eval,
                "lr": args.lr,
                "router_lr": args.lr,
                "head_lr": args.lr,
                "seed": args.seed,
                "threads": args.threads,
                "progress": False,
                "log_every": 25,
                "checkpoint_every": 0,
            }
        )
        started = time.perf_counter()
        metrics = run_training(run, args.work / f"{method}-seed{args.seed}")
        entry = {
            "method": method,
            "seed": args.seed,
            "order": ORDER,
            "steps_per_task": args.steps_per_task,
            "batch_size": args.batch_size,
            "max_train_examples": args.max_train,
            "max_eval_examples": args.max_eval,
            "lr": args.lr,
            **{k: metrics[k] for k in ("Transfer", "Average", "Last", "BWT") if k in metrics},
            "accuracy_matrix": metrics["accuracy_matrix"],
            "selector_rows": metrics.get("continual", {}).get("selector_rows"),
            "selector": metrics.get("selector"),
            "seconds": round(time.perf_counter() - started, 1),
            "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        }
        results = [
            r
            for r in results
            if (r["method"], r["seed"], r["steps_per_task"]) != (method, args.seed, args.steps_per_task)
        ]
        results.append(entry)
        atomic_write_json(args.out, results)
        print(
            f"{method}: "
            + ", ".join(f"{k} {entry[k]:.4f}" for k in ("Transfer", "Average", "Last", "BWT") if k in entry)
            + f" ({entry['seconds']} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
