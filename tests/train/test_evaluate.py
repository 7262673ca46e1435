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
