"""What a trained MoLA-Router run loses to its routing. Scores a finished `method: mola-router` run that routes top-1
(`top_k: 1`) on its test inputs two ways, with the same experts and heads:

- `own`: the run's own router (its scores as `loramix eval` gives them);
- `oracle`: every input of a task sent to the one expert that the run's router gives most of that task's test
  inputs (the task's majority expert in the run's routing stats): routing that knows the task, and keeps the
  experts each task trained most. Tasks the router merged onto one expert stay merged.

`oracle - own` is what the router's choices within a task cost; `oracle` against mola-grad (an expert per task,
routed by the task id in training too) is what learning the routing costs the experts.

    python benchmarks/mola_routing.py RUN_DIR             # both modes (minutes on a CPU)

RUN_DIR is a finished run, e.g. the quality benchmark's `--work` folder `mola-router-seed0` of a `--set top_k=1`
run. Writes RUN_DIR/routing.json.
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
from _results import routing_scores  # noqa: E402

from loramix.data import MultiTaskData  # noqa: E402
from loramix.errors import ConfigError  # noqa: E402
from loramix.inject import get_info  # noqa: E402
from loramix.io.files import atomic_write_json  # noqa: E402
from loramix.methods import get_method  # noqa: E402
from loramix.train.run import eval_split, load_trained, make_collator, task_specs  # noqa: E402

MODES = ("own", "oracle")


def majority_experts(run_dir: Path, task_names: list[str]) -> list[int]:
    """Each task's expert: the one the run's router gave most of the task's test inputs (`metrics.json`)."""
    routing = json.loads((run_dir / "metrics.json").read_text())["routing"]["model"]
    gate_mean = np.asarray(routing["gate_mean"])  # (tasks of the run, experts)
    return [int(gate_mean[routing["task_names"].index(name)].argmax()) for name in task_names]


def route_by_task(router: torch.nn.Module, expert_of_task: list[int]) -> None:
    """Make the top-1 `router` choose `expert_of_task[t]` for every input of task t, through its own gate."""
    table = torch.eye(router.num_experts)[expert_of_task] * 1e4  # (T, E): one logit far above the rest

    def logits(hidden: torch.Tensor, state) -> torch.Tensor:
        return table.to(hidden.device)[state.task_ids]

    router.logits = logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run, model, tokenizer, _ = load_trained(args.run_dir)
    router = get_info(model.backbone).model_router
    if run.method != "mola-router" or run.top_k != 1 or router is None:
        raise ConfigError(
            f"{args.run_dir}: a mola-router run with top_k: 1 is scored here (this one: method {run.method}, "
            f"top_k {run.top_k})"
        )
    model.eval()
    data = MultiTaskData(task_specs(run))
    collator = make_collator(run, data, tokenizer)
    split = eval_split(data)
    majority = majority_experts(args.run_dir, data.task_names)
    out_path = args.run_dir / "routing.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    method = get_method(run.method)
    # `own` first: `oracle` replaces the router's scores for good
    modes = [mode for mode in MODES if mode in args.modes]
    for mode in modes:
        started = time.perf_counter()
        if mode == "oracle":
            route_by_task(router, majority)
        tasks = method.evaluate(args.run_dir, run, model, data, collator, split)["tasks"]
        results[mode] = routing_scores(mode, tasks, started)
    results["majority_expert"] = dict(zip(data.task_names, majority))
    atomic_write_json(out_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
