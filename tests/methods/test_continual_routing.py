"""`benchmarks/continual_routing.py`: a continual run's test inputs answered through every route, to tell what its
auto-selector costs from what its experts learned."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from loramix.methods import run_training
from tests.methods.test_continual import continual_run


def routing_module():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "continual_routing.py"
    spec = importlib.util.spec_from_file_location("continual_routing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["continual-mola-grad", "moe-adapters"])
def test_the_routing_diagnosis_scores_the_run_and_its_task_id_variant_as_they_scored(
    method: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """Its `selector` mode is the run's last row, `base` its row 0 (nothing learned: every input on the base), and
    `task-id` the last row of the method's `-task-id` variant trained separately: training never consults the
    selector, so the same experts serve both."""
    settings = {"steps_per_task": 6, "ddas_choice": "shared"}
    metrics = run_training(continual_run(model_dir, tasks_dir, method, **settings), tmp_path / "run")
    by_task = run_training(
        continual_run(model_dir, tasks_dir, f"{method}-task-id", **settings), tmp_path / "id"
    )
    threads = str(torch.get_num_threads())  # main() sets the thread count: keep the suite's
    assert routing_module().main([str(tmp_path / "run"), "--threads", threads]) == 0
    result = json.loads((tmp_path / "run" / "routing.json").read_text())
    modes = result["modes"]
    assert modes["selector"]["per_task"] == pytest.approx(metrics["accuracy_matrix"][-1])
    assert modes["base"]["per_task"] == pytest.approx(metrics["accuracy_matrix"][0])
    assert modes["task-id"]["per_task"] == pytest.approx(by_task["accuracy_matrix"][-1])
    away, kept = result["routed_to_another_task"], result["kept_on_base"]
    routed_home = result["inputs"] - away["inputs"] - kept["inputs"]
    assert routed_home >= 0 and max(away["right_as_routed"], away["right_by_own_task"]) <= away["inputs"]


def test_the_posterior_weights_are_the_gaussians_at_equal_priors():
    """Scores are doubled negative log-likelihoods: a task 2 log 3 less likely than another gets a third of its
    weight; the weights do not move when every score shifts alike."""
    posterior = routing_module().posterior
    weights = posterior(np.array([0.0, 2 * math.log(3.0), 1e4]))
    assert weights == pytest.approx([0.75, 0.25, 0.0])
    assert posterior(np.array([50.0, 50.0 + 2 * math.log(3.0), 1e4])) == pytest.approx(weights)
