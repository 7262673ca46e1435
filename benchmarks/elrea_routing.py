"""Where a trained ELREA run loses accuracy: its routing or its experts. Scores a finished `method: elrea` run's test
inputs four ways, with the same experts and heads:

- `base`: the base adapter alone (expert 0: what ELREA had before any expert trained);
- `oracle`: each task's inputs all sent to the expert of the cluster that holds most of that task's training
  examples (routing that knows the task, which ELREA never does);
- `top1`, `ensemble`: ELREA's own answers, routed by each input's gradient feature (`loramix eval` with that
  `elrea_mode`).

If `oracle` is far above `top1`, routing loses the accuracy; if `oracle` is close to `base`, the experts added little.

    python benchmarks/elrea_routing.py RUN_DIR                        # base and oracle (minutes)
    python benchmarks/elrea_routing.py RUN_DIR --modes top1 ensemble  # ELREA's own (gradient features: slower)

RUN_DIR is a finished run, e.g. the quality benchmark's `--work` folder `elrea-seed0`. Writes RUN_DIR/routing.json.
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
from loramix.inject import get_info  # noqa: E402
from loramix.io.files import atomic_write_json  # noqa: E402
from loramix.methods.elrea.evaluate import evaluate_elrea, saved_elrea  # noqa: E402
from loramix.train.run import eval_split, load_trained, make_collator, task_specs  # noqa: E402

MODES = ("base", "oracle", "top1", "ensemble")


def one_expert_per_task(model, expert_of_task: list[int]):
    """Expert weights that send every input of task t to expert `expert_of_task[t]` alone."""
    experts = get_info(model.backbone).config.num_experts
    table = torch.eye(experts)[expert_of_task]  # (T, E)
    return lambda batch: table.to(batch["task_ids"].device)[batch["task_ids"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["base", "oracle"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run, model, tokenizer, _ = load_trained(args.run_dir)
    model.eval()
    data = MultiTaskData(task_specs(run))
    collator = make_collator(run, data, tokenizer)
    split = eval_split(data)
    clusters = json.loads((args.run_dir / "metrics.json").read_text())["clusters"]
    contingency = np.asarray(clusters["contingency"])  # (clusters, tasks of the run, in its order)
    majority = [1 + int(contingency[:, clusters["task_names"].index(t.name)].argmax()) for t in data.tasks]
    centroids, centroid0, heads = saved_elrea(args.run_dir)
    out_path = args.run_dir / "routing.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for mode in args.modes:
        started = time.perf_counter()
        if mode in ("base", "oracle"):
            expert_of_task = [0] * len(data.tasks) if mode == "base" else majority
            weights_of, mode_used = one_expert_per_task(model, expert_of_task), "top1"
        else:
            weights_of, mode_used = None, mode
        metrics, _, _ = evaluate_elrea(
            model,
            data,
            collator,
            run,
            centroids,
            centroid0,
            split=split,
            feature_heads=heads,
            mode=mode_used,
            weights_of=weights_of,
        )
        results[mode] = routing_scores(mode, metrics["tasks"], started)
    results["majority_expert"] = dict(zip(data.task_names, majority))
    atomic_write_json(out_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
