"""The Markdown report and the terminal table, on results built from synthetic gates."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from loramix.report import print_table, write_report
from loramix.train.routing_stats import per_layer_summary, routing_summary

TASKS = ["sst2", "rte", "mnli"]
PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def history(scale: float, aux: bool) -> list[dict]:
    entries = []
    for step in range(10, 110, 10):
        entry = {"step": step, "loss": scale / step, "lr": 1e-4}
        if aux:
            entry |= {"task_loss": 0.9 * scale / step, "twd_loss": 0.01 * step}
        entries.append(entry)
    return entries


@pytest.fixture(scope="module")
def results() -> list[dict]:
    rng = np.random.default_rng(0)
    task_ids = rng.integers(0, len(TASKS), size=90)
    specialised = 0.9 * np.eye(4)[task_ids] + 0.1 * rng.dirichlet(np.ones(4), size=90)  # (n, e)
    collapsed = np.tile([0.7, 0.1, 0.1, 0.1], (90, 1))
    layers = {f"layers.{index}.attn": rng.dirichlet(np.ones(4), size=90) for index in range(8)}
    layers["layers.7.attn"] = 0.95 * np.eye(4)[task_ids] + 0.05 * rng.dirichlet(np.ones(4), size=90)
    per_layer = per_layer_summary(layers, task_ids, TASKS)
    return [
        {
            "method": "lora",
            "tasks": {
                task: {"accuracy": 0.70 + 0.01 * i, "macro_f1": 0.6, "n": 30} for i, task in enumerate(TASKS)
            },
            "mean_accuracy": 0.71,
            "routing": {},
            "history": history(10.0, aux=False),
        },
        {
            "method": "mola-router",
            "tasks": {task: {"accuracy": 0.80, "macro_f1": 0.75, "n": 30} for task in TASKS},
            "routing": {"model": routing_summary(specialised, task_ids, TASKS)},
            "history": history(8.0, aux=True),
        },
        {
            "method": "mole/token",  # a character that cannot go in a file name
            "tasks": {"sst2": {"accuracy": 0.9}},  # only one task, no macro-F1
            "routing": per_layer,
            "history": [],
        },
        {
            "method": "collapsed",
            "routing": {"model": routing_summary(collapsed, task_ids, TASKS, probe=False)},
        },
        {  # a model-level router and per-layer routers at once, as evaluation records them
            "method": "both",
            "routing": {
                "model": routing_summary(specialised, task_ids, TASKS, probe=False),
                **per_layer_summary({"a": specialised, "b": collapsed}, task_ids, TASKS),
            },
        },
    ]


@pytest.fixture(scope="module")
def report(results, tmp_path_factory) -> Path:
    return write_report(tmp_path_factory.mktemp("run"), results)


def test_report_names_every_method_and_task(report, results):
    text = report.read_text(encoding="utf-8")
    assert report.name == "report.md"
    for result in results:
        assert result["method"] in text
    for task in TASKS:
        assert f"| {task} |" in text
    assert "## Accuracy per task" in text and "## Macro-F1 per task" in text


def test_best_value_per_row_is_bold_and_mean_row_is_last(report):
    lines = report.read_text(encoding="utf-8").split("## Macro-F1")[0].splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| task | n | lora | mola-router | mole/token | collapsed | both |"
    assert table[1] == "| sst2 | 30 | 0.700 | 0.800 | **0.900** | – | – |"
    assert table[-1].startswith("| **mean** |")
    assert table[-1] == "| **mean** |  | 0.710 | **0.800** | 0.900 (1/3 tasks) | – | – |"  # partial: unranked


def test_every_linked_plot_is_a_png(report):
    text = report.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    names = {Path(link).name for link in links}
    assert {
        "mola-router-model-gates.png",
        "mola-router-model-load.png",
        "mole_token-layers-gates.png",
        "mole_token-layers-load.png",
        "both-model-gates.png",
        "both-layers-gates.png",
    } <= names
    assert {"loss.png", "aux_losses.png"} <= names
    for link in links:
        assert link.startswith("plots/")
        path = report.parent / link
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_HEADER), link


def test_routing_section_shows_metrics_and_warnings(report):
    text = report.read_text(encoding="utf-8")
    section = text.split("### mola-router")[1].split("###")[0]
    assert "routing purity: 1.000" in section and "NMI" in section and "probe accuracy" in section
    assert "entropy" in section
    collapsed = text.split("### collapsed")[1].split("##")[0]
    assert "collapse: expert 0 takes 100.0% of samples" in collapsed
    per_layer = text.split("### mole/token")[1].split("###")[0]
    assert "8 layers" in per_layer and "layers.7.attn: expert 3 is never used" in per_layer
    assert "No routing statistics" in text.split("### lora")[1].split("###")[0]
    both = text.split("### both")[1].split("##")[0]
    assert "Model-level router" in both and "Per-layer routers, 2 layers" in both
    assert "b: collapse: expert 0 takes 100.0% of samples" in both


def test_report_survives_sparse_results(tmp_path):
    path = write_report(tmp_path / "sparse", [{"method": "bare"}, {"tasks": {"sst2": {"accuracy": 0.5}}}])
    text = path.read_text(encoding="utf-8")
    assert "bare" in text and "sst2" in text and "No training history recorded." in text
    assert write_report(tmp_path / "empty", []).read_text(encoding="utf-8").startswith("# loramix report")


def test_print_table_has_every_method_and_the_mean(results):
    table = print_table(results)
    lines = table.splitlines()
    for result in results:
        assert result["method"] in lines[0]
    assert lines[-1].split() == ["mean", "0.710", "0.800", "0.900", "(1/3", "tasks)", "-", "-"]
    assert [line.split()[0] for line in lines[2:-2]] == TASKS
    assert len({len(line.rstrip()) for line in lines}) == 1  # fixed-width columns
