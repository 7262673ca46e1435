"""The run's plan: the task table (examples per split, classes, share of the samples, passes over the training
examples) and the parameters by role, printed before training and by `loramix train --dry-run`, which reads the
config, the data and the model and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loramix.cli import main
from loramix.data import MultiTaskData
from loramix.methods import get_method
from loramix.train.config import RunConfig
from loramix.train.plan import millions, parameter_line, task_lines
from loramix.train.run import build_model, task_specs
from tests.train import toys


def columns(lines: list[str]) -> dict[str, list[str]]:
    """The task table's rows by task name."""
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_the_task_table_counts_examples_shares_and_passes(model_dir: Path, tmp_path: Path):
    tasks = toys.write_tasks(tmp_path / "tasks")
    toys.write_task(tasks, "colors", train=24, test=6)  # a smaller task: proportional sampling draws it less
    run = RunConfig.from_dict(
        toys.settings(model_dir, tasks, sampling="proportional", batch_size=8, grad_accum=2)
    )
    data = MultiTaskData(task_specs(run))
    rows = columns(task_lines(run, data, steps=9))
    # 9 steps of 16 samples, 216 training examples: colors draws 24/216 of them, 16 in all, 0.67 passes
    assert rows["colors"] == ["24", "-", "6", "3", "0.111", "0.67"]
    assert rows["sentiment"] == ["96", "-", "24", "2", "0.444", "0.67"]
    weighted = run.model_copy(update={"sampling_weights": {"colors": 4.0}})  # 24 x 4: as often as the others
    assert [columns(task_lines(weighted, data, steps=9))[t][4] for t in toys.TASK_NAMES] == ["0.333"] * 3
    alone = columns(task_lines(run, data, steps=9, one_at_a_time=True))  # each task trains alone for 9 steps
    assert alone["colors"][-2:] == ["-", "6.00"] and alone["animals"][-2:] == ["-", "1.50"]


def test_the_parameter_line_counts_each_role(model_dir: Path, tasks_dir: Path):
    run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="mola-router"))
    data = MultiTaskData(task_specs(run))
    model, _ = build_model(run, data, get_method("mola-router").adapter_config(run, data.num_tasks))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    line = parameter_line(model)
    everything = sum(p.numel() for p in model.parameters())
    assert line.startswith(
        f"parameters: {millions(everything)} in all, {millions(sum(trainable.values()))} trainable"
    )
    heads = sum(n for name, n in trainable.items() if name.startswith("heads."))
    assert f"head {millions(heads)}" in line and "router " in line and "expert " in line
    assert "backbone" not in line  # frozen
    assert [millions(n) for n in (4_224, 123_456, 22_713_000)] == ["4,224", "0.12M", "22.7M"]


def test_a_dry_run_prints_the_plan_and_writes_nothing(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = toys.write_yaml(
        tmp_path / "run.yaml", toys.settings(model_dir, tasks_dir, method="mola-grad", steps=6)
    )
    out = tmp_path / "runs" / "x"
    assert main(["train", str(config), "--output-dir", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"mola-grad on {model_dir}: 3 task(s), 6 steps of 8 samples (48 in all)")
    assert "parameters: " in printed and f"the run would go to {out}" in printed
    assert not (tmp_path / "runs").exists()
    broken = yaml.safe_load(config.read_text()) | {
        "tasks_dir": None,
        "tasks": [{"name": "a", "train": "nope.jsonl"}],
    }
    config.write_text(yaml.safe_dump(broken))
    assert main(["train", str(config), "--output-dir", str(out), "--dry-run"]) == 3  # the data is read
    assert "nope.jsonl" in capsys.readouterr().err


def test_training_with_progress_prints_the_plan_once(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    settings = toys.settings(model_dir, tasks_dir, method="lora", steps=2, progress=True)
    config = toys.write_yaml(tmp_path / "run.yaml", settings)
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.count("loramix: lora on ") == 1 and err.count("loramix: parameters: ") == 1
