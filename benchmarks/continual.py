"""Continual-learning benchmark: the ten tasks of shared/data learned one after another with all-MiniLM-L6-v2, every
method with the same steps per task, batch, sequence length and fixed test sample per task; classes scored by the
label-prompt head (label smoothing 0.2), so tasks not learned yet are answered zero-shot.

    python benchmarks/continual.py                                   # every method (hours on 2 CPU cores)
    python benchmarks/continual.py --methods moe-adapters lae --steps-per-task 30 --max-eval 100
    python benchmarks/continual.py --speed            # DDAS routing vs given task ids on a mixed batch
    python benchmarks/continual.py --grouped          # the adapters' grouped form vs their gathers: time, error
    python benchmarks/continual.py --methods moe-adapters --set ddas_layer=3   # a run setting changed
    python benchmarks/continual.py --methods moe-adapters --seed 1   # another seed of the same run
    python benchmarks/continual.py --summary-only     # the table of --out's runs: mean over seeds (min-max)
    python benchmarks/continual.py --summary-only --also results/continual-seeds-*.json --against sequential-lora@2.5e-4

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
from _results import read_results  # noqa: E402
from _timing import device_name  # noqa: E402
from continual_speed import grouped_precision, grouped_speed, selector_speed  # noqa: E402
from quality import cell, parse_overrides  # noqa: E402

from loramix.io.files import atomic_write_json  # noqa: E402
from loramix.methods import get_method, run_training  # noqa: E402
from loramix.methods.continual.features import STATS  # noqa: E402
from loramix.methods.continual.report import selector_rates  # noqa: E402
from loramix.train.config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent
ORDER = ["ag_news", "sst2", "trec", "emotion", "sms_spam", "subj", "banking77", "cola", "mrpc", "rte"]
METHODS = [
    "zero-shot",
    "sequential-lora",
    "moe-adapters",
    "moe-adapters-task-id",
    "continual-mola-grad",
    "continual-mola-grad-task-id",
    "lae",
    "joint",
]


METRICS = ("Transfer", "Average", "Last", "BWT")


def setting(entry: dict) -> tuple:
    """What makes two entries the same run but for the seed: method, rate, steps, samples, overrides, order, and
    the token statistics of the auto-selector's feature (`ddas_stats`; entries before it: 2, the log token count
    and a pair flag; since: 3, with a pair's segment lengths), so that both stay apart."""
    return (
        entry["method"],
        entry["lr"],
        entry["steps_per_task"],
        entry.get("max_train_examples"),
        entry.get("max_eval_examples"),
        json.dumps(entry.get("overrides") or {}, sort_keys=True),
        json.dumps(entry.get("order", ORDER)),
        entry.get("ddas_stats", 2 if entry.get("selector") else None),
    )


def by_setting(entries: list[dict]) -> dict[tuple, dict[int, dict]]:
    """The entries by `setting`, then by seed; of entries for the same seed (earlier code's runs, kept in the
    file), the last."""
    groups: dict[tuple, dict[int, dict]] = {}
    for entry in entries:
        groups.setdefault(setting(entry), {})[entry["seed"]] = entry
    return groups


def summarise(entries: list[dict]) -> str:
    """A markdown table of the runs in `entries`, one row per setting (training examples kept per task among them):
    Transfer, Average, Last and BWT in points, each the mean over the setting's seeds with its range (min-max), with
    an auto-selector the accuracy after the last task with no input's task given (entries since it was scored), and
    the seeds (`by_setting`)."""
    groups = by_setting(entries)
    lines = [
        "| method | lr | steps per task | train examples | overrides | tasks | Transfer | Average | Last | BWT "
        "| Last, task not given | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, lr, steps, train, _, overrides, order, _), by_seed in groups.items():
        runs = [by_seed[seed] for seed in sorted(by_seed)]
        metrics = [cell([r[k] for r in runs if r.get(k) is not None], digits=2) for k in METRICS]
        metrics.append(
            cell(
                [
                    r["selector"]["task_free_mean"]
                    for r in runs
                    if "task_free_mean" in (r.get("selector") or {})
                ],
                digits=2,
            )
        )
        tasks = len(json.loads(order))
        seeds = " ".join(map(str, sorted(by_seed)))
        changed = "" if overrides == "{}" else overrides
        lines.append(
            f"| {method} | {lr:g} | {steps} | {train} | {changed} | {tasks} | "
            + " | ".join(metrics)
            + f" | {seeds} |"
        )
    return "\n".join(lines)


def paired(entries: list[dict], reference: str) -> str:
    """Each setting's Last against the reference's (`METHOD` or `METHOD@LR`) on the same steps, samples and order,
    seed by seed: the seeds both have, the mean difference in points and a two-sided 95% t-interval over them."""
    from scipy import stats

    method, _, lr = reference.partition("@")
    groups = by_setting(entries)
    lines = []
    for key, by_seed in groups.items():
        refs = [
            group
            for other, group in groups.items()
            if other[0] == method
            and (not lr or abs(other[1] - float(lr)) < 1e-12)
            and (other[2], other[3], other[4], other[6]) == (key[2], key[3], key[4], key[6])
        ]
        if key[0] == method or not refs:
            continue
        if len(refs) > 1:
            raise SystemExit(
                f"--against {reference}: {len(refs)} settings of {method} match; name its rate (@LR)"
            )
        seeds = sorted(set(by_seed) & set(refs[0]))
        if len(seeds) < 2:
            continue
        gaps = [100 * (by_seed[s]["Last"] - refs[0][s]["Last"]) for s in seeds]
        mean = sum(gaps) / len(gaps)
        spread = stats.t.ppf(0.975, len(gaps) - 1) * stats.tstd(gaps) / len(gaps) ** 0.5
        lines.append(
            f"{key[0]} {key[1]:g} {key[5]}: Last {mean:+.2f} [{mean - spread:+.2f}, {mean + spread:+.2f}] against "
            f"{reference} over seeds {' '.join(map(str, seeds))} (by seed {', '.join(f'{g:+.1f}' for g in gaps)})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=ORDER,
        choices=ORDER,
        help="the sequence to learn, in this order (default: the ten tasks in the benchmark's order); a shorter "
        "one is kept apart in --out by its `order`",
    )
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
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="print the table of --out's runs (mean over seeds) and stop",
    )
    parser.add_argument(
        "--also", nargs="+", type=Path, default=[], help="with --summary-only: other results files to add"
    )
    parser.add_argument(
        "--against",
        metavar="METHOD[@LR]",
        help="with --summary-only: also each setting's Last against this method's, paired by seed",
    )
    parser.add_argument(
        "--speed", action="store_true", help="only time DDAS routing against given task ids (a mixed batch)"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        type=int,
        help="with --speed: only these of its cases, by position (6 and 7: the nearest-neighbour selector; 8 and "
        "9: the same with the shared choice; 10: routed acceptance, ddas_accept_state: route; 11-14: case 8 with "
        "its own pass in bfloat16, on the first 24 tokens, both, and both on 32 tokens: ddas_precision, ddas_tokens)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="with --speed: where to time (cuda: written to continual-speed-cuda.json, the model in float32)",
    )
    parser.add_argument(
        "--batches", nargs="+", type=int, default=[64], help="with --speed: the batch sizes to time"
    )
    parser.add_argument(
        "--grouped",
        action="store_true",
        help="only time the adapters' grouped form against their gathers, by task id and in a training step, "
        "and give each form's error against float64 (widths 64 and 128)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="run settings to change (for example ddas_layer=3); kept in each entry as `overrides`",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    if args.summary_only:
        entries = [e for path in (args.out, *args.also) for e in read_results(path)]
        print(summarise(entries))
        if args.against:
            print(paired(entries, args.against))
        return 0
    torch.set_num_threads(args.threads)
    if args.grouped:
        path = args.out.with_name("continual-speed.json")
        names = (
            "adapter-grouped-vs-gathers",
            "adapter-grouped-train-vs-gathers",
            "adapter-grouped-precision",
        )
        here = device_name(torch.device("cpu"))  # another processor's rows are kept
        entries = [e for e in read_results(path) if e["name"] not in names or e["device"] != here]
        for train, batch in ((False, 64), (True, 32)):
            for width in (64, 128):
                entry = {
                    **grouped_speed(15, batch, args.max_length, experts=22, width=width, train=train),
                    "threads": args.threads,
                    "device": here,
                }
                entries.append(entry)
                atomic_write_json(path, entries)
                print(json.dumps(entry), flush=True)
        for width in (64, 128):
            entry = {**grouped_precision(32, args.max_length, 22, width), "device": here}
            entries.append(entry)
            atomic_write_json(path, entries)
            print(json.dumps(entry), flush=True)
        return 0
    if args.speed:
        # block 0's feature (the default), block 3's, block 3 accepting with both choosing; the last two with the
        # experts from block 3 on, and block 1 accepting with the experts from block 1 on: the selector routes
        # inside the pass there
        device = torch.device(args.device)
        path = args.out.with_name(f"continual-speed{'' if device.type == 'cpu' else '-' + device.type}.json")
        entries = read_results(path)

        def case(entry: dict) -> tuple:
            return (
                entry["ddas_layer"],
                entry.get("ddas_accept_layer"),
                entry.get("ddas_normalize"),
                json.dumps(entry.get("layers_to_transform")),
                entry.get("ddas_neighbours", 0),
                entry.get("ddas_choice", "own"),
                entry.get("ddas_accept_state", "base"),
                entry.get("ddas_tokens"),
                entry.get("ddas_precision", "float32"),
                entry["batch"],
            )

        # (layer, accept_layer, first adapted block, neighbours, choice, accept_state, tokens, precision)
        cases = tuple(
            (*c, "own", "base", None, "float32")
            for c in (
                (0, None, 0, 0),
                (3, None, 0, 0),
                (0, 3, 0, 0),
                (3, None, 3, 0),
                (0, 3, 3, 0),
                (0, 1, 1, 0),
            )
        )
        cases += tuple(
            (*c, "base", None, "float32")
            for c in (
                (0, 3, 0, 3, "own"),
                (0, 3, 3, 3, "own"),
                (0, 3, 0, 3, "shared"),
                (0, 3, 3, 3, "shared"),
            )
        )
        # routed acceptance, experts in every block
        cases += ((0, 3, 0, 3, "shared", "route", None, "float32"),)
        # case 8's own pass made cheaper: in bfloat16, on the first 24 tokens, both, and both on 32 tokens
        cheaper = ((None, "bfloat16"), (24, "float32"), (24, "bfloat16"), (32, "bfloat16"))
        cases += tuple((0, 3, 0, 3, "shared", "base", *pass_settings) for pass_settings in cheaper)
        if args.cases:
            cases = tuple(cases[i] for i in args.cases)
        for batch in args.batches:
            for layer, accept_layer, first_block, neighbours, choice, accept_state, *pass_settings in cases:
                tokens, precision = pass_settings
                entry = {
                    **selector_speed(
                        15,
                        batch=batch,
                        seq=args.max_length,
                        experts=22,
                        layer=layer,
                        accept_layer=accept_layer,
                        first_block=first_block,
                        neighbours=neighbours,
                        choice=choice,
                        accept_state=accept_state,
                        tokens=tokens,
                        precision=precision,
                        device=device,
                    ),
                    "threads": args.threads,
                    "device": device_name(device),
                }
                entries = [e for e in entries if e["name"] != entry["name"] or case(e) != case(entry)]
                atomic_write_json(path, entries + [entry])
                entries.append(entry)
                print(json.dumps(entry), flush=True)
        return 0
    results = read_results(args.out)

    def key(r: dict) -> tuple:
        return (*setting(r), r["seed"])

    this = {
        "seed": args.seed,
        "steps_per_task": args.steps_per_task,
        "lr": args.lr,
        "overrides": overrides,
        "order": args.tasks,
    }
    done = {key(r) for r in results} if args.skip_done else set()
    for method in args.methods:
        stats = {"ddas_stats": STATS} if get_method(method).uses_selector else {}
        if key({"method": method, **this, **stats}) in done:
            continue
        run = RunConfig.from_dict(
            {
                "method": method,
                "model": "minilm",
                "tasks_dir": str(args.data),
                "tasks": args.tasks,
                "head": "label-prompt",
                "label_smoothing": 0.2,
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
                **overrides,
            }
        )
        started = time.perf_counter()
        folder = f"{method}-seed{args.seed}-lr{args.lr:g}" + "".join(
            f"-{k}={v}" for k, v in overrides.items()
        )
        if args.tasks != ORDER:
            folder += "-tasks=" + ",".join(args.tasks)
        metrics = run_training(run, args.work / folder)
        entry = {
            "method": method,
            "seed": args.seed,
            "order": args.tasks,
            "steps_per_task": args.steps_per_task,
            "batch_size": args.batch_size,
            "max_train_examples": args.max_train,
            "max_eval_examples": args.max_eval,
            "lr": args.lr,
            **{k: metrics[k] for k in ("Transfer", "Average", "Last", "BWT") if k in metrics},
            "accuracy_matrix": metrics["accuracy_matrix"],
            "selector_rows": metrics.get("continual", {}).get("selector_rows"),
            "selector_rates": selector_rates(metrics.get("continual", {}).get("selector_rows") or []),
            "selector": metrics.get("selector"),
            "seconds": round(time.perf_counter() - started, 1),
            "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        }
        if overrides:
            entry["overrides"] = overrides
        entry.update(stats)
        results = [r for r in read_results(args.out) if key(r) != key(entry)] + [entry]
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
