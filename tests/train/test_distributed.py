"""`loramix train` under `torchrun` with two CPU processes (gloo): the model wrapped for distributed training
trains, every method's forward reaches the routing hooks inside the wrapper, only the main process writes (the
evaluations during training and the best one's weights included), and a resumed run ends bitwise where the
uninterrupted one does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train import toys

STEPS = 12


def launch(config: dict, output_dir: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "loramix.cli", "train", str(path), "--output-dir", str(output_dir), *extra]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }  # CPU processes, even on a GPU machine
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("method", ["mola-router", "elrea"])
def test_two_processes_train_and_one_writes(method: str, model_dir: Path, tasks_dir: Path, tmp_path: Path):
    config = toys.settings(
        model_dir,
        tasks_dir,
        method=method,
        steps=STEPS,
        log_every=1,
        lr=1e-2,
        head_lr=1e-1,
        elrea_clusters=3,
        elrea_feature_examples=60,
        elrea_feature_dim=256,
        elrea_base_fraction=0.5,
    )
    if method == "mola-router":  # evaluations on the way, and the best one's weights kept
        config.update(eval_every=4, eval_split="test", keep_best=True)
    out = tmp_path / "run"
    done = launch(config, out, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # the main process reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["mean_accuracy"] > 0
    # one line a step: only the main process logs (ELREA logs each phase in its own folder)
    phases = {"base": STEPS // 2, "experts": STEPS - STEPS // 2} if method == "elrea" else {".": STEPS}
    for folder, steps in phases.items():
        lines = (out / folder / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))
    if method == "elrea":
        assert len(metrics["clusters"]["sizes"]) == 3
    else:
        evaluated = [json.loads(line) for line in lines if '"eval"' in line]
        assert [entry["step"] for entry in evaluated] == [4, 8, 12]
        best = max(evaluated, key=lambda entry: entry["eval"]["mean_accuracy"])  # the first of equals
        assert metrics["best_eval"]["step"] == best["step"]
        assert [p.name for p in (out / "best").iterdir()] == [f"step-{best['step']:06d}.safetensors"]
        # the router's choices on the training batches of both processes, counted once
        routed = json.loads((out / "routing-train.json").read_text())["routers"]["model"]["counts"]
        assert sum(map(sum, routed)) == STEPS * config["batch_size"] * 2
        assert all(0 < json.loads(line)["route_purity"] <= 1 for line in lines if '"loss"' in line)
    adapters = load_file(out / "adapter" / "adapters.safetensors")
    assert any(name.endswith(".B") and bool(t.abs().max() > 0) for name, t in adapters.items())


def test_two_processes_resume_exactly(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    """A two-process run resumed from a mid-run checkpoint ends bitwise where it ends uninterrupted: each step takes
    one batch per process, and each process has its own dropout RNG. 24 examples in batches of 8 make 3 batches an
    epoch, which two processes cannot split evenly: the last of each epoch is paired with the epoch's first."""
    config = toys.settings(
        model_dir,
        tasks_dir,
        method="mola-router",
        steps=7,
        log_every=1,
        dropout=0.2,
        max_train_examples=8,
        checkpoint_every=3,
        keep_checkpoints=3,
    )
    out = tmp_path / "run"
    done = launch(config, out, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    straight = json.loads((out / "metrics.json").read_text())
    adapters = load_file(out / "adapter" / "adapters.safetensors")
    routed = (out / "routing-train.json").read_text()

    # back to step 3 (epoch 1, in the middle of it): the later checkpoints and everything after go
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000003", "step-000006", "step-000007"]
    for later in ("step-000006", "step-000007"):
        shutil.rmtree(checkpoints / later)
    (checkpoints / "latest").write_text("step-000003")
    shutil.rmtree(out / "adapter")
    (out / "metrics.json").unlink()
    done = launch(config, out, tmp_path, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((out / "metrics.json").read_text())

    timings = ("samples_per_s",)
    assert [{k: v for k, v in h.items() if k not in timings} for h in resumed["history"]] == [
        {k: v for k, v in h.items() if k not in timings} for h in straight["history"]
    ]
    assert (out / "routing-train.json").read_text() == routed
    again = load_file(out / "adapter" / "adapters.safetensors")
    different = [name for name in adapters if not torch.equal(adapters[name], again[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_a_continual_run_under_two_processes_learns_the_sequence_and_one_writes(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """MoE-Adapters with its auto-selector, task after task, under two processes: the experts' use that decides
    which experts freeze is counted over both processes' batches (so both freeze the same ones), only the main
    process writes, and the accuracy matrix has a row per task."""
    from tests.methods.test_continual import continual_run

    run = continual_run(model_dir, tasks_dir, "moe-adapters", steps_per_task=4)
    config = {k: v for k, v in run.to_dict().items() if v is not None}
    out = tmp_path / "run"
    done = launch(config, out, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    tasks = len(toys.TASK_NAMES)
    assert len(metrics["accuracy_matrix"]) == tasks + 1
    for task in range(tasks):
        lines = (out / f"task-{task}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, 5))
        assert (out / f"after-task-{task}" / "adapter" / "adapters.safetensors").is_file()
        # every layer: 4 steps of 8 samples in each of 2 processes, top-2 experts per sample
        for counts in metrics["continual"]["expert_use"][str(task)].values():
            assert sum(counts) == 4 * run.batch_size * 2 * 2
