"""Evaluation split among processes (`loramix.train.shards`): each process takes a contiguous run of the batches one
process would score, and the gathered results are those of one process, task by task, batch by batch. Under
`torchrun` with two CPU processes, `loramix eval` gives the same file as one process, bit for bit, for a learned
router, ELREA's gradient routing, a continual run's auto-selector and generation tasks, and so does `loramix
predict`, sampled answers too, while each process does only its share."""

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
out, commands = sys.argv[1], json.loads(sys.argv[2])
counts = {}
for name, argv in commands:
    seen.clear()
    argv = [arg.replace("OUT", out) for arg in argv]
    assert cli.main(argv) == 0
    counts[name] = list(seen)
    if argv[0] == "eval" and os.environ["RANK"] == "0":
        os.replace(os.path.join(argv[1], "eval-test.json"), os.path.join(out, name + ".json"))
with open(os.path.join(out, "counts-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(counts, f)
"""


def in_processes(processes: int, commands: list[tuple[str, list[str]]], out: Path) -> dict[int, dict]:
    """Each `loramix` command (its name, its arguments; OUT stands for `out`) run in turn by `processes` CPU
    processes under torchrun; an eval's file lands in `out/<name>.json`. Returns, per process, each command's
    `[batches in all, batches done here]` per evaluation."""
    out.mkdir()
    script = out / "commands.py"
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
        [*command, str(script), str(out), json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    evals = sum(argv[0] == "eval" for _, argv in commands)
    assert done.stdout.count("mean") == evals  # one table an evaluation: only the main process prints
    return {rank: json.loads((out / f"counts-{rank}.json").read_text()) for rank in range(processes)}


def test_eval_and_predict_under_two_processes_do_each_batch_once_and_answer_as_one_process(
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
    rows = [
        {"task": task, "text": f"the {word} near the {word}"}
        for task in toys.TASK_NAMES
        for word in toys.SHARED
    ]
    inputs = tmp_path / "rows.jsonl"
    inputs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    commands = [(run.name, ["eval", str(run)]) for run in runs]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"task": task, "prompt": word}) + "\n"
            for task in toys.GEN_TASKS
            for word in ("abc", "cab", "bca", "acb")
        )
    )
    sample = ["--sample", "--temperature", "5", "--seed", "3", "--max-new-tokens", "4"]
    commands += [
        (
            "predict",
            ["predict", str(runs[0]), str(inputs), "--batch-size", "5", "--out", "OUT/predict.jsonl"],
        ),
        (
            "sampled",
            [
                "predict",
                str(runs[3]),
                str(prompts),
                "--batch-size",
                "3",
                *sample,
                "--out",
                "OUT/sampled.jsonl",
            ],
        ),
    ]
    alone = in_processes(1, commands, tmp_path / "one")
    split = in_processes(2, commands, tmp_path / "two")
    for name, argv in commands:
        if argv[0] == "predict":
            one, two = ((tmp_path / n / f"{name}.jsonl").read_text() for n in ("one", "two"))
            assert len(one.splitlines()) == len(Path(argv[2]).read_text().splitlines())
        else:
            one, two = (json.loads((tmp_path / n / f"{name}.json").read_text()) for n in ("one", "two"))
        assert two == one, name
        counts = alone[0][name]
        assert counts and all(total == mine > 1 for total, mine in counts)  # more than one batch to share
        for evaluation, (total, _) in enumerate(counts):
            mine = [split[rank][name][evaluation] for rank in (0, 1)]
            assert [m[0] for m in mine] == [total, total]
            assert mine[0][1] + mine[1][1] == total and min(mine[0][1], mine[1][1]) >= total // 2
    assert json.loads((tmp_path / "one" / "mola-router.json").read_text())[
        "routing"
    ]  # the gates were gathered
    assert json.loads((tmp_path / "one" / "moe-adapters.json").read_text())["selector"]["confusion"]
