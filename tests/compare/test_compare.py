"""`loramix compare`: finished runs side by side, each named by its folder, on the split each scored or on one split
asked for; runs it cannot read or compare are refused with the file or the flag named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramix.cli import main
from loramix.methods import run_training
from loramix.train.config import RunConfig
from tests.train import toys


def fake_run(
    folder: Path, method: str, accuracies: dict[str, float], split: str = "test", **files: dict
) -> Path:
    """A run folder holding only the score files `compare` reads."""
    folder.mkdir(parents=True)
    tasks = {task: {"accuracy": value, "macro_f1": value, "n": 10} for task, value in accuracies.items()}
    metrics = {
        "method": method,
        "split": split,
        "tasks": tasks,
        "mean_accuracy": sum(accuracies.values()) / 2,
    }
    (folder / "metrics.json").write_text(json.dumps({**metrics, "history": [{"step": 1, "loss": 1.0}]}))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


def test_two_trained_runs_print_side_by_side_and_write_one_report(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    runs = []
    for method in ("lora", "mola-grad"):  # both folders are named "run": the columns name their parents too
        settings = toys.settings(model_dir, tasks_dir, method=method, steps=4)
        run_training(RunConfig.from_dict(settings), tmp_path / method / "run")
        runs.append(tmp_path / method / "run")
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "both")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["task", "lora/run", "mola-grad/run"]
    assert [line.split()[0] for line in printed.splitlines()[2:5]] == toys.TASK_NAMES  # the config's order
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        for task, scores in metrics["tasks"].items():
            line = next(line for line in printed.splitlines() if line.startswith(task))
            assert f"{scores['accuracy']:.3f}" in line
        assert f"{run.parent.name}/run: {metrics['method']}, test split" in printed
    report = (tmp_path / "both" / "report.md").read_text()
    assert "2 methods on 3 tasks" in report and "### mola-grad/run" in report
    assert (tmp_path / "both" / "plots").is_dir()


def test_a_split_asked_for_reads_the_eval_files_and_names_the_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    scored = {
        "method": "lora",
        "split": "validation",
        "tasks": {"a": {"accuracy": 0.25}},
        "mean_accuracy": 0.25,
    }
    a = fake_run(tmp_path / "a", "lora", {"a": 0.5, "b": 0.5}, **{"eval-validation": scored})
    b = fake_run(tmp_path / "b", "mola-grad", {"a": 0.75, "b": 1.0}, split="validation")
    assert main(["compare", str(a), str(b), "--split", "validation"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("a "))
    assert line.split() == ["a", "0.250", "0.750"]  # a's from eval-validation.json, b's from its metrics.json
    assert main(["compare", str(a), str(b), "--split", "train"]) == 4
    assert f"{a / 'eval-train.json'}: not found; score the run on that split first" in capsys.readouterr().err


def test_runs_scored_on_different_splits_are_not_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    a = fake_run(tmp_path / "a", "lora", {"a": 0.5, "b": 0.5})
    b = fake_run(tmp_path / "b", "lora", {"a": 0.5, "b": 0.5}, split="validation")
    assert main(["compare", str(a), str(b)]) == 2
    assert "different splits (a: test, b: validation); pass --split" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found; was this folder written by `loramix train`"),
        ("{", "not valid JSON"),
        ("[]", "expected a JSON object at the top level"),
    ],
)
def test_a_folder_without_readable_scores_is_named(
    content: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    good = fake_run(tmp_path / "good", "lora", {"a": 0.5, "b": 0.5})
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "metrics.json").write_text(content)
    assert main(["compare", str(good), str(bad)]) == 4
    assert f"{bad / 'metrics.json'}: {message}" in capsys.readouterr().err


def test_the_report_does_not_replace_a_runs_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    a = fake_run(tmp_path / "a", "lora", {"a": 0.5, "b": 0.5})
    assert main(["compare", str(a), "--out", str(a)]) == 2
    assert "is the folder of run" in capsys.readouterr().err
    assert not (a / "report.md").exists()


def test_over_seeds_makes_a_column_a_setting_and_pairs_them_by_seed(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    runs = {}
    for name, extra in {"lora": {}, "mola-grad": {"method": "mola-grad"}, "lora-r2": {"rank": 2}}.items():
        for seed in (0, 1, 2) if name != "lora-r2" else (1,):
            settings = toys.settings(model_dir, tasks_dir, steps=3, seed=seed, **{"method": "lora", **extra})
            runs[name, seed] = tmp_path / f"{name}-{seed}"
            run_training(RunConfig.from_dict(settings), runs[name, seed])
    assert main(["compare", *map(str, runs.values()), "--over-seeds"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[1:] == ["lora", "(rank=4)", "mola-grad", "(rank=4)", "lora", "(rank=2)"]
    means = {
        key: json.loads((run / "metrics.json").read_text())["mean_accuracy"] for key, run in runs.items()
    }
    lora = [means["lora", s] for s in (0, 1, 2)]
    mean_row = next(line for line in printed if line.startswith("mean "))
    assert f"{sum(lora) / 3:.3f} ({min(lora):.3f}-{max(lora):.3f})" in mean_row
    assert mean_row.split()[-1] == f"{means['lora-r2', 1]:.3f}"  # one seed: no range
    assert next(line for line in printed if line.startswith("seeds")).split()[1:] == ["0", "1", "2"] * 2 + [
        "1"
    ]
    # the paired difference against the first column, by hand
    gaps = [means["mola-grad", s] - means["lora", s] for s in (0, 1, 2)]
    mean = sum(gaps) / 3
    half = 4.302652729749464 * (sum((g - mean) ** 2 for g in gaps) / 2) ** 0.5 / 3**0.5  # t(0.975, 2 df)
    paired = next(line for line in printed if line.startswith("mola-grad (rank=4) - lora (rank=4)"))
    assert f"mean {mean:+.4f}, 95% interval {mean - half:+.4f} to {mean + half:+.4f} over 3 seeds" in paired
    one = next(line for line in printed if line.startswith("lora (rank=2) - lora (rank=4)"))
    assert one.endswith(f"{means['lora-r2', 1] - means['lora', 1]:+.4f} (seed 1); one seed, no interval")
    twice = [str(runs["lora", 0]), str(runs["lora", 0]) + "/."]
    assert main(["compare", *twice, "--over-seeds"]) == 2
    assert "have the same settings and seed 0" in capsys.readouterr().err
