"""Routing summaries on gates built so that the right answer is known: perfect routing, noise, collapse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loramix.errors import RoutingError
from loramix.report.routing_stats import COLLAPSE_SHARE, per_layer_summary, routing_summary

TASKS = ["sst2", "rte", "mnli"]


def task_ids_for(num_samples: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(TASKS), size=num_samples)


def perfect_gates(task_ids: np.ndarray, num_experts: int = 4, seed: int = 0) -> np.ndarray:
    """Task k sends most of its gate to expert k, with a little Dirichlet noise on top (mean 0.05 / e)."""
    noise = np.random.default_rng(seed).dirichlet(np.ones(num_experts), size=len(task_ids))
    return 0.95 * np.eye(num_experts)[task_ids] + 0.05 * noise  # (n, e)


def purity_reference(gates: np.ndarray, task_ids: np.ndarray) -> float:
    """Literal loop: every expert predicts the majority task of the samples it wins."""
    correct = 0
    for expert in range(gates.shape[1]):
        won = [task for gate, task in zip(gates, task_ids) if int(np.argmax(gate)) == expert]
        if won:
            correct += max(won.count(task) for task in set(won))
    return correct / len(task_ids)


def test_perfect_routing_is_pure_and_probeable():
    task_ids = task_ids_for(300)
    summary = routing_summary(perfect_gates(task_ids), task_ids, TASKS)
    assert summary["purity"] == 1.0
    assert summary["nmi"] == pytest.approx(1.0)
    assert summary["probe_accuracy"] >= 0.99 and summary["probe_folds"] == 5
    assert summary["expert_task"] == ["sst2", "rte", "mnli", None]
    assert np.argmax(summary["gate_mean"], axis=1).tolist() == [0, 1, 2]
    assert summary["argmax_share"][3] == 0.0
    assert any(w.startswith("expert 3 is never used") for w in summary["warnings"])


def test_random_gates_reach_only_the_majority_share():
    task_ids = task_ids_for(3000)
    gates = np.random.default_rng(1).dirichlet(np.ones(4), size=3000)
    summary = routing_summary(gates, task_ids, TASKS)
    assert summary["purity"] == pytest.approx(purity_reference(gates, task_ids))
    assert summary["majority_share"] <= summary["purity"] <= summary["majority_share"] + 0.05
    assert summary["nmi"] < 0.02
    assert summary["probe_accuracy"] < summary["majority_share"] + 0.05
    assert summary["warnings"] == []


def test_load_share_and_gate_mean_against_loops():
    task_ids = task_ids_for(50)
    gates = np.random.default_rng(2).random((50, 3))
    summary = routing_summary(gates, task_ids, TASKS, probe=False)
    for task in range(len(TASKS)):
        rows = [gate for gate, tid in zip(gates, task_ids) if tid == task]
        assert summary["gate_mean"][task] == pytest.approx(np.mean(rows, axis=0).tolist())
    assert summary["load"] == pytest.approx(gates.mean(axis=0).tolist())
    wins = [int(np.argmax(gate)) for gate in gates]
    assert summary["argmax_share"] == pytest.approx([wins.count(e) / 50 for e in range(3)])
    assert summary["probe_accuracy"] is None


def test_collapse_warning_when_every_sample_picks_expert_zero():
    task_ids = task_ids_for(120)
    gates = np.tile([0.7, 0.1, 0.1, 0.1], (120, 1))
    summary = routing_summary(gates, task_ids, TASKS)
    assert summary["argmax_share"][0] == 1.0 > COLLAPSE_SHARE
    assert any(w.startswith("collapse: expert 0 takes 100.0% of samples") for w in summary["warnings"])
    assert summary["purity"] == pytest.approx(summary["majority_share"])
    assert summary["nmi"] == pytest.approx(0.0)


def test_uniform_gates_are_not_a_collapse_but_warn_as_unspecialised():
    task_ids = task_ids_for(40)
    summary = routing_summary(np.full((40, 4), 0.25), task_ids, TASKS, probe=False)
    assert summary["argmax_share"] == pytest.approx([0.25] * 4)
    assert summary["entropy"] == pytest.approx(1.0)
    assert [w for w in summary["warnings"] if "collapse" in w or "never used" in w] == []
    assert any("near-uniform" in w for w in summary["warnings"])


def test_never_used_expert_needs_both_no_wins_and_a_tiny_gate():
    task_ids = task_ids_for(60)
    gates = perfect_gates(task_ids, num_experts=3)
    tiny = np.concatenate([gates, np.full((60, 1), 0.001)], axis=1)  # expert 3: never wins, mean gate 0.001
    mixed_in = np.concatenate([gates, np.full((60, 1), 0.2)], axis=1)  # expert 3: never wins, still used
    tiny_warnings = routing_summary(tiny, task_ids, TASKS, probe=False)["warnings"]
    mixed_in_warnings = routing_summary(mixed_in, task_ids, TASKS, probe=False)["warnings"]
    assert any(w.startswith("expert 3 is never used") for w in tiny_warnings)
    assert not any("never used" in w for w in mixed_in_warnings)


def test_output_is_json_serialisable_even_with_a_task_without_samples():
    task_ids = np.array([0, 0, 0, 1, 1, 1])  # "mnli" has no samples
    summary = routing_summary(perfect_gates(task_ids), task_ids, TASKS)
    assert summary["gate_mean"][2] == [None] * 4
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["probe_folds"] == 3


def test_probe_falls_back_for_tiny_tasks():
    single = np.array([0, 1, 1, 1, 2, 2])  # task 0 has one sample: dropped, 2 folds on the rest
    summary = routing_summary(perfect_gates(single), single, TASKS)
    assert summary["probe_folds"] == 2 and 0.0 <= summary["probe_accuracy"] <= 1.0
    lonely = np.array([0, 1, 1, 1])  # one task left with two or more samples: nothing to probe
    summary = routing_summary(perfect_gates(lonely), lonely, TASKS)
    assert summary["probe_accuracy"] is None and summary["probe_folds"] == 0


@pytest.mark.parametrize(
    ("gates", "task_ids", "match"),
    [
        (np.ones((4, 2, 3)), np.zeros(4, dtype=int), "shape"),
        (np.ones((4, 3)), np.zeros(5, dtype=int), "task_ids must have shape"),
        (np.ones((4, 3)), np.array([0, 1, 2, 3]), r"\[0, 3\)"),
        (np.ones((4, 3)), np.array([0.5, 1, 1, 1]), "integer"),
        (np.full((4, 3), np.nan), np.zeros(4, dtype=int), "NaN"),
    ],
)
def test_bad_inputs_say_what_is_wrong(gates, task_ids, match):
    with pytest.raises(RoutingError, match=match):
        routing_summary(gates, task_ids, TASKS)


def test_per_layer_summary_and_aggregate():
    task_ids = task_ids_for(200)
    rng = np.random.default_rng(3)
    layers = {
        "layers.0": rng.dirichlet(np.ones(4), size=200),  # noise
        "layers.1": perfect_gates(task_ids, seed=4),  # specialised
    }
    result = per_layer_summary(layers, task_ids, TASKS)
    assert list(result["layers"]) == ["layers.0", "layers.1"]
    assert result["layers"]["layers.1"]["purity"] == 1.0
    assert all(summary["probe_accuracy"] is None for summary in result["layers"].values())
    aggregate = result["aggregate"]
    assert aggregate["num_layers"] == 2
    layer_mean = np.mean(list(layers.values()), axis=0)  # (n, e)
    expected = routing_summary(layer_mean, task_ids, TASKS, probe=False)["gate_mean"]
    np.testing.assert_allclose(aggregate["gate_mean"], expected)
    assert aggregate["probe_accuracy"] >= 0.99  # the specialised layer is visible through the concatenation
    assert aggregate["mean_layer_purity"] == pytest.approx(
        np.mean([summary["purity"] for summary in result["layers"].values()])
    )
    assert any(w.startswith("layers.1: expert 3 is never used") for w in aggregate["warnings"])
    json.dumps(result, allow_nan=False)


def test_per_layer_summary_with_different_expert_counts_and_probe():
    task_ids = task_ids_for(60)
    layers = {"a": perfect_gates(task_ids, 3), "b": perfect_gates(task_ids, 5)}
    result = per_layer_summary(layers, task_ids, TASKS, probe=True)
    assert result["aggregate"]["num_experts"] == 8
    assert result["layers"]["a"]["probe_accuracy"] == 1.0
    with pytest.raises(RoutingError, match="empty"):
        per_layer_summary({}, task_ids, TASKS)


def test_layers_that_each_route_make_no_routes_nothing_aggregate_and_flat_layers_do():
    """Layer 0 sends task t to expert t, layer 1 to expert t + 1 (mod 3): each routes, while their mean gate is
    nearly uniform. The aggregate judges by the layers, not by that mean; when every layer is flat it says so once."""
    task_ids = task_ids_for(300)
    first = perfect_gates(task_ids, 3, seed=1)
    second = np.roll(first, 1, axis=1)
    third = np.roll(first, 2, axis=1)
    result = per_layer_summary({"a": first, "b": second, "c": third}, task_ids, TASKS)
    assert routing_summary(np.mean([first, second, third], axis=0), task_ids, TASKS)["spread"] < 0.05
    assert not any("routes nothing" in w for w in result["aggregate"]["warnings"])
    flat = np.full((300, 3), 1 / 3)
    result = per_layer_summary({"a": flat, "b": flat}, task_ids, TASKS)
    assert (
        result["aggregate"]["warnings"][0]
        == "routes nothing in any of its 2 layers; the experts act as one LoRA"
    )
