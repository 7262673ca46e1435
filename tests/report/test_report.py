"""The Markdown report and the terminal table, on results built from synthetic gates."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from loramix import report as report_module
from loramix.report import print_table, running_mean, write_report
from loramix.report.routing_stats import per_layer_summary, routing_summary

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


def test_the_tables_are_the_scores_the_tasks_have(tmp_path, report):
    generated = {"reverse": {"accuracy": 0.5, "exact_match": 0.5, "f1": 0.75, "perplexity": 3.0, "n": 8}}
    text = write_report(tmp_path, [{"method": "mola-grad", "tasks": generated}]).read_text(encoding="utf-8")
    assert "## Exact match per task (generation)" in text and "## Token F1 per task (generation)" in text
    assert "Macro-F1" not in text  # a generation task has none: no table of dashes
    classified = report.read_text(encoding="utf-8")
    assert "## Macro-F1 per task" in classified and "Exact match" not in classified


def test_print_table_has_every_method_and_the_mean(results):
    table = print_table(results)
    lines = table.splitlines()
    for result in results:
        assert result["method"] in lines[0]
    assert lines[-1].split() == ["mean", "0.710", "0.800", "0.900", "(1/3", "tasks)", "-", "-"]
    assert [line.split()[0] for line in lines[2:-2]] == TASKS
    assert len({len(line.rstrip()) for line in lines}) == 1  # fixed-width columns


# ------------------------------------------------------------------------------- routers that route nothing


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def routes_nothing(summary: dict) -> list[str]:
    return [w for w in summary["warnings"] if w.startswith("routes nothing")]


def test_a_router_with_constant_logits_raises_the_alarm(tmp_path):
    """Logits that do not depend on the input: every sample gets the same, uneven gate (5 experts at 0.158, 3 at
    0.071: entropy 0.970 of the maximum, below the near-uniform line; no collapse, since the top is a 5-way tie)."""
    task_ids = np.random.default_rng(0).integers(0, len(TASKS), size=300)
    logits = np.tile([0.8] * 5 + [0.0] * 3, (300, 1))
    summary = routing_summary(softmax(logits), task_ids, TASKS)
    assert routes_nothing(summary) and "every input gets nearly the same gate" in routes_nothing(summary)[0]
    assert any(
        "3 of 8 experts are never the top choice of any sample: 5, 6, 7" in w for w in summary["warnings"]
    )
    assert summary["entropy"] == pytest.approx(0.970, abs=1e-3) and summary["spread"] == pytest.approx(0.0)
    text = write_report(tmp_path, [{"method": "flat", "routing": {"model": summary}}]).read_text(
        encoding="utf-8"
    )
    assert "> ⚠️ **This router routes nothing: every input gets nearly the same gate" in text
    assert "No routing warnings" not in text


def test_a_near_uniform_router_that_never_chooses_some_experts_raises_the_alarm(tmp_path):
    """What a report once passed without a word: gates that vary a little with the input but not with the task
    (entropy 0.978 of the maximum, NMI 0.002), three of eight experts never the top choice."""
    rng = np.random.default_rng(0)
    task_ids = rng.integers(0, len(TASKS), size=600)
    logits = np.concatenate([0.4 + 0.3 * rng.standard_normal((600, 5)), np.zeros((600, 3))], axis=1)
    summary = routing_summary(softmax(logits), task_ids, TASKS)
    assert routes_nothing(summary), summary["warnings"]
    assert "near-uniform gates (normalised entropy 0.978 >= 0.95)" in routes_nothing(summary)[0]
    assert any("3 of 8 experts are never the top choice" in w for w in summary["warnings"])
    assert 0.97 < summary["entropy"] < 0.98 and summary["nmi"] < 0.01 and summary["spread"] > 0.05
    layers = per_layer_summary({"a": softmax(logits), "b": np.eye(8)[task_ids]}, task_ids, TASKS)
    text = write_report(tmp_path, [{"method": "flat", "routing": layers}]).read_text(encoding="utf-8")
    assert "> ⚠️ **In 1 of 2 layers the router routes nothing** (a)" in text


def test_a_router_that_follows_the_tasks_raises_no_alarm():
    rng = np.random.default_rng(0)
    task_ids = rng.integers(0, len(TASKS), size=300)
    gates = 0.6 * np.eye(3)[task_ids] + 0.4 * rng.dirichlet(np.ones(3), size=300)
    summary = routing_summary(gates, task_ids, TASKS)
    assert summary["warnings"] == [] and summary["spread"] > 0.3  # spread 0: every input gets one gate


# ------------------------------------------------------------------------------------------------- curves


def test_running_mean_is_the_trailing_mean_of_the_last_window():
    assert running_mean([4.0, 2.0, 6.0, 0.0], window=2) == [4.0, 3.0, 4.0, 3.0]
    assert running_mean([1.0, 2.0, 3.0], window=10) == [1.0, 1.5, 2.0]


def test_loss_curves_show_the_running_mean_over_faint_batches_and_label_the_total(tmp_path, monkeypatch):
    figures = {}
    real = report_module.plot_curves

    def keep(path, panels, title):
        figures[path.name] = real(path, panels, title)
        return figures[path.name]

    monkeypatch.setattr(report_module, "plot_curves", keep)
    rng = np.random.default_rng(0)
    noisy = [
        {"step": s, "loss": 1 / s + rng.random(), "task_loss": 1 / s + rng.random()} for s in range(1, 41)
    ]
    with_twd = [{**entry, "twd_loss": 0.5} for entry in noisy]
    text = write_report(
        tmp_path, [{"method": "lora", "history": noisy}, {"method": "mola-router", "history": with_twd}]
    ).read_text()

    task_panel, total_panel = figures["loss.png"].axes[:2]
    assert task_panel.get_title() == "task loss"
    assert total_panel.get_title() == "total loss: task + weighted twd"
    assert [line.get_label() for line in total_panel.lines if not line.get_label().startswith("_")] == [
        "mola-router"
    ]
    dots, mean = task_panel.lines[:2]  # lora: faint raw points, then the running mean
    assert dots.get_alpha() < 0.5 and dots.get_linestyle() == "None"
    np.testing.assert_allclose(mean.get_ydata(), running_mean([e["task_loss"] for e in noisy]))
    assert "running mean of the last 10 logged batches" in text
    assert "adds weighted auxiliary terms to the task loss: mola-router: twd" in text
    assert [a.get_title() for a in figures["aux_losses.png"].axes if a.get_visible() and a.lines] == [
        "twd (unweighted)"
    ]


def test_no_auxiliary_panel_for_methods_without_auxiliary_losses(tmp_path):
    history = [{"step": s, "loss": 1 / s, "task_loss": 1 / s} for s in range(1, 11)]
    text = write_report(tmp_path, [{"method": "lora", "history": history}]).read_text()
    assert "plots/loss.png" in text and "auxiliary" not in text and "total loss" not in text
    assert not (tmp_path / "plots" / "aux_losses.png").exists()


def two_tasks(a: float, b: float) -> dict:
    return {"sst2": {"accuracy": a, "macro_f1": a}, "trec": {"accuracy": b, "macro_f1": b}}


def test_evaluations_during_training_are_drawn_as_they_were_scored(tmp_path, monkeypatch):
    """Each evaluation a point on a line (no running mean: each is the score of the same inputs), one panel for
    the mean, one for the routing purity where a router routes, one per task."""
    figures = {}
    real = report_module.plot_curves

    def keep(path, panels, title, **options):
        figures[path.name] = real(path, panels, title, **options)
        return figures[path.name]

    monkeypatch.setattr(report_module, "plot_curves", keep)
    scored = [
        {"step": 5, "loss": 1.0},
        {
            "step": 10,
            "loss": 0.8,
            "eval": {
                "split": "validation",
                "mean_accuracy": 0.6,
                "purity": 0.5,
                "tasks": two_tasks(0.7, 0.5),
            },
        },
        {
            "step": 20,
            "loss": 0.5,
            "eval": {
                "split": "validation",
                "mean_accuracy": 0.8,
                "purity": 0.9,
                "tasks": two_tasks(0.9, 0.7),
            },
        },
    ]
    text = write_report(tmp_path, [{"method": "mola-router", "history": scored}]).read_text()
    assert "![evaluation during training](plots/evaluation.png)" in text
    assert "on the validation split (`eval_every`)" in text
    panels = [axes for axes in figures["evaluation.png"].axes if axes.lines]
    assert [axes.get_title() for axes in panels] == ["mean accuracy", "routing purity", "sst2", "trec"]
    for axes, values in zip(panels, ([0.6, 0.8], [0.5, 0.9], [0.7, 0.9], [0.5, 0.7])):
        (line,) = axes.lines
        assert list(line.get_xdata()) == [10, 20] and list(line.get_ydata()) == values

    plain = write_report(tmp_path / "plain", [{"method": "lora", "history": scored[:1]}]).read_text()
    assert "evaluation" not in plain and not (tmp_path / "plain" / "plots" / "evaluation.png").exists()


def test_a_generation_task_s_row_names_what_its_accuracy_counts():
    results = [
        {"method": "lora", "tasks": {"add": {"accuracy": 0.5, "scorer": "number"}, "sst2": {"accuracy": 0.8}}}
    ]
    rows = [line.split()[0:2] for line in print_table(results).splitlines()]
    assert ["add", "(number)"] in rows and ["sst2", "0.800"] in rows
