"""The `loramix` command: a thin layer over the library that parses, validates and calls.

Exit codes: 0 success; 2 bad config or usage; 3 bad data; 4 bad adapter or checkpoint file; 5 training failed
(NaN or inf loss); 1 any other loramix error. Errors print one message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loramix.errors import CheckpointError, ConfigError, DataError, LoramixError, TrainingError

EXIT_CODES: list[tuple[type[LoramixError], int]] = [
    (ConfigError, 2),
    (DataError, 3),
    (CheckpointError, 4),
    (TrainingError, 5),
    (LoramixError, 1),
]


def cmd_train(args: argparse.Namespace) -> int:
    from loramix.methods import load_run_config, run_training
    from loramix.report import print_table
    from loramix.train.loop import processes

    run = load_run_config(args.config, args.set)
    output_dir = Path(args.output_dir or Path("runs") / f"{Path(args.config).stem}-{run.method}")
    metrics = run_training(run, output_dir, resume=args.resume)
    if not processes().is_main_process:  # under `accelerate launch` / `torchrun`: one report
        return 0
    print(print_table([metrics]))
    print(
        f"\nwrote {output_dir}/metrics.json, {output_dir}/report.md and the adapters in {output_dir}/adapter"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from loramix.data import MultiTaskData, TextCollator
    from loramix.io.files import atomic_write_json
    from loramix.methods import get_method
    from loramix.report import print_table
    from loramix.train.run import eval_split, load_trained, task_specs

    run, model, tokenizer, _ = load_trained(args.run_dir, args.config)
    data = MultiTaskData(task_specs(run))
    split = args.split or eval_split(data)
    collator = TextCollator(tokenizer, max_length=run.max_length)
    metrics = get_method(run.method).evaluate(Path(args.run_dir), run, model, data, collator, split)
    metrics = {"method": run.method, "split": split, **metrics}
    atomic_write_json(Path(args.run_dir) / f"eval-{split}.json", metrics)
    print(print_table([metrics]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from loramix.methods import get_method
    from loramix.train.run import load_trained

    run, model, _, tasks = load_trained(args.run_dir)
    print(f"wrote {get_method(run.method).export(run, model, tasks, args)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from loramix.io import read_checkpoint

    run_dir = Path(args.run_dir)
    record, tensors = read_checkpoint(run_dir / "adapter")
    config = record["config"]
    print(f"run: {run_dir}")
    print(f"method: {record['metadata'].get('run', {}).get('method', '?')}")
    print("adapter config: " + ", ".join(f"{k}={v}" for k, v in config.items() if v not in (None, [], False)))
    print(f"adapted layers: {len(record['layers'])} (e.g. {', '.join(record['layers'][:3])})")
    print(f"tensors: {len(tensors)}, parameters: {sum(t.numel() for t in tensors.values()):,}")
    tasks = record["metadata"].get("tasks", [])
    print("tasks: " + ", ".join(f"{t['name']} ({len(t['labels'])} labels)" for t in tasks))
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        print(f"mean accuracy: {metrics.get('mean_accuracy')}")
        for scope, summary in metrics.get("routing", {}).items():
            if isinstance(summary, dict) and "purity" in summary:
                print(
                    f"routing ({scope}): purity {summary['purity']:.3f}, NMI {summary['nmi']:.3f}, "
                    f"load {[round(x, 3) for x in summary['load']]}"
                )
                for warning in summary.get("warnings", []):
                    print(f"  warning: {warning}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loramix.demo import run_demo

    run_demo(Path(args.output_dir), steps=args.steps, methods=args.methods, threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramix", description="Mixtures of LoRA experts for multi-task data."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train, evaluate and save one run from a YAML config")
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--output-dir", help="where the run goes (default: runs/<config>-<method>)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output dir"
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a finished run on its tasks")
    p.add_argument("run_dir")
    p.add_argument("--config", help="evaluate with another config (e.g. other data)")
    p.add_argument("--split", choices=["test", "validation", "train"])
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export", help="write one task's expert as a PEFT LoRA adapter")
    p.add_argument("run_dir")
    p.add_argument("--task", help="the task whose expert to export")
    p.add_argument("--expert", type=int, help="ELREA runs: the expert to export (0: the base adapter)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("inspect", help="show a run's config, experts and routing summary")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", help="lora vs mola-grad vs mola-router on built-in synthetic tasks (offline)")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method")
    p.add_argument("--methods", nargs="+", default=["lora", "mola-grad", "mola-router"])
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoramixError as exc:
        code = next(code for kind, code in EXIT_CODES if isinstance(exc, kind))
        print(f"loramix: error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("loramix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
