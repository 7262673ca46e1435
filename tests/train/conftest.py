"""Session fixtures for the training tests: the tiny model directory and the tiny tasks (see `toys.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train import toys


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toys.model_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toys.tasks_dir(tmp_path_factory)
