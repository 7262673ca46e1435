"""The `loramix` command: a thin layer over the library that parses, validates and calls.

Exit codes: 0 success; 2 bad config or usage; 3 bad data; 4 bad adapter or checkpoint file; 5 training failed
(NaN or inf loss); 1 any other loramix error. Errors print one message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from loramix.cli_parser import build_parser
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
        and not args.dry_run
        and (output_dir / CONFIG_FILE).is_file()
        and {p.name for p in output_dir.iterdir()} - STARTED_FILES
    ):
        print(
            f"loramix: note: {output_dir} holds a run already; this one replaces it once its data has been read "
            "(--resume would continue it)",
            file=sys.stderr,
        )

    from loramix.methods import load_run_config, plan, run_training
    from loramix.models import show_loading_bars
    from loramix.report import print_table
    from loramix.train.loop import processes

    run = load_run_config(args.config, args.set)  # and the method's own checks (its registry needs torch)
    show_loading_bars(run.progress)
    if args.dry_run:
        print("\n".join(plan(run)))
        print(f"dry run: nothing trained or written (the run would go to {output_dir})")
        return 0
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

    # one process, or those torchrun / accelerate launch started: each scores its share of the batches
    group = processes()
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
        print(print_table([metrics]))
        if args.from_hub is None:
            atomic_write_json(Path(args.run_dir) / f"eval-{split}.json", metrics, sort_keys=False)
        else:  # its folder is the Hub's cache
            print(f"(a run from the Hub, {args.from_hub}: scores printed, no eval-{split}.json written)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from loramix.io import read_checkpoint
    from loramix.preflight import finished_adapter
    from loramix.train.config import CONFIG_FILE, RunConfig
    from loramix.train.predict import check_options, read_requests, with_input_fields, write_predictions

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {args.batch_size})")
    sampling = generation_options(args)
    from loramix.methods import get_method

    run = RunConfig.from_yaml(args.config or Path(args.run_dir) / CONFIG_FILE)
    tasks = with_input_fields(run, read_checkpoint(finished_adapter(args.run_dir))[0]["metadata"]["tasks"])
    # every row and option checked before the model loads; an auto-selector chooses the task of a row that names none
    requests = read_requests(args.input, tasks, args.task, any_task=get_method(run.method).uses_selector)
    check_options(
        tasks,
        scores=args.scores,
        generation=args.max_new_tokens is not None or bool(sampling),
        names=("--scores", "--max-new-tokens and --sample"),
    )

    from loramix.models import show_loading_bars
    from loramix.runs import TrainedRun
    from loramix.train.loop import processes

    show_loading_bars(run.progress)
    trained = TrainedRun(args.run_dir, args.config)
    # one process, or those torchrun / accelerate launch started: each answers its share of the batches
    main = processes().is_main_process
    answers = trained.answer(
        requests,
        scores=args.scores,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        progress=run.progress and main,
    )
    if main:  # one writer
        write_predictions(answers, args.out)
        if args.out is not None:
            print(f"wrote {len(requests)} predictions to {args.out}", file=sys.stderr)
    return 0


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """`loramix predict`'s sampling options as `generate` takes them (empty: greedy), checked."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if not args.sample:
        given = [
            flag
            for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p))
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"{' and '.join(given)}: only with --sample (without it the answers are greedy)"
            )
        return {}
    temperature = 1.0 if args.temperature is None else args.temperature
    top_p = 1.0 if args.top_p is None else args.top_p
    if temperature <= 0:
        raise ConfigError(
            f"--temperature must be above 0 (got {temperature}); leave out --sample for greedy answers"
        )
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (got {top_p})")
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


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


def cmd_serve(args: argparse.Namespace) -> int:
    from loramix.models import show_loading_bars
    from loramix.serve import RunServer
    from loramix.train.config import CONFIG_FILE, RunConfig

    show_loading_bars(RunConfig.from_yaml(args.config or Path(args.run_dir) / CONFIG_FILE).progress)
    from loramix.runs import TrainedRun

    run = TrainedRun(args.run_dir, args.config)
    try:
        server = RunServer((args.host, args.port), run)
    except OSError as exc:  # the port is taken, the address is not this machine's
        raise ConfigError(
            f"--host {args.host} --port {args.port}: cannot listen there ({exc.strerror or exc})"
        ) from None
    host, port = server.server_address[:2]
    print(
        f"serving {args.from_hub or args.run_dir} on http://{host}:{port} (POST /predict, GET /tasks); Ctrl-C stops",
        flush=True,  # seen at once where standard output is a pipe (a log, a supervisor)
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from loramix.methods import push_run

    address = push_run(args.run_dir, args.repo_id, private=args.private or None, message=args.message)
    print(f"uploaded {args.run_dir} to {address}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from loramix.io import read_checkpoint
    from loramix.methods.continual.report import continual_lines
    from loramix.preflight import finished_adapter
    from loramix.report.run_summary import adapter_lines, routing_lines, score_lines

    run_dir = Path(args.run_dir)
    record, tensors = read_checkpoint(finished_adapter(run_dir))
    shown = run_dir if args.from_hub is None else f"{args.from_hub} (from the Hugging Face Hub, in {run_dir})"
    lines = adapter_lines(shown, record, tensors)
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        lines += score_lines(metrics) + continual_lines(metrics) + routing_lines(metrics)
    print("\n".join(lines))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from loramix.compare.runs import check_report_folder, legend, read_runs
    from loramix.preflight import check_output_dir
    from loramix.report import print_table, write_report

    if args.out:
        check_output_dir(args.out, "--out")
        check_report_folder(args.out, args.run_dirs)
    results = read_runs(args.run_dirs, args.split, args.run_labels)
    if args.over_seeds:
        from loramix.compare.seeds import columns_of, paired_lines, seed_table

        columns = columns_of(args.run_dirs, results)
        print("\n".join([*seed_table(columns), "", *paired_lines(columns)]).rstrip())
    else:
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


COMMANDS = {
    "train": cmd_train,
    "settings": cmd_settings,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "export": cmd_export,
    "serve": cmd_serve,
    "push": cmd_push,
    "inspect": cmd_inspect,
    "compare": cmd_compare,
    "demo": cmd_demo,
}


def fetch_runs(args: argparse.Namespace) -> None:
    """The runs a command reads that name a Hub repository (`owner/name[@revision]`, no local folder), fetched
    into the Hub's cache: `args.run_dir` (`args.run_dirs`) then names the local copy, and `args.from_hub` the
    repository (None for a local run). `loramix push` uploads a local run and reads none from the Hub."""
    args.from_hub = None
    if args.command == "push":
        return
    from loramix.remote import fetch_run, hub_reference

    if getattr(args, "run_dir", None) is not None and hub_reference(args.run_dir) is not None:
        args.from_hub, args.run_dir = args.run_dir, str(fetch_run(args.run_dir))
    if getattr(args, "run_dirs", None):
        from loramix.compare.runs import labels_of

        args.run_labels = labels_of(args.run_dirs)  # a repository's column is named as its name reads
        args.run_dirs = [str(fetch_run(d)) for d in args.run_dirs]


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


class _OptionalKernelNote(logging.Filter):
    """Drops bitsandbytes' note, logged when it is imported on a CPU with `kernels` installed, that an optional
    4-bit kernel could not be fetched from the Hub: it falls back to its own CPU kernel, and the note (every command
    that imports PEFT printed it) suggests installing what is installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


_KERNEL_NOTE = _OptionalKernelNote()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KERNEL_NOTE)  # added once
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            fetch_runs(args)
            run_dir = getattr(args, "run_dir", None)
            if run_dir is not None and not Path(run_dir).is_dir():  # eval, inspect, export: one message
                raise ConfigError(f"{run_dir}: no such run folder (one that `loramix train` wrote)")
            return COMMANDS[args.command](args)
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
