"""`benchmarks/overhead.py`: every case runs, in inference and in training, the unfused cases run the base and the
mixture apart, and each entry is timed against PEFT in the same rounds."""

from __future__ import annotations

import json
from pathlib import Path

from loramix.experts import ops
from tests.scripts import benchmark_script


def test_the_overhead_benchmark_times_every_case_against_peft(tmp_path: Path, monkeypatch):
    overhead = benchmark_script("overhead")
    fused = []
    linear = ops.linear
    monkeypatch.setattr(ops, "linear", lambda *a, **kw: fused.append(1) or linear(*a, **kw))
    unfused = overhead.unfused(lambda: overhead.LinearExperts._fusable(None, None))
    assert unfused() is False  # the switch is on inside the call and off after it
    out = tmp_path / "overhead.json"
    assert overhead.main(["--threads", "1", "--rounds", "1", "--hidden", "16", "--out", str(out)]) == 0
    entries = json.loads(out.read_text())["entries"]
    cases = ["peft", "lora", "mola-grad-one-task", "mola-grad-mixed", "mola-router", "lora-unfused"]
    for mode, baseline in (("inference", "plain"), ("training step", "frozen")):
        mine = {e["case"]: e for e in entries if e["mode"] == mode}
        assert set(cases) | {baseline} <= set(mine)
        assert mine["peft"]["vs_peft"]["ratio_median"] == 1.0
        assert mine[baseline][f"us_per_layer_over_{baseline}"] == 0.0
    assert fused  # the fused cases went through the fused linear
