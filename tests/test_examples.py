"""Every ready config in examples/ validates, and its tasks resolve where the data is present."""

from __future__ import annotations

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
