"""Evaluation split among processes (`loramix.train.shards`): each process takes a contiguous run of the batches one
process would score, and the gathered results are those of one process, task by task, batch by batch. Under
`torchrun` with two CPU processes, `loramix eval` gives the same file as one process, bit for bit, for a learned
router, ELREA's gradient routing, a continual run's auto-selector and generation tasks, while each process scores
only its share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loramix.methods import run_training
from loramix.train import shards
from loramix.train.config import RunConfig
from loramix.train.shards import EvalBatches
from tests.train import toys

CHOSEN = [
    list(range(7)),
    list(range(100, 103)),
    list(range(200, 209)),
    [300],
]  # tasks of 7, 3, 9 and 1 examples


def loop_batches(chosen: list[list[int]], size: int) -> list[list[list[int]]]:
    """The reference: each task's batches, as one process cuts them."""
    return [[examples[i : i + size] for i in range(0, len(examples), size)] for examples in chosen]


@pytest.mark.parametrize("world", [1, 2, 3, 5, 12])
def test_the_processes_take_contiguous_runs_that_cover_every_batch_once(world: int, monkeypatch):
    shares = []
    for rank in range(world):
        monkeypatch.setattr(shards, "process_share", lambda rank=rank: (rank, world))
        shares.append(list(EvalBatches(CHOSEN, 2)))
    everything = [(task, part) for task, parts in enumerate(loop_batches(CHOSEN, 2)) for part in parts]
    assert [batch for share in shares for batch in share] == everything
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # 11 batches: as even as they divide


def test_the_gathered_results_are_one_process_results_task_by_task(monkeypatch):
    world, every = 3, []
    for rank in range(world):
        monkeypatch.setattr(shards, "process_share", lambda rank=rank: (rank, world))
        every.append(EvalBatches(CHOSEN, 3))
    gathered = [sum(part) for batches in every for _, part in batches]  # what all_gather_object concatenates
    monkeypatch.setattr(shards, "gather_lists", lambda items: gathered)
    scored = every[1].map(
        lambda task, part: sum(part)
    )  # process 1 scores its share; the gather brings the rest
    assert scored == [[sum(part) for part in parts] for parts in loop_batches(CHOSEN, 3)]
    with pytest.raises(ValueError, match="results for this process's"):
        every[1].per_task([])


SCRIPT = """
import json, os, sys
from loramix import cli
from loramix.train import shards

seen = []
original = shards.EvalBatches.__init__
def counted(self, chosen, batch_size):
    original(self, chosen, batch_size)
    seen.append([len(self.plan), len(self.mine)])
shards.EvalBatches.__init__ = counted
out, runs = sys.argv[1], sys.argv[2:]
counts = {}
for run in runs:
    seen.clear()
    assert cli.main(["eval", run]) == 0
    counts[run] = list(seen)
    if os.environ["RANK"] == "0":
        os.replace(os.path.join(run, "eval-test.json"), os.path.join(out, os.path.basename(run) + ".json"))
with open(os.path.join(out, "counts-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(counts, f)
"""


def evaluate_in_processes(processes: int, runs: list[Path], out: Path) -> dict[int, dict]:
    """`loramix eval` of each run by `processes` CPU processes under torchrun; each run's file lands in `out`.
    Returns, per process, each run's `[batches in all, batches scored here]` per evaluation."""
    out.mkdir()
    script = out / "evaluate.py"
    script.write_text(SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*command, str(script), str(out), *map(str, runs)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("mean") == len(runs)  # one table a run: only the main process prints
    return {rank: json.loads((out / f"counts-{rank}.json").read_text()) for rank in range(processes)}


def test_loramix_eval_under_two_processes_scores_each_batch_once_and_as_one_process(
    model_dir: Path, tasks_dir: Path, gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    from tests.methods.test_continual import continual_run

    elrea = {"elrea_clusters": 2, "elrea_feature_examples": 48, "elrea_feature_dim": 64}
    configs = {
        "mola-router": toys.settings(model_dir, tasks_dir, method="mola-router", steps=6, eval_batch_size=8),
        "token-router": toys.settings(
            model_dir, tasks_dir, method="token-router", steps=6, eval_batch_size=8
        ),
        "elrea": toys.settings(model_dir, tasks_dir, method="elrea", steps=6, eval_batch_size=8, **elrea),
        "generation": toys.gen_settings(
            gpt2_dir, gen_tasks_dir, method="mola-router", steps=4, eval_batch_size=3
        ),
        "moe-adapters": continual_run(
            model_dir, tasks_dir, "moe-adapters", steps_per_task=3, eval_batch_size=8
        ).to_dict(),
    }
    runs = []
    for name, config in configs.items():
        run_training(RunConfig.from_dict({k: v for k, v in config.items() if v is not None}), tmp_path / name)
        runs.append(tmp_path / name)
    alone = evaluate_in_processes(1, runs, tmp_path / "one")
    split = evaluate_in_processes(2, runs, tmp_path / "two")
    for run in runs:
        one = json.loads((tmp_path / "one" / f"{run.name}.json").read_text())
        two = json.loads((tmp_path / "two" / f"{run.name}.json").read_text())
        assert two == one, run.name
        counts = alone[0][str(run)]
        assert counts and all(total == mine > 1 for total, mine in counts)  # more than one batch to share
        for evaluation, (total, _) in enumerate(counts):
            mine = [split[rank][str(run)][evaluation] for rank in (0, 1)]
            assert [m[0] for m in mine] == [total, total]
            assert mine[0][1] + mine[1][1] == total and min(mine[0][1], mine[1][1]) >= total // 2
    assert json.loads((tmp_path / "one" / "mola-router.json").read_text())[
        "routing"
    ]  # the gates were gathered
    assert json.loads((tmp_path / "one" / "moe-adapters.json").read_text())["selector"]["confusion"]
