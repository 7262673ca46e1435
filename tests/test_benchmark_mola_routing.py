"""`benchmarks/mola_routing.py`: a top-1 MoLA-Router run scored with its own router (the run's own scores) and with
each task's inputs sent to its majority expert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loramix
from loramix.cli import main
from loramix.errors import ConfigError
from loramix.inject import get_info
from loramix.train.run import load_trained
from tests.scripts import benchmark_script
from tests.train import toys


def trained(model_dir: Path, tasks_dir: Path, root: Path, **overrides) -> Path:
    config = toys.write_yaml(
        root / "run.yaml", toys.settings(model_dir, tasks_dir, method="mola-router", **overrides)
    )
    assert main(["train", str(config), "--output-dir", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(model_dir: Path, tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained(model_dir, tasks_dir, tmp_path_factory.mktemp("top1"), steps=6, top_k=1)


def test_own_routing_gives_the_runs_scores_and_the_oracle_sends_each_task_to_its_majority_expert(
    run_dir: Path,
):
    module = benchmark_script("mola_routing")
    threads = str(torch.get_num_threads())  # main() sets the thread count: keep the suite's
    assert module.main([str(run_dir), "--threads", threads]) == 0
    result = json.loads((run_dir / "routing.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result["own"]["tasks"] == {name: scores["accuracy"] for name, scores in metrics["tasks"].items()}
    assert set(result["oracle"]["tasks"]) == set(metrics["tasks"])

    # the oracle's gate, through the router's own top-1: every input of task t on its majority expert
    _, model, tokenizer, _ = load_trained(run_dir)
    router = get_info(model.backbone).model_router
    majority = [result["majority_expert"][name] for name in toys.TASK_NAMES]
    module.route_by_task(router, majority)
    ids = torch.tensor([2, 0, 1, 2, 0])
    inputs = tokenizer(["a b c", "d", "e f", "g h i j", "k"], padding=True, return_tensors="pt")
    with torch.no_grad(), loramix.routing(model.backbone, task_ids=ids) as state:
        model.backbone(**inputs)
        assert state.model_gate.indices.squeeze(-1).tolist() == [majority[i] for i in ids.tolist()]


def test_a_dense_router_is_refused(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    module = benchmark_script("mola_routing")
    dense = trained(model_dir, tasks_dir, tmp_path, steps=1)
    with pytest.raises(ConfigError, match="top_k: 1 is scored here .* top_k None"):
        module.main([str(dense), "--threads", str(torch.get_num_threads())])
