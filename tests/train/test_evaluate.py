"""Evaluation shows a progress bar on a terminal, and none when the run's `progress` is off or stderr is no
terminal (a log file)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import yaml

from loramix.cli import main
from tests.train import toys


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as tqdm asks."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def run_dir(model_dir: Path, tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluated")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(toys.settings(model_dir, tasks_dir, method="mola-router", steps=1)))
    assert main(["train", str(config), "--output-dir", str(root / "run")]) == 0
    return root / "run"


def eval_stderr(monkeypatch: pytest.MonkeyPatch, argv: list[str], stderr: io.StringIO) -> str:
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(argv) == 0
    monkeypatch.undo()
    return stderr.getvalue()


def test_eval_shows_a_progress_bar_on_a_terminal_when_progress_is_on(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # the run's config.yaml keeps tasks_dir relative to the run folder: evaluate from a config beside it
    config = run_dir / "progress.yaml"
    config.write_text(
        yaml.safe_dump({**yaml.safe_load((run_dir / "config.yaml").read_text()), "progress": True})
    )
    shown = eval_stderr(monkeypatch, ["eval", str(run_dir), "--config", str(config)], Terminal())
    assert "eval test" in shown and "batch/s" in shown
    assert "0/3 [" in shown  # counts batches: 3 tasks of 24 test rows, batches of 32


def test_eval_is_silent_when_progress_is_off_or_stderr_is_a_file(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    assert "eval test" not in eval_stderr(monkeypatch, ["eval", str(run_dir)], Terminal())  # progress: false
    config = run_dir / "progress.yaml"
    config.write_text(
        yaml.safe_dump({**yaml.safe_load((run_dir / "config.yaml").read_text()), "progress": True})
    )
    assert "eval test" not in eval_stderr(
        monkeypatch, ["eval", str(run_dir), "--config", str(config)], io.StringIO()
    )


def without_test_split(tasks_dir: Path, root: Path, task: str) -> Path:
    """A copy of the tiny tasks in which `task` has its train split alone."""
    import shutil

    copy = shutil.copytree(tasks_dir, root / "tasks")
    (copy / task / "test.jsonl").unlink()
    return copy


def test_a_task_without_a_test_split_is_left_out_of_the_scores_by_name(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from loramix.data import MultiTaskData
    from loramix.errors import DataError, DataWarning
    from loramix.methods import run_training
    from loramix.train.config import RunConfig
    from loramix.train.run import task_specs
    from tests.methods.test_continual import continual_run
    from tests.methods.test_continual import specs as continual_specs

    first, *others = toys.TASK_NAMES
    data = without_test_split(tasks_dir, tmp_path, first)
    run = RunConfig.from_dict(toys.settings(model_dir, data, method="mola-grad", steps=2))
    with pytest.warns(DataWarning, match=f"{first} have no 'test' split"):
        metrics = run_training(run, tmp_path / "run")
    assert list(metrics["tasks"]) == others and metrics["unscored_tasks"] == [first]
    assert all(metrics["tasks"][name]["n"] == 24 for name in others)
    # a split only some tasks have is scored on those; one that no task has is refused by name
    assert main(["eval", str(tmp_path / "run"), "--split", "test"]) == 0
    assert f"warning: task(s) {first} have no 'test' split" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run"), "--split", "validation"]) == 3
    assert "no task has a 'validation' split" in capsys.readouterr().err
    with pytest.raises(DataError, match="no task has a 'validation' split"):
        MultiTaskData(task_specs(run)).scored_tasks("validation")
    # a continual run scores every task after every task: it says which task has no test split
    specs = continual_specs(tasks_dir)
    del specs[0]["test"]
    continual = continual_run(model_dir, tasks_dir, "continual-mola-grad", tasks=specs, steps_per_task=2)
    with pytest.raises(DataError, match=f"{first} have none"):
        run_training(continual, tmp_path / "continual")


def test_evaluation_routes_each_batch_by_its_ids_as_collated_so_one_task_batches_are_known(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Each evaluation batch holds one task's examples; its ids reach the routing block from the host, as collated
    (not read back from the device the batch moved to), so its layers run that task's expert as one LoRA."""
    from loramix.train import evaluate

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(toys.settings(model_dir, tasks_dir, method="mola-grad", steps=1)))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 0
    states = toys.host_routed_states(monkeypatch, evaluate)
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert len(states) == 3 and [s.one_task for s in states] == [0, 1, 2]  # three tasks, a batch each
    assert all(s.model_gate.single_expert() == s.one_task for s in states)
