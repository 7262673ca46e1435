"""Quality benchmark: every method on the ten real tasks in shared/data with all-MiniLM-L6-v2.

Every run uses the same steps, batch size, sequence length, subsample and evaluation set. Results are appended to
benchmarks/results/quality.json after each run (so a long run can be stopped and resumed with --skip-done).

    python benchmarks/quality.py                      # all methods, seeds 0 and 1 (about an hour on 2 quiet cores)
    python benchmarks/quality.py --methods lora mola-grad --seeds 0 --steps 50   # a quick look
    python benchmarks/quality.py --methods elrea --set elrea_base_fraction=0.7 --out /tmp/ablation.json
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
import yaml  # noqa: E402
from _timing import device_name  # noqa: E402

from loramix.io.files import atomic_write_json  # noqa: E402
from loramix.methods import run_training  # noqa: E402
from loramix.train.config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent
TASKS = ["sst2", "subj", "trec", "sms_spam", "ag_news", "emotion", "cola", "banking77", "mrpc", "rte"]
# name -> run settings beyond the shared ones
VARIANTS: dict[str, dict] = {
    "lora": {"method": "lora"},
    "mola-grad": {"method": "mola-grad"},
    "mola-router": {"method": "mola-router", "twd_weight": 0.1},
    "mola-router-no-twd": {"method": "mola-router", "twd_weight": 0.0},
    "lora-wide": {"method": "lora-wide"},
    "token-router": {"method": "token-router"},
    "per-task-lora": {"method": "per-task-lora"},
    # as many clusters as tasks; top-1 routing keeps inference at one pass (the ensemble costs C+1 passes)
    "elrea": {"method": "elrea", "elrea_clusters": 10, "elrea_mode": "top1"},
    "elrea-ensemble": {
        "method": "elrea",
        "elrea_clusters": 10,
        "elrea_mode": "ensemble",
    },  # 11 passes per input
}
DEFAULT_METHODS = [
    "lora",
    "mola-grad",
    "per-task-lora",
    "mola-router",
    "mola-router-no-twd",
    "lora-wide",
    "token-router",
    "elrea",
]


def default_data_dir() -> Path:
    return ROOT.parent.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--max-train", type=int, default=2000, help="train examples kept per task (seeded)")
    parser.add_argument(
        "--max-eval",
        type=int,
        default=300,
        help="test examples per task (a fixed-seed sample, the same for every run)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quality.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/loramix-quality"))
    parser.add_argument("--skip-done", action="store_true", help="keep runs already in --out and skip them")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override run settings (YAML values) for an ablation; recorded in each entry and its column",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.skip_done and args.out.is_file() else []
    done = {(r["name"], r["seed"], r["steps"], json.dumps(r.get("overrides", {}))) for r in results}
    for seed in args.seeds:
        for name in args.methods:
            if (name, seed, args.steps, json.dumps(overrides)) in done:
                continue
            settings = {
                "model": "minilm",
                "tasks_dir": str(args.data),
                "tasks": TASKS,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "max_train_examples": args.max_train,
                "max_eval_examples": args.max_eval,
                "seed": seed,
                "threads": args.threads,
                "progress": False,
                "log_every": 25,
                **VARIANTS[name],
                **overrides,
            }
            run = RunConfig.from_dict(settings)
            started = time.perf_counter()
            metrics = run_training(run, args.work / f"{name}-seed{seed}")
            entry = {
                "name": name,
                "method": run.method,
                "seed": seed,
                "tasks": {t: m["accuracy"] for t, m in metrics["tasks"].items()},
                "mean_accuracy": metrics["mean_accuracy"],
                "steps": args.steps,
                "batch_size": args.batch_size,
                "max_train_examples": args.max_train,
                "max_eval_examples": args.max_eval,
                "seconds": round(time.perf_counter() - started, 1),
                "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            }
            if overrides:
                entry["overrides"] = overrides
            if run.method == "mola-router":
                entry["twd_weight"] = run.twd_weight
            routing = metrics.get("routing", {})
            summary = routing.get("model") or routing.get("aggregate")
            if summary:
                entry["routing_purity"] = summary["purity"]
                entry["routing_probe_accuracy"] = summary.get("probe_accuracy")
            if run.method == "elrea":
                entry.update(
                    ari=metrics["ari"],
                    nmi=metrics["nmi"],
                    elrea_mode=run.elrea_mode,
                    elrea_base_fraction=run.elrea_base_fraction,
                    majority_cluster_rate=routing["majority_cluster_rate"],
                )
            results.append(entry)
            atomic_write_json(args.out, results)
            print(
                f"{name} seed {seed}: mean accuracy {entry['mean_accuracy']:.4f} ({entry['seconds']} s)",
                flush=True,
            )
    print(summarise(results))
    return 0


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in RunConfig.model_fields:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY a run setting (see RunConfig)")
        overrides[key] = yaml.safe_load(value)
    return overrides


def column(entry: dict) -> str:
    """A method's column: its name, with the steps when they are not the default 150 and any overrides."""
    name = entry["name"] if entry["steps"] == 150 else f"{entry['name']} ({entry['steps']} steps)"
    overrides = entry.get("overrides", {})
    return name + "".join(f" {k}={v}" for k, v in overrides.items())


def summarise(results: list[dict]) -> str:
    """A markdown table: per-task accuracy averaged over seeds, one column per method and step budget."""
    names = list(dict.fromkeys(column(r) for r in results))
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in TASKS + ["mean"]:
        cells = []
        for name in names:
            runs = [r for r in results if column(r) == name]
            values = [r["mean_accuracy"] if task == "mean" else r["tasks"].get(task) for r in runs]
            values = [v for v in values if v is not None]
            cells.append(f"{100 * sum(values) / len(values):.1f}" if values else "")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    purity = []
    for name in names:
        runs = [r["routing_purity"] for r in results if column(r) == name and "routing_purity" in r]
        purity.append(f"{sum(runs) / len(runs):.2f}" if runs else "")
    lines.append("| routing purity | " + " | ".join(purity) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
