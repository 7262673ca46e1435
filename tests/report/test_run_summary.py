"""What `loramix inspect` prints of a run's adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from loramix.config import AdapterConfig
from loramix.report.run_summary import adapter_lines, score_lines


def config_line(**config: object) -> str:
    record = {
        "config": AdapterConfig(**config).model_dump(),
        "metadata": {"tasks": [{"name": "a", "labels": ["x", "y"]}]},
        "layers": ["encoder.layer.0.output.dense"],
    }
    lines = adapter_lines(Path("run"), record, {"w": torch.zeros(2, 3)})
    return next(line for line in lines if line.startswith("adapter config: "))


def test_the_config_line_leaves_out_what_the_run_never_reads():
    """An adapter's scale is `adapter_scale`, not `alpha`; LoRA's is `alpha / rank`, not `adapter_scale`; a
    `target_regex` chooses the layers instead of `targets`."""
    adapter = config_line(experts="adapter", rank=64, num_experts=4)
    assert "rank=64" in adapter and "adapter_scale=0.1" in adapter
    assert "alpha=" not in adapter and "rslora" not in adapter and "share=" not in adapter
    lora = config_line(rank=8, alpha=16.0)
    assert "alpha=16" in lora and "share=none" in lora
    assert "adapter_scale" not in lora
    assert "targets=all-linear" in lora
    assert "targets=" not in config_line(target_regex=r".*\.output\.dense")  # the regex chooses instead


def test_the_scores_name_the_best_evaluation_during_training_and_whether_it_was_kept():
    best = {"step": 300, "mean_accuracy": 0.8125, "split": "validation", "kept": True}
    lines = score_lines({"mean_accuracy": 0.8125, "best_eval": best})
    assert lines[1] == (
        "best evaluation during training: step 300, mean accuracy 0.8125 on validation; the weights the run ended "
        "with (keep_best)"
    )
    assert score_lines({"mean_accuracy": 0.8, "best_eval": {**best, "kept": False}})[1].endswith("; not kept")
    stopped = score_lines({"mean_accuracy": 0.8, "best_eval": {**best, "stopped_at": 500}})[1]
    assert stopped.endswith("(keep_best); training stopped early at step 500")
    assert len(score_lines({"mean_accuracy": 0.8})) == 1
