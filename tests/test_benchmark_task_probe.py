"""`benchmarks/task_probe.py`: the test inputs found word for word among another task's inputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tests.scripts import benchmark_script


def write_task(root: Path, name: str, splits: dict[str, list[str]]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"labels": ["no", "yes"]}))
    for split, texts in splits.items():
        rows = [json.dumps({"text": text, "label": i % 2}) for i, text in enumerate(texts)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def test_shared_inputs_counts_test_inputs_found_in_another_tasks_splits(tmp_path: Path, monkeypatch):
    probe = benchmark_script("task_probe")
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
