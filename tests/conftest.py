"""Suite-wide settings and fixtures. The toy models live in `tests/models.py`; the tiny offline model directory and
tasks that whole training runs use, in `tests/train/toys.py`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tests.hub import FakeHub
from tests.train import toys

# Every tensor in these tests is tiny: thread start-up costs more than the maths (10-100x on small CPUs).
torch.set_num_threads(1)

# The fuzz tests draw the same examples on every CI run, so that a failure there is one anyone can replay.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toys.model_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toys.tasks_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toys.lm_dir(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toys.lm_dir(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def gen_tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toys.gen_tasks_dir(tmp_path_factory)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """The Hub's client replaced by a folder per repository (`tests.hub.FakeHub`)."""
    import huggingface_hub

    fake = FakeHub(tmp_path / "hub")
    for name in ("create_repo", "upload_folder", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, getattr(fake, name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake
