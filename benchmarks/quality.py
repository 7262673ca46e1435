"""Quality benchmark: every method on the ten real tasks in shared/data with all-MiniLM-L6-v2.

Every run uses the same steps, batch size, sequence length, subsample and evaluation set. The default budget, 800
steps of batch 32, is where the methods have converged enough for their ranking to hold (at 150 steps it flips
with the budget). Results are appended to benchmarks/results/quality.json after each run, keyed by method, seed,
steps and overrides: a run made again replaces its entry, the others stay (so a long run can be stopped and
resumed with --skip-done, and the earlier 150- and 400-step entries stay readable); each entry records its seconds.

    python benchmarks/quality.py --skip-done          # every method, seeds 0 1 2, 800 steps (many hours on a CPU)
    python benchmarks/quality.py --methods lora mola-grad --seeds 0 --steps 150   # a quick look
    python benchmarks/quality.py --methods elrea --set elrea_base_fraction=0.7 --out /tmp/ablation.json
    python benchmarks/quality.py --summary-only --steps 800     # the table of what is in --out
    python benchmarks/quality.py --paired mola-grad lora --also benchmarks/results/quality-seeds-3-5.json
                                                      # A - B per seed, mean and 95% t-interval, over every file
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _results import read_results  # noqa: E402
from _timing import device_name  # noqa: E402
from scipy import stats  # noqa: E402

from loramix.io.files import atomic_write_json  # noqa: E402
from loramix.methods import run_training  # noqa: E402
from loramix.train.config import RunConfig  # noqa: E402
from loramix.train.routing_log import ROUTING_TRAIN_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parent
TASKS = ["sst2", "subj", "trec", "sms_spam", "ag_news", "emotion", "cola", "banking77", "mrpc", "rte"]
# name -> run settings beyond the shared ones
DEFAULT_STEPS = 800
# The backbone's learning rate in the variants that train it (MoLA's setting) and in full fine-tuning: the usual
# rate for fine-tuning a BERT-sized encoder at batch 32 (the range 2e-5 to 5e-5 of Devlin et al.), at its top
# because 800 steps are about one pass over the 20,000 training examples.
BACKBONE_LR = 5e-5
BACKBONE = {"train_backbone": True, "backbone_lr": BACKBONE_LR}
# MoLA-Router's router reads the embedding block's output (word + position + segment embeddings, normalised: a
# linear probe tells the ten tasks apart 85% of the time there, 80% from the input embeddings alone) at 3x the
# routers' default learning rate (its only teacher at first is TwD: with B = 0 the task loss gives it no gradient)
ROUTER = {"router_input": "embeddings", "router_lr": 3e-3}
# name -> run settings beyond the shared ones; the rest are RunConfig's defaults (mola-router: TwD of weight 1 on
# the gate probabilities at temperature 0.1, see the README)
VARIANTS: dict[str, dict] = {
    "lora": {"method": "lora"},
    "mola-grad": {"method": "mola-grad"},
    "mola-router": {"method": "mola-router", **ROUTER},
    "mola-router-no-twd": {"method": "mola-router", **ROUTER, "twd_weight": 0.0},
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
    # MoLA's own setting: the backbone trained jointly, against full fine-tuning with per-task heads
    "full-finetune": {"method": "full-finetune", "backbone_lr": BACKBONE_LR},
    "lora+backbone": {"method": "lora", **BACKBONE},
    "mola-grad+backbone": {"method": "mola-grad", **BACKBONE},
    "mola-router+backbone": {"method": "mola-router", **ROUTER, **BACKBONE},
}
# most informative first: a stopped run leaves the comparisons that matter most
DEFAULT_METHODS = [
    "mola-router",
    "mola-grad",
    "lora",
    "lora-wide",
    "mola-router-no-twd",
    "token-router",
    "elrea",
    "full-finetune",
    "mola-grad+backbone",
    "mola-router+backbone",
    "lora+backbone",
]
# run settings recorded in each entry besides its variant's (they decide what a variant measures)
RECORDED = [
    "twd_weight",
    "twd_space",
    "twd_temperature",
    "twd_projection",
    "router_input",
    "router_lr",
    "top_k",
    "train_backbone",
    "backbone_lr",
]


def default_data_dir() -> Path:
    return ROOT.parent.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
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
    parser.add_argument("--skip-done", action="store_true", help="skip the runs already in --out")
    parser.add_argument(
        "--summary-only", action="store_true", help="print the table of --out's runs at --steps and stop"
    )
    parser.add_argument(
        "--paired",
        nargs=2,
        action="append",
        metavar=("A", "B"),
        help="print column A's mean accuracy minus column B's, paired by seed, at --steps, and stop (repeatable)",
    )
    parser.add_argument(
        "--also", nargs="+", type=Path, default=[], help="with --paired: more results files read beside --out"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override run settings (YAML values) for an ablation; recorded in each entry and its column",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    if args.summary_only:
        print(summarise(json.loads(args.out.read_text()), steps=args.steps))
        return 0
    if args.paired:
        everything = [r for path in [args.out, *args.also] for r in json.loads(path.read_text())]
        for a, b in args.paired:
            print(paired(everything, a, b, args.steps))
        return 0
    torch.set_num_threads(args.threads)
    # every run already in --out stays; one run again replaces its entry, and --skip-done skips it instead
    results = read_results(args.out)

    def key(entry: dict) -> tuple:
        return entry["name"], entry["seed"], entry["steps"], json.dumps(entry.get("overrides", {}))

    done = {key(r) for r in results} if args.skip_done else set()
    for seed in args.seeds:
        for name in args.methods:
            this = (name, seed, args.steps, json.dumps(overrides))
            if this in done:
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
            entry["settings"] = {key: getattr(run, key) for key in RECORDED}
            if run.method == "mola-router":
                entry["twd_weight"] = run.twd_weight
            routing = metrics.get("routing", {})
            summary = routing.get("model") or routing.get("aggregate")
            if summary:
                entry["routing_purity"] = summary["purity"]
                entry["routing_probe_accuracy"] = summary.get("probe_accuracy")
            trained = args.work / f"{name}-seed{seed}" / ROUTING_TRAIN_FILE
            if trained.is_file():  # a learned router's choices on the training batches
                entry["train_routing"] = train_routing(json.loads(trained.read_text()))
            if run.method == "elrea":
                entry.update(
                    ari=metrics["ari"],
                    nmi=metrics["nmi"],
                    elrea_mode=run.elrea_mode,
                    elrea_base_fraction=run.elrea_base_fraction,
                    majority_cluster_rate=routing["majority_cluster_rate"],
                )
            results = [r for r in read_results(args.out) if key(r) != this] + [entry]
            atomic_write_json(args.out, results)
            print(
                f"{name} seed {seed}: mean accuracy {entry['mean_accuracy']:.4f} ({entry['seconds']} s)",
                flush=True,
            )
    print(summarise(results, steps=args.steps))
    return 0


def train_routing(written: dict) -> dict:
    """What a run's `routing-train.json` says in brief: the purity of its routers' choices on the training batches
    (the mean over routers) and, for a model-wide router, each expert's task and share of samples from others."""
    routers = written["routers"]
    brief: dict = {"purity": float(np.mean([r["purity"] for r in routers.values()]))}
    if "model" in routers:
        brief["experts"] = routers["model"]["experts"]
    return brief


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in RunConfig.model_fields:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY a run setting (see RunConfig)")
        overrides[key] = yaml.safe_load(value)
    return overrides


def column(entry: dict, steps: int | None = DEFAULT_STEPS) -> str:
    """A method's column: its name, with the steps when they are not `steps`, and any overrides."""
    name = entry["name"] if entry["steps"] == steps else f"{entry['name']} ({entry['steps']} steps)"
    overrides = entry.get("overrides", {})
    return name + "".join(f" {k}={v}" for k, v in overrides.items())


def cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """Mean over seeds, with the range (min-max) when there are several: `80.2 (79.5-81.0)`."""
    if not values:
        return ""
    mean = f"{scale * sum(values) / len(values):.{digits}f}"
    if len(values) == 1:
        return mean
    return f"{mean} ({scale * min(values):.{digits}f}-{scale * max(values):.{digits}f})"


def summarise(results: list[dict], steps: int | None = None) -> str:
    """A markdown table: per-task accuracy, mean over seeds (min-max), one column per method (and step budget,
    when `steps` is None; else only the runs of that budget). Then routing purity, seeds and seconds per run."""
    if steps is not None:
        results = [r for r in results if r["steps"] == steps]
    names = list(dict.fromkeys(column(r, steps or DEFAULT_STEPS) for r in results))
    runs = {name: [r for r in results if column(r, steps or DEFAULT_STEPS) == name] for name in names}
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in TASKS + ["mean"]:
        cells = []
        for name in names:
            values = [r["mean_accuracy"] if task == "mean" else r["tasks"].get(task) for r in runs[name]]
            cells.append(cell([v for v in values if v is not None]))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    purity = [cell([r["routing_purity"] for r in runs[n] if "routing_purity" in r], 1.0, 2) for n in names]
    lines.append("| routing purity | " + " | ".join(purity) + " |")
    seeds = [" ".join(str(r["seed"]) for r in runs[n]) for n in names]
    lines.append("| seeds | " + " | ".join(seeds) + " |")
    seconds = [f"{sum(r['seconds'] for r in runs[n]) / len(runs[n]):.0f}" for n in names]
    lines.append("| seconds per run | " + " | ".join(seconds) + " |")
    return "\n".join(lines)


def paired(results: list[dict], a: str, b: str, steps: int = DEFAULT_STEPS) -> str:
    """Column `a`'s mean accuracy minus column `b`'s on every seed both ran (points), their mean and its 95%
    t-interval over the seeds."""
    means: dict[str, dict[int, float]] = {a: {}, b: {}}
    for entry in results:
        name = column(entry, steps)
        if entry["steps"] == steps and name in means:
            means[name][entry["seed"]] = 100 * entry["mean_accuracy"]
    seeds = sorted(set(means[a]) & set(means[b]))
    if not seeds:
        raise SystemExit(f"--paired: no seed has both {a!r} and {b!r} at {steps} steps")
    gaps = np.array([means[a][s] - means[b][s] for s in seeds])
    line = f"{a} - {b}: " + ", ".join(f"{g:+.2f}" for g in gaps) + f" (seeds {' '.join(map(str, seeds))})"
    if len(gaps) < 2:
        return line
    half = stats.t.ppf(0.975, len(gaps) - 1) * gaps.std(ddof=1) / np.sqrt(len(gaps))
    return (
        line
        + f"; mean {gaps.mean():+.2f}, 95% interval {gaps.mean() - half:+.2f} to {gaps.mean() + half:+.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
