"""`loramix train` under `torchrun` with two CPU processes (gloo): the model wrapped for distributed training
trains, every method's forward reaches the routing hooks inside the wrapper, and only the main process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.train import toys

STEPS = 12


def launch(config: dict, output_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "loramix.cli", "train", str(path), "--output-dir", str(output_dir)]
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
    )
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
    adapters = load_file(out / "adapter" / "adapters.safetensors")
    assert any(name.endswith(".B") and bool(t.abs().max() > 0) for name, t in adapters.items())
