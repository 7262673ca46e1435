"""Run configs read from YAML and saved with a run: a config that continues a finished run takes the settings it
leaves out from it; a model folder saved relative stays a path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loramix.errors import ConfigError
from loramix.train.config import RunConfig
from tests.train import toys


@pytest.fixture
def earlier(model_dir: Path, tasks_dir: Path, tmp_path: Path) -> RunConfig:
    """A finished continual run's saved config in `tmp_path/project/runs/first`: its tasks folder written relative
    (as the run saves it), its settings off the defaults, and a `continue_from` of its own."""
    project = tmp_path / "project"
    settings = {
        **toys.settings(model_dir, tasks_dir),
        "tasks_dir": os.path.relpath(tasks_dir, project),
        "method": "continual-mola-grad",
        "steps_per_task": 3,
        "ddas_percentile": 90.0,
        "seed": 7,
        "continue_from": str(tmp_path / "before"),
    }
    first = RunConfig.from_yaml(toys.write_yaml(project / "first.yaml", settings))
    run_dir = project / "runs" / "first"
    toys.write_yaml(run_dir / "config.yaml", first.to_saved_dict(run_dir))
    return first


def test_a_config_that_continues_a_run_takes_every_setting_it_leaves_out_from_it(
    earlier: RunConfig, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    project = tmp_path / "project"
    more = toys.write_yaml(
        project / "configs" / "more.yaml",
        {"continue_from": "../runs/first", "tasks": ["animals"], "lr": 0.05},
    )
    later = RunConfig.from_yaml(more)
    assert later.method == "continual-mola-grad" and later.ddas_percentile == 90.0 and later.seed == 7
    # its own settings win, and the earlier run's tasks are not taken
    assert later.lr == 0.05 and later.tasks == ["animals"]
    assert Path(later.tasks_dir) == tasks_dir.resolve()  # read against the earlier run's folder
    assert later.continue_from == str((project / "runs" / "first").resolve())  # not the earlier run's own
    expected = {
        **earlier.to_dict(),
        "tasks": ["animals"],
        "lr": 0.05,
        "continue_from": str((project / "runs" / "first").resolve()),
    }
    assert later == RunConfig.from_dict(expected)
    # the taken tasks folder stays relative in the continued run's config.yaml, as the earlier run wrote it
    saved = later.to_saved_dict(project / "runs" / "more")
    assert saved["tasks_dir"] == os.path.relpath(tasks_dir.resolve(), (project / "runs" / "more").resolve())
    # the earlier run named with --set, against the folder the command runs in
    alone = toys.write_yaml(project / "alone.yaml", {"tasks": ["animals"]})
    monkeypatch.chdir(project)
    assert RunConfig.from_yaml(alone, ["continue_from=runs/first", "lr=0.05"]) == later


def test_what_a_continued_config_cannot_take_is_named_with_the_files(earlier: RunConfig, tmp_path: Path):
    project = tmp_path / "project"
    no_tasks = toys.write_yaml(project / "no-tasks.yaml", {"continue_from": "runs/first"})
    with pytest.raises(ConfigError, match=r"(?s)no-tasks\.yaml .*runs/first/config\.yaml.*tasks is empty"):
        RunConfig.from_yaml(no_tasks)
    (project / "runs" / "first" / "config.yaml").write_text("lr: [1\n", encoding="utf-8")
    more = toys.write_yaml(project / "more.yaml", {"continue_from": "runs/first", "tasks": ["animals"]})
    with pytest.raises(ConfigError, match=r"runs/first/config\.yaml: not valid YAML"):
        RunConfig.from_yaml(more)
    (project / "runs" / "first" / "config.yaml").unlink()  # no finished run there: nothing to take
    with pytest.raises(ConfigError, match="tasks lists names but tasks_dir is not set"):
        RunConfig.from_yaml(more)


def test_a_model_folder_inside_the_run_folder_is_saved_as_a_path_not_a_hub_name(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    run_dir = tmp_path / "runs" / "x"
    config = toys.write_yaml(
        tmp_path / "run.yaml", {**toys.settings(model_dir, tasks_dir), "model": "./runs/x/tiny"}
    )
    saved = RunConfig.from_yaml(config).to_saved_dict(run_dir)
    assert saved["model"] == "./tiny"
    again = RunConfig.from_yaml(toys.write_yaml(run_dir / "config.yaml", saved))
    assert Path(again.model) == (run_dir / "tiny").resolve()
