"""The results files the benchmarks keep their entries in (a JSON list, one entry per run)."""

from __future__ import annotations

import json
from pathlib import Path

from loramix.io.files import atomic_write_json


def read_results(path: Path) -> list[dict]:
    """The entries in `path`, none if it does not exist yet. A benchmark reads them again just before it writes
    one, so that another run writing to the same file meanwhile keeps its entries."""
    return json.loads(path.read_text()) if path.is_file() else []


def write_results(path: Path, out: Path | None, results: dict) -> None:
    """A run's `results` to `path`, and into the list in `out` (if given), replacing an earlier entry of the same
    run (`results["run"]`)."""
    atomic_write_json(path, results)
    if out is not None:
        atomic_write_json(out, [r for r in read_results(out) if r["run"] != results["run"]] + [results])
