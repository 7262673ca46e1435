"""`benchmarks/continual_stages.py`: a finished continual run's accuracy matrix answered another way, row by row
from the states it kept after each task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loramix.methods import run_training
from loramix.methods.continual.report import selector_rates
from loramix.routers.selector import AutoSelector
from tests.methods.test_continual import continual_run
from tests.scripts import benchmark_script


def test_the_matrix_answered_another_way_is_the_matrix_of_a_run_trained_to_answer_that_way(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Replayed with its own settings the run's matrix comes back; with `ddas_mix: none` in place of the run's
    `posterior`, the matrix of the same run trained with `ddas_mix: none`, every row (training never consults how the
    selector answers), and its metrics. The toy tasks are told apart so surely that mixing by the selector's
    posterior answers as the hard route does: here the posterior is even over the learned tasks, in training and in
    the replay alike, so that the two ways of answering differ."""
    even = lambda self, features: torch.full((len(features), self.num_tasks), 1.0 / self.num_tasks)  # noqa: E731
    monkeypatch.setattr(AutoSelector, "posterior", even)
    settings = {"steps_per_task": 12, "ddas_choice": "shared"}
    mixed = run_training(
        continual_run(model_dir, tasks_dir, "continual-mola-grad", **settings, ddas_mix="posterior"),
        tmp_path / "mixed",
    )
    hard = run_training(
        continual_run(model_dir, tasks_dir, "continual-mola-grad", **settings, ddas_mix="none"),
        tmp_path / "hard",
    )
    assert mixed["accuracy_matrix"] != hard["accuracy_matrix"]  # else the test could not tell them apart
    stages = benchmark_script("continual_stages")
    threads = str(torch.get_num_threads())  # main() sets the thread count: keep the suite's
    out = tmp_path / "stages.json"
    argv = [str(tmp_path / "mixed"), "--with", "ddas_mix=none", "--threads", threads, "--out", str(out)]
    assert stages.main(argv) == 0
    result = json.loads((tmp_path / "mixed" / "stages.json").read_text())
    assert result["own"]["matrix"] == mixed["accuracy_matrix"]
    assert result["changed"]["matrix"] == hard["accuracy_matrix"]
    for key in ("Transfer", "Average", "Last", "BWT"):
        assert result["changed"][key] == pytest.approx(hard[key])
    assert result["changed"]["selector_rates"] == pytest.approx(
        selector_rates(hard["continual"]["selector_rows"])
    )
    assert json.loads(out.read_text()) == [result]


def test_it_refuses_settings_that_train_and_runs_without_every_stage(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    stages = benchmark_script("continual_stages")
    run = continual_run(model_dir, tasks_dir, "moe-adapters", steps_per_task=2, keep_task_states=1)
    run_training(run, tmp_path / "run")
    with pytest.raises(SystemExit):  # the selector's percentile refits it: not an answering setting
        stages.main([str(tmp_path / "run"), "--with", "ddas_percentile=90"])
    with pytest.raises(SystemExit, match="after-task-0"):
        stages.main([str(tmp_path / "run"), "--with", "ddas_mix=none"])
