"""Helpers shared by the data tests: tiny task files written into tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> Callable[[str, list[dict[str, Any]]], str]:
    """Write rows to tmp_path/name and return the path as a string."""

    def make(name: str, rows: list[dict[str, Any]]) -> str:
        return str(write_jsonl(tmp_path / name, rows))

    return make
