"""The `loramix` command's arguments: one subcommand a command of :mod:`loramix.cli`, named by `command`."""

from __future__ import annotations

import argparse

RUN_HELP = (
    "the output folder of `loramix train`, or a Hugging Face Hub repository that `loramix push` wrote "
    "(owner/name, or owner/name@revision)"
)


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
        "--dry-run",
        action="store_true",
        help="read the config, the data and the model, print the plan (tasks, examples, epochs, trainable "
        "parameters) and stop: nothing is trained or written",
    )
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
    p = sub.add_parser(
        "settings",
        help="list the run config's keys with their types, defaults and meanings (all, or those about WORD)",
    )
    p.add_argument("word", nargs="?", help="show only the keys whose name or description contains this word")
    p = sub.add_parser("eval", help="evaluate a finished run on its tasks")
    p.add_argument("run_dir", help=RUN_HELP)
    p.add_argument("--config", help="evaluate with another config (e.g. other data)")
    p.add_argument(
        "--split",
        choices=["test", "validation", "train"],
        help="default: test when every task has one, else validation; writes RUN_DIR/eval-SPLIT.json",
    )
    p = sub.add_parser(
        "predict",
        help="answer new inputs with a finished run: one JSON line per row of a JSONL/CSV/TSV/Parquet file",
        description="Each row holds its task's input fields, as in the task's training files (text, or "
        "text_a and text_b, or a generation task's prompt or messages), and names its task in a `task` field "
        "unless --task names one for every row. Rows of different tasks share batches; each is routed as the "
        "run's method routes at inference. Writes one JSON line per row, in order: its line, task and "
        "prediction (a class name, a number or generated text), and for a run with an auto-selector the route "
        "it took (a task's name, or base). A run with an auto-selector also answers rows that name no task: "
        "the task is the one it routes the row to (among every task's classes, on the base model, for a row it "
        "keeps there), with task_given false.",
    )
    p.add_argument("run_dir", help=RUN_HELP)
    p.add_argument("input", help="the rows to answer (.jsonl, .csv, .tsv or .parquet)")
    p.add_argument("--task", help="the task of every row (default: each row's `task` field)")
    p.add_argument("--out", help="write the JSON lines here (default: standard output)")
    p.add_argument("--batch-size", type=int, help="rows a batch (default: the run's eval_batch_size)")
    p.add_argument("--config", help="the run's config, when its config.yaml is elsewhere")
    p.add_argument(
        "--scores",
        action="store_true",
        help="classification: add each answer's score, the probability of its class among its task's classes "
        "(a continual run's: as its route or its mixture of routes gives it; for a row of no task kept on the "
        "base, among every task's classes)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="generation tasks: tokens an answer may take (default: the run's max_new_tokens, else 64)",
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="generation tasks: sample the answers instead of decoding greedily",
    )
    p.add_argument("--temperature", type=float, help="with --sample: the softmax temperature (default 1.0)")
    p.add_argument(
        "--top-p", type=float, help="with --sample: nucleus sampling's probability mass (default 1.0)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="with --sample: the seed (the same file, batch size and seed give the same answers, however many "
        "processes share the batches)",
    )
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
    p.add_argument("run_dir", help=RUN_HELP)
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
    p = sub.add_parser(
        "serve",
        help="answer rows over HTTP with a finished run (POST /predict, GET /tasks, GET /health)",
        description='Load a finished run once and answer JSON requests: POST /predict with {"rows": [...]} '
        "(rows as `loramix predict` reads them; options task, scores, batch_size, max_new_tokens, sampling, seed) "
        'returns {"answers": [...]}; GET /tasks lists the run\'s tasks. One process; requests are answered one '
        'at a time, each request\'s rows in shared batches. A bad request gets 400 with {"error": ...}.',
    )
    p.add_argument("run_dir", help=RUN_HELP)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the port (default 8000; 0: a free one)")
    p.add_argument("--config", help="the run's config, when its config.yaml is elsewhere")
    p = sub.add_parser(
        "push",
        help="upload a finished run to a Hugging Face Hub repository, for predict, inspect, export and eval there",
        description="Upload a finished run (config.yaml, adapter/ with its heads and task metadata, metrics, report "
        "and plots; never its checkpoints) with a model card, in one commit, to a Hub repository (created if "
        "needed; log in with `hf auth login` or set HF_TOKEN). Then `loramix predict|inspect|export|eval|compare "
        "owner/name` (or owner/name@revision) read it from the Hub.",
    )
    p.add_argument("run_dir", help="the output folder of `loramix train`")
    p.add_argument("repo_id", help="the Hub repository, owner/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", help="the commit message (default: Upload loramix run RUN_DIR's name)")
    p = sub.add_parser("inspect", help="show a run's config, experts and routing summary")
    p.add_argument("run_dir", help=RUN_HELP)
    p = sub.add_parser("compare", help="finished runs side by side: per-task scores, one column a run")
    p.add_argument(
        "run_dirs",
        nargs="+",
        help="output folders of `loramix train`, or Hub repositories `loramix push` wrote",
    )
    p.add_argument(
        "--split",
        help="compare on this split (each run's eval-SPLIT.json; default: the split each run scored)",
    )
    p.add_argument(
        "--over-seeds",
        action="store_true",
        help="runs whose configs differ only in their seed make one column: the mean over seeds with the lowest "
        "and highest, and each column against the first paired by seed (the mean difference, its 95%% interval)",
    )
    p.add_argument("--out", help="also write a report comparing them (report.md and plots/) into this folder")
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
    return parser
