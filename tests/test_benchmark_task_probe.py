"""`benchmarks/task_probe.py`: the test inputs found word for word among another task's inputs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def probe_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "task_probe.py"
    if str(path.parent) not in sys.path:  # it imports its siblings, as a script run from there does
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location("task_probe_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_task(root: Path, name: str, splits: dict[str, list[str]]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"labels": ["no", "yes"]}))
    for split, texts in splits.items():
        rows = [json.dumps({"text": text, "label": i % 2}) for i, text in enumerate(texts)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def test_shared_inputs_counts_test_inputs_found_in_another_tasks_splits(tmp_path: Path, monkeypatch):
    probe = probe_module()
    write_task(
        tmp_path,
        "reviews",
        {"train": ["a fine film .", "dull ."], "test": ["a fine film .", "bold .", "new ."]},
    )
    write_task(
        tmp_path,
        "subjective",
        {"train": ["the plot moves .", "x ."], "validation": ["bold ."], "test": ["a fine film .", "dull ."]},
    )
    monkeypatch.setattr(probe, "TASKS", ["reviews", "subjective"])
    args = argparse.Namespace(data=tmp_path, max_train=10, probe_train=10, max_eval=10, seed=0)
    _, test = probe.probe_inputs(args)
    assert probe.shared_inputs(args, test) == [
        # "bold ." is in the other task's validation split; "new ." nowhere else
        {"task": "reviews", "found_in": "subjective", "inputs": 2, "of": 3},
        {"task": "subjective", "found_in": "reviews", "inputs": 2, "of": 2},
    ]
