"""The results files the benchmarks keep their entries in (a JSON list, one entry per run)."""

from __future__ import annotations

import json
from pathlib import Path


def read_results(path: Path) -> list[dict]:
    """The entries in `path`, none if it does not exist yet. A benchmark reads them again just before it writes
    one, so that another run writing to the same file meanwhile keeps its entries."""
    return json.loads(path.read_text()) if path.is_file() else []
