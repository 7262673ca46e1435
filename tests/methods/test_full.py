"""Full fine-tuning: the backbone and heads learn, the rank-1 LoRA the training parts need stays exactly zero."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel

from loramix.inject import get_info
from loramix.methods import get_method, run_training
from loramix.train.config import RunConfig
from loramix.train.run import load_trained
from tests.train import toys


def test_the_adapter_is_one_rank_one_lora_and_the_backbone_trains():
    run = RunConfig(method="full-finetune", tasks_dir="data", tasks=["a", "b"])
    adapters = get_method("full-finetune").adapter_config(run, 2)
    assert (adapters.num_experts, adapters.rank, adapters.router, adapters.train_backbone) == (
        1,
        1,
        "none",
        True,
    )


def test_full_finetune_trains_the_backbone_and_leaves_the_adapter_at_zero(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    run = RunConfig.from_dict(
        toys.settings(model_dir, tasks_dir, method="full-finetune", steps=20, backbone_lr=1e-3, head_lr=1e-1)
    )
    metrics = run_training(run, tmp_path)
    assert metrics["mean_accuracy"] > 0.0
    _, model, _, _ = load_trained(tmp_path)
    layers = get_info(model.backbone).layers
    assert layers and all(layer.experts.frozen_experts == [0] for layer in layers)
    assert all(torch.count_nonzero(layer.experts.effective()["B"]) == 0 for layer in layers)
    fresh = AutoModel.from_pretrained(model_dir)
    trained = dict(model.backbone.named_parameters())
    moved = [n for n, p in fresh.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert moved, "no backbone weight changed"
