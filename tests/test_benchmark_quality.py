"""`benchmarks/quality.py --paired`: the per-seed gaps between two columns, their mean and 95% t-interval; what a
run keeps of its router's choices on the training batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import benchmark_script


def entry(name: str, seed: int, accuracy: float, steps: int = 800) -> dict:
    return {"name": name, "seed": seed, "steps": steps, "mean_accuracy": accuracy}


def test_paired_gaps_take_the_seeds_both_columns_ran_at_the_budget(tmp_path: Path, capsys):
    quality = benchmark_script("quality")
    first = [entry("a", 0, 0.80), entry("b", 0, 0.79), entry("a", 1, 0.82), entry("b", 1, 0.80)]
    second = [entry("a", 2, 0.81), entry("b", 2, 0.78), entry("a", 3, 0.90), entry("b", 2, 0.10, steps=150)]
    (tmp_path / "one.json").write_text(json.dumps(first))
    (tmp_path / "two.json").write_text(json.dumps(second))
    args = ["--out", str(tmp_path / "one.json"), "--also", str(tmp_path / "two.json"), "--paired", "a", "b"]
    assert quality.main(args) == 0
    line = capsys.readouterr().out.strip()
    gaps = [1.0, 2.0, 3.0]  # seed 3 has no b, and b's 150-step run is another budget
    half = 4.302653 * 1.0 / 3**0.5  # t(0.975, 2 degrees of freedom) * standard deviation / sqrt(n)
    assert line.startswith("a - b: +1.00, +2.00, +3.00 (seeds 0 1 2)")
    assert line.endswith(f"; mean {sum(gaps) / 3:+.2f}, 95% interval {2 - half:+.2f} to {2 + half:+.2f}")
    with pytest.raises(SystemExit, match="no seed has both"):
        quality.paired(first, "a", "c")


def test_a_runs_training_routing_is_kept_in_brief():
    quality = benchmark_script("quality")
    experts = [{"samples": 4, "task": "a", "other_tasks": 0.25}]
    model = {"model": {"counts": [[3], [1]], "purity": 0.75, "experts": experts}}
    assert quality.train_routing({"task_names": ["a", "b"], "routers": model}) == {
        "purity": 0.75,
        "experts": experts,
    }
    layers = {"l0": {**model["model"], "purity": 0.5}, "l1": {**model["model"], "purity": 1.0}}
    assert quality.train_routing({"task_names": ["a", "b"], "routers": layers}) == {"purity": 0.75}
