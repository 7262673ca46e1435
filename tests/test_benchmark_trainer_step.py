"""`benchmarks/trainer_step.py`: every case runs a `Trainer` step, PEFT's under the plain `Trainer` and loramix's
under `LoramixTrainer` with its batch's task ids, each timed against PEFT in the same rounds."""

from __future__ import annotations

import json
from pathlib import Path

import loramix
from tests.scripts import benchmark_script


def test_the_trainer_step_benchmark_times_every_case_against_peft(tmp_path: Path, monkeypatch):
    trainer_step = benchmark_script("trainer_step")
    steps: dict[str, int] = {}
    routed = loramix.LoramixTrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        key = loramix.get_info(self.injected).config.router
        steps[key] = steps.get(key, 0) + ("task_ids" in inputs)
        return routed(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(loramix.LoramixTrainer, "compute_loss", counting)
    out = tmp_path / "trainer-step.json"
    assert trainer_step.main(["--threads", "1", "--rounds", "1", "--hidden", "16", "--out", str(out)]) == 0
    entries = {e["case"]: e for e in json.loads(out.read_text())["entries"]}
    assert set(entries) == {"peft", "lora", "mola-grad-mixed", "mola-router"}
    assert entries["peft"]["vs_peft"]["ratio_median"] == 1.0
    assert set(steps) == {"none", "task", "sample"} and all(steps.values())  # each loramix case took its ids
