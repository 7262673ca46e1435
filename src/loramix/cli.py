"""The `loramix` command: a thin layer over the library that parses, validates and calls.

Exit codes: 0 success; 2 bad config or usage; 3 bad data; 4 bad adapter or checkpoint file; 5 training failed
(NaN or inf loss); 1 any other loramix error. Errors print one message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path

from loramix.errors import CheckpointError, ConfigError, DataError, DataWarning, LoramixError, TrainingError

EXIT_CODES: list[tuple[type[LoramixError], int]] = [
    (ConfigError, 2),
    (DataError, 3),
    (CheckpointError, 4),
    (TrainingError, 5),
    (LoramixError, 1),
]


def cmd_train(args: argparse.Namespace) -> int:
    from loramix.models import check_model_path
    from loramix.preflight import check_method_name, check_output_dir
    from loramix.train.config import CONFIG_FILE, RunConfig
    from loramix.train.resume import STARTED_FILES

    if args.continue_from is not None:
        args.set = [*args.set, f"continue_from={json.dumps(args.continue_from)}"]  # a YAML string, as written
    # before torch loads: the config's keys and values, the method's name, the model path and the output folder
    run = RunConfig.from_yaml(args.config, args.set)
    check_method_name(run.method)
    check_model_path(run.model)
    output_dir = Path(args.output_dir or Path("runs") / f"{Path(args.config).stem}-{run.method}")
    check_output_dir(output_dir)
    args.training_into = output_dir
    if (
        not args.resume
        and (output_dir / CONFIG_FILE).is_file()
        and {p.name for p in output_dir.iterdir()} - STARTED_FILES
    ):
        print(
            f"loramix: note: {output_dir} holds a run already; this one replaces it once its data has been read "
            "(--resume would continue it)",
            file=sys.stderr,
        )

    from loramix.methods import load_run_config, run_training
    from loramix.models import show_loading_bars
    from loramix.report import print_table
    from loramix.train.loop import processes

    run = load_run_config(args.config, args.set)  # and the method's own checks (its registry needs torch)
    show_loading_bars(run.progress)
    metrics = run_training(run, output_dir, resume=args.resume, allow_config_change=args.allow_config_change)
    if not processes().is_main_process:  # under `accelerate launch` / `torchrun`: one report
        return 0
    print(print_table([metrics]))
    continual = f", {output_dir}/continual.md" if "continual" in metrics else ""
    print(
        f"\nwrote {output_dir}/metrics.json, {output_dir}/report.md{continual} and the adapters in "
        f"{output_dir}/adapter"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from loramix.data import MultiTaskData
    from loramix.io.files import atomic_write_json
    from loramix.methods import get_method
    from loramix.methods.base import check_eval_tasks
    from loramix.models import show_loading_bars
    from loramix.report import print_table
    from loramix.train.config import CONFIG_FILE, RunConfig
    from loramix.train.loop import processes
    from loramix.train.run import eval_split, load_trained, make_collator, on_inference_device, task_specs

    group = (
        processes()
    )  # one, or those torchrun / accelerate launch started: each scores its share of the batches
    show_loading_bars(RunConfig.from_yaml(args.config or Path(args.run_dir) / CONFIG_FILE).progress)
    run, model, tokenizer, _ = load_trained(args.run_dir, args.config)
    run = run.model_copy(update={"progress": run.progress and group.is_main_process})
    on_inference_device(run, model)
    data = MultiTaskData(task_specs(run))
    method = get_method(run.method)
    check_eval_tasks(Path(args.run_dir), data, last_ones=method.continual)  # before the data is batched
    split = args.split or eval_split(data)
    collator = make_collator(run, data, tokenizer)
    metrics = method.evaluate(Path(args.run_dir), run, model, data, collator, split)
    metrics = {"method": run.method, "split": split, **metrics}
    if group.is_main_process:  # one writer
        atomic_write_json(Path(args.run_dir) / f"eval-{split}.json", metrics)
        print(print_table([metrics]))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from loramix.io import read_checkpoint
    from loramix.preflight import finished_adapter
    from loramix.train.config import CONFIG_FILE, RunConfig
    from loramix.train.predict import predict, read_requests, with_input_fields, write_predictions

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {args.batch_size})")
    from loramix.methods import get_method

    run = RunConfig.from_yaml(args.config or Path(args.run_dir) / CONFIG_FILE)
    tasks = with_input_fields(run, read_checkpoint(finished_adapter(args.run_dir))[0]["metadata"]["tasks"])
    # every row checked before the model loads; an auto-selector chooses the task of a row that names none
    requests = read_requests(args.input, tasks, args.task, any_task=get_method(run.method).uses_selector)

    from loramix.models import show_loading_bars
    from loramix.train.run import collator_of, load_trained, on_inference_device

    show_loading_bars(run.progress)
    run, model, tokenizer, _ = load_trained(args.run_dir, args.config)
    on_inference_device(run, model)
    collator = collator_of(run, [meta["task_type"] for meta in tasks], tokenizer)
    predictor = get_method(run.method).predictor(Path(args.run_dir), run, model, collator, tasks)
    batch_size = args.batch_size or run.eval_batch_size
    write_predictions(predict(requests, predictor, batch_size=batch_size, progress=run.progress), args.out)
    if args.out is not None:
        print(f"wrote {len(requests)} predictions to {args.out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from loramix.preflight import check_export_out, check_export_request

    # before torch and the model load: the tasks asked for, and an output folder that can be written whole
    check_export_request(args.run_dir, args.task, args.expert, all_tasks=args.all_tasks)
    check_export_out(args.out, "--out")

    from loramix.methods import get_method
    from loramix.train.run import load_trained

    run, model, _, tasks = load_trained(args.run_dir)
    print(f"wrote {get_method(run.method).export(run, model, tasks, args)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from loramix.io import read_checkpoint
    from loramix.methods.continual.report import continual_lines
    from loramix.preflight import finished_adapter
    from loramix.report.run_summary import adapter_lines, routing_lines, score_lines

    run_dir = Path(args.run_dir)
    record, tensors = read_checkpoint(finished_adapter(run_dir))
    lines = adapter_lines(run_dir, record, tensors)
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        lines += score_lines(metrics) + continual_lines(metrics) + routing_lines(metrics)
    print("\n".join(lines))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from loramix.preflight import check_output_dir
    from loramix.report import print_table, write_report
    from loramix.report.compare import check_report_folder, legend, read_runs

    if args.out:
        check_output_dir(args.out, "--out")
        check_report_folder(args.out, args.run_dirs)
    results = read_runs(args.run_dirs, args.split)
    print(print_table(results))
    print("\n".join(legend(results)))
    if args.out:
        print(f"wrote {write_report(Path(args.out), results)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loramix.preflight import check_output_dir

    output_dir = args.output_dir or ("runs/demo-generative" if args.generative else "runs/demo")
    check_output_dir(output_dir)
    from loramix.demo import run_demo

    run_demo(
        Path(output_dir),
        steps=args.steps,
        methods=args.methods,
        threads=args.threads,
        generative=args.generative,
    )
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    import textwrap

    from pydantic_core import PydanticUndefined

    from loramix.report.run_summary import shown
    from loramix.train.config import RunConfig

    word = (args.word or "").lower()

    def ranked_fields(fields: dict) -> list:
        """`(rank, key, field)` of the fields that match `word`, the closest first; ties in declared order."""
        ranks = [(setting_rank(word, key, field), key, field) for key, field in fields.items()]
        return sorted((match for match in ranks if match[0] != NOT_SHOWN), key=lambda match: match[0])

    ranked = ranked_fields(RunConfig.model_fields)
    if not ranked and word:  # then a key of a task spec (an entry of `tasks`), such as prompt_field
        from loramix.data.spec import TaskSpec

        ranked = ranked_fields(TaskSpec.model_fields)
        if ranked:
            print("no run setting; keys of a task spec (an entry of `tasks`):")
    if not ranked:
        raise ConfigError(f"no run setting or task spec key names or mentions {args.word!r}")
    for _, key, field in ranked:
        description = field.description or ""
        kind = field.annotation
        kind_text = kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")
        if field.default_factory is not None:
            default = field.default_factory()  # type: ignore[call-arg]
        else:
            default = field.default
        default_text = "required" if default is PydanticUndefined else f"default {shown(default)}"
        print(f"{key}: {kind_text}, {default_text}")
        if description:
            print(textwrap.fill(description, width=100, initial_indent="    ", subsequent_indent="    "))
    return 0


NOT_SHOWN = 4


def setting_rank(word: str, key: str, field: object) -> int:
    """How closely a run setting matches `loramix settings WORD`: 0 it is WORD, 1 a part of its name is (`lr` in
    `router_lr`), 2 a part of its name starts with it, 3 a word of its description does; `NOT_SHOWN` otherwise.
    Without a word every setting shows, in the order the config declares them."""
    if not word:
        return 0
    parts = key.lower().split("_")
    if key.lower() == word:
        return 0
    if word in parts:
        return 1
    if any(part.startswith(word) for part in parts) or key.lower().startswith(word):
        return 2
    if re.search(rf"\b{re.escape(word)}", (getattr(field, "description", None) or "").lower()):
        return 3
    return NOT_SHOWN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramix", description="Mixtures of LoRA experts for multi-task data."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train, evaluate and save one run from a YAML config")
    p.add_argument("config", help="the run's YAML config")
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys (one or several after each --set)",
    )
    p.add_argument("--output-dir", help="where the run goes (default: runs/<config>-<method>)")
    p.add_argument(
        "--continue-from",
        metavar="RUN",
        help="continual methods: learn the config's tasks after those of the finished run RUN, which gives every "
        "setting the config leaves out (as --set continue_from=RUN)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output dir"
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept settings that differ from the run's config.yaml (recorded in "
        "config-changes.jsonl)",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "settings",
        help="list the run config's keys with their types, defaults and meanings (all, or those about WORD)",
    )
    p.add_argument("word", nargs="?", help="show only the keys whose name or description contains this word")
    p.set_defaults(func=cmd_settings)
    p = sub.add_parser("eval", help="evaluate a finished run on its tasks")
    p.add_argument("run_dir", help="the output folder of `loramix train`")
    p.add_argument("--config", help="evaluate with another config (e.g. other data)")
    p.add_argument(
        "--split",
        choices=["test", "validation", "train"],
        help="default: test when every task has one, else validation; writes RUN_DIR/eval-SPLIT.json",
    )
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser(
        "predict",
        help="answer new inputs with a finished run: one JSON line per row of a JSONL/CSV/TSV file",
        description="Each row holds its task's input fields, as in the task's training files (text, or "
        "text_a and text_b, or a generation task's prompt or messages), and names its task in a `task` field "
        "unless --task names one for every row. Rows of different tasks share batches; each is routed as the "
        "run's method routes at inference. Writes one JSON line per row, in order: its line, task and "
        "prediction (a class name, a number or generated text), and for a run with an auto-selector the route "
        "it took (a task's name, or base). A run with an auto-selector also answers rows that name no task: "
        "the task is the one it routes the row to (among every task's classes, on the base model, for a row it "
        "keeps there), with task_given false.",
    )
    p.add_argument("run_dir", help="the output folder of `loramix train`")
    p.add_argument("input", help="the rows to answer (.jsonl, .csv or .tsv)")
    p.add_argument("--task", help="the task of every row (default: each row's `task` field)")
    p.add_argument("--out", help="write the JSON lines here (default: standard output)")
    p.add_argument("--batch-size", type=int, help="rows a batch (default: the run's eval_batch_size)")
    p.add_argument("--config", help="the run's config, when its config.yaml is elsewhere")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser(
        "export",
        help="write tasks' experts as PEFT LoRA adapters (one task, several, or all with a serving manifest)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write a task's adapter as a PEFT LoRA directory, with the task's head rows (head.safetensors: weight and
bias of its classes, applied to the pooled output; none for a generation task, whose causal LM answers
itself) and a note (loramix_export.json: labels, pooling, base model, how the adapter was made).

  loramix export RUN --task T --out DIR              task T's adapter in DIR
  loramix export RUN --task A --task B --out DIR     DIR/A/, DIR/B/ and DIR/manifest.json
  loramix export RUN --all-tasks --out DIR           every task: DIR/<task>/ and DIR/manifest.json
  ... --merged                                       also each task's merged model: DIR/<task>/merged/
                                                     (one --task: DIR/merged/)

manifest.json lists each task's adapter folder, the base model, the rank and the adapted modules, and for
generation tasks the serving commands: vLLM, with every task's adapter registered at start (a request's
`model` names its task):
  vllm serve BASE --enable-lora --lora-modules A=DIR/A B=DIR/B --max-lora-rank R --max-loras 2
(R: the adapters' rank rounded up to a value vLLM accepts: 8, 16, 32, 64, ...), and LoRAX, which loads a
local adapter on the first request that names it:
  lorax-launcher --model-id BASE
  request: {"inputs": "...", "parameters": {"adapter_id": "DIR/A", "adapter_source": "local"}}

What a static multi-LoRA server can serve: one fixed LoRA per request. A run that routes by task
(mola-grad, per-task-lora), by a Poly table (a fixed mixture per task) or shares one adapter (lora)
exports exactly. A router that chooses per input (mola-router, token-router, per-task routers) cannot be
served that way: a classification task is exported as its mean gate over a fixed sample of its training
inputs, an approximation that the command measures against the routed model on the task's test inputs
and reports (and the manifest records per task); a generation task is refused. DIR must be new, empty
or an earlier export: it is written whole beside its place and renamed into it, so an error leaves
nothing half-written, and an earlier export in DIR is replaced only by a complete one.""",
    )
    p.add_argument("run_dir", help="the output folder of `loramix train`")
    p.add_argument(
        "--task",
        action="append",
        help="a task whose expert to export; repeat it for several (then DIR/<task>/ and DIR/manifest.json)",
    )
    p.add_argument(
        "--all-tasks",
        action="store_true",
        help="export every task of the run into DIR/<task>/, with DIR/manifest.json for multi-LoRA serving",
    )
    p.add_argument(
        "--merged",
        action="store_true",
        help="also write each task's merged model (base + its adapter, save_pretrained with the tokenizer)",
    )
    p.add_argument("--expert", type=int, help="ELREA runs: the expert to export (0: the base adapter)")
    p.add_argument("--out", required=True, help="the folder to write the adapters (and manifest) into")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("inspect", help="show a run's config, experts and routing summary")
    p.add_argument("run_dir", help="the output folder of `loramix train`")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("compare", help="finished runs side by side: per-task scores, one column a run")
    p.add_argument("run_dirs", nargs="+", help="output folders of `loramix train`")
    p.add_argument(
        "--split",
        help="compare on this split (each run's eval-SPLIT.json; default: the split each run scored)",
    )
    p.add_argument("--out", help="also write a report comparing them (report.md and plots/) into this folder")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser(
        "demo",
        help="lora vs mola-grad vs mola-router on built-in synthetic tasks (offline)",
        description="Train each method on built-in synthetic tasks with the offline all-MiniLM-L6-v2 encoder, "
        "the same steps and batches for each, and compare them. Writes into the output folder: data/ (the "
        "tasks), one folder per method (its run, as `loramix train` writes it), report.md (the comparison) "
        "and summary.json (each method's accuracy and seconds).",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="where the tasks, the runs, report.md and summary.json go (default: runs/demo, or "
        "runs/demo-generative with --generative)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per method (default: 200, of batch 16; with --generative, 800 of 32)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="the methods to compare, any of the run config's methods (default: lora mola-grad mola-router; "
        "with --generative: lora mola-grad)",
    )
    p.add_argument(
        "--generative",
        action="store_true",
        help="string tasks (reverse, sort, shift, rotate) answered by a tiny GPT-2 trained from scratch with a "
        "character tokenizer, scored by exact match of the generated answer (800 steps of 32 per method)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_demo)
    return parser


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """loramix's own warnings (data that loads but looks wrong) as one line like the errors, without the source
    line Python shows; others as Python shows them."""
    if issubclass(category, DataWarning):
        print(f"loramix: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            run_dir = getattr(args, "run_dir", None)
            if run_dir is not None and not Path(run_dir).is_dir():  # eval, inspect, export: one message
                raise ConfigError(f"{run_dir}: no such run folder (one that `loramix train` wrote)")
            return args.func(args)
        except LoramixError as exc:
            code = next(code for kind, code in EXIT_CODES if isinstance(exc, kind))
            print(f"loramix: error: {exc}", file=sys.stderr)
            return code
        except KeyboardInterrupt:
            folder = getattr(args, "training_into", None)  # set by `train` once its folder is known
            hint = (
                f"; add --resume to the same command to continue {folder} from its newest checkpoint"
                if folder
                else ""
            )
            print(f"loramix: interrupted{hint}", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # the reader went away (`loramix settings | head`): stop quietly, as shell tools do, and let the exit
            # flush into /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141


if __name__ == "__main__":
    sys.exit(main())
