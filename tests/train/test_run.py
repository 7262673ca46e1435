"""Whole runs through `run_training`: every method learns the tiny tasks and writes what it documents, and
MoLA-Router's TwD loss makes the router separate the tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from loramix.methods import run_training
from loramix.train.config import RunConfig
from tests.train import toys

METHODS = ["lora", "lora-wide", "per-task-lora", "mola-grad", "mola-router", "token-router"]
# What `routing` holds for each method (the report module's docstring): learned gates only.
ROUTING_KEYS = {
    "lora": set(),
    "lora-wide": set(),
    "per-task-lora": set(),
    "mola-grad": set(),
    "mola-router": {"model"},
    "token-router": {"layers", "aggregate"},
}
CHANCE = float(np.mean([1 / len(keys) for _, keys, _ in toys.TASKS.values()]))


def window_means(history: list[dict], key: str) -> tuple[float, float]:
    """Mean of `key` over the first and the last quarter of the logged steps (one step's batch is noisy)."""
    values = [h[key] for h in history if key in h]
    quarter = max(1, len(values) // 4)
    return float(np.mean(values[:quarter])), float(np.mean(values[-quarter:]))


def test_the_fixture_tokenizer_maps_words_to_their_ids(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("the good film", "red cat")["input_ids"]
    cls, sep = toys.VOCAB.index("[CLS]"), toys.VOCAB.index("[SEP]")
    words = [toys.VOCAB.index(w) for w in ("the", "good", "film")]
    assert ids == [cls, *words, sep, toys.VOCAB.index("red"), toys.VOCAB.index("cat"), sep]
    assert tokenizer("zebra")["input_ids"][1] == toys.VOCAB.index("[UNK]")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_and_writes_its_run(
    method: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    run = RunConfig.from_dict(
        toys.settings(model_dir, tasks_dir, method=method, steps=40, log_every=1, lr=1e-2, head_lr=1e-1)
    )
    metrics = run_training(run, tmp_path)

    history = metrics["history"]
    assert [h["step"] for h in history] == list(range(1, 41))
    first, last = window_means(history, "loss")
    assert last < 0.8 * first, f"{method}: loss went from {first:.3f} to {last:.3f}"
    first_task, last_task = window_means(history, "task_loss")
    assert last_task < 0.8 * first_task

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert {"method", "tasks", "mean_accuracy", "routing"} <= set(saved)
    assert saved["method"] == method and saved["split"] == "test"  # the split the scores are of
    assert list(metrics["tasks"]) == list(saved["tasks"]) == toys.TASK_NAMES  # the config's order, not sorted
    for scores in saved["tasks"].values():
        assert set(scores) == {"accuracy", "macro_f1", "n"}
        assert scores["n"] == 24 and 0.0 <= scores["macro_f1"] <= 1.0
    accuracies = [s["accuracy"] for s in saved["tasks"].values()]
    assert saved["mean_accuracy"] == pytest.approx(np.mean(accuracies))
    assert saved["mean_accuracy"] > CHANCE + 0.1
    assert set(saved["routing"]) == ROUTING_KEYS[method]
    for summary in [saved["routing"].get("model"), saved["routing"].get("aggregate")]:
        if summary is not None:
            assert summary["task_names"] == toys.TASK_NAMES and 0.0 <= summary["purity"] <= 1.0

    logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == list(range(1, 41))
    report = (tmp_path / "report.md").read_text()
    assert method in report and "sentiment" in report
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    assert (tmp_path / "adapter" / "adapters.safetensors").is_file()
    assert RunConfig.from_yaml(tmp_path / "config.yaml") == run


def test_twd_separates_the_tasks_in_the_router(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    """MoLA's TwD pulls same-task router logits together: purity rises over the same run without it.

    Over seeds 0-9 with these settings TwD won every time (purity 0.65-1.0 against 0.43-0.58).
    """
    common = dict(method="mola-router", steps=80, log_every=1, lr=1e-2, head_lr=1e-1, router_lr=1e-2)
    results = {}
    for weight in (1.0, 0.0):
        run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, twd_weight=weight, **common))
        results[weight] = run_training(run, tmp_path / f"twd-{weight}")

    first, last = window_means(results[1.0]["history"], "twd_loss")
    assert last < first - 0.1, f"TwD loss went from {first:.3f} to {last:.3f}"
    assert all("twd_loss" not in h for h in results[0.0]["history"])
    with_twd = results[1.0]["routing"]["model"]["purity"]
    without = results[0.0]["routing"]["model"]["purity"]
    assert with_twd > without, f"purity with TwD {with_twd:.3f}, without {without:.3f}"


def test_tasks_without_a_test_or_validation_split_are_refused_before_training(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """A run is scored when it ends: with nothing to score it on, it is refused before any step, not after."""
    from loramix.errors import DataError

    specs = [{"name": "sentiment", "train": str(tasks_dir / "sentiment" / "train.jsonl")}]
    run = RunConfig.from_dict({**toys.settings(model_dir, tasks_dir), "tasks_dir": None, "tasks": specs})
    with pytest.raises(DataError, match="no task has a 'test' or 'validation' split.*sentiment"):
        run_training(run, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize(("key", "value"), [("targets", ["nothing"]), ("router_input", "encoder.nope")])
def test_adapter_settings_that_fit_no_module_name_the_key_to_set(
    key: str, value: object, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    from loramix.errors import ConfigError

    settings = toys.settings(model_dir, tasks_dir, method="mola-router" if key == "router_input" else "lora")
    with pytest.raises(ConfigError, match=rf"do not fit model .*\(set `{key}` in the run config\)"):
        run_training(RunConfig.from_dict({**settings, key: value, "steps": 1}), tmp_path)
