"""Quantized backbones (`load_backbone(..., quantize=...)`, the run config's `quantize`): bitsandbytes through
transformers' BitsAndBytesConfig, here on its CPU backend. A tiny causal LM loaded in 8 and 4 bits trains its experts;
a whole run trains on a quantized, checkpointed base; the refusals name the field and what to do."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch

import loramix
from loramix.errors import ConfigError, InjectionError
from loramix.experts.quantized import QuantizedLinearExperts, quantized_kind
from loramix.inject import adapter_state, get_info
from loramix.models import load_backbone
from loramix.quantize import quantization_config
from loramix.tiny_lm import char_tokenizer, write_tiny_lm
from loramix.train.config import RunConfig
from tests.train import toys

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "red green blue", "one two three four"]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), "llama", hidden_size=64, num_layers=2)


def test_quantize_must_be_a_known_width() -> None:
    with pytest.raises(ConfigError, match="quantize must be one of 8bit, 4bit"):
        quantization_config("3bit")
    assert quantization_config(None) is None


def test_quantize_without_bitsandbytes_names_the_field_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.version

    def version(name: str) -> str:
        if name == "bitsandbytes":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(ConfigError, match=r"quantize: '8bit' needs bitsandbytes.*loramix\[quantize\]"):
        quantization_config("8bit")


def test_an_old_bitsandbytes_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadata, "version", lambda name: "0.42.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"without CUDA needs bitsandbytes >= 0\.48.*found 0\.42\.0"):
        quantization_config("4bit")


def test_the_run_config_refuses_a_quantized_base_with_train_backbone(
    model_dir: Path, tasks_dir: Path
) -> None:
    settings = toys.settings(model_dir, tasks_dir, quantize="8bit", train_backbone=True)
    with pytest.raises(ConfigError, match="quantize cannot go with train_backbone"):
        RunConfig.from_dict(settings)
    with pytest.raises(ConfigError, match="quantize"):
        RunConfig.from_dict({**settings, "train_backbone": False, "quantize": "16bit"})
    run = RunConfig.from_dict({**settings, "train_backbone": False, "gradient_checkpointing": True})
    assert (run.quantize, run.gradient_checkpointing) == ("8bit", True)


def lm_batch(tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_a_quantized_tiny_causal_lm_trains_its_experts(bits: str, tiny_llama_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    model, tokenizer = load_backbone(str(tiny_llama_dir), causal_lm=True, quantize=bits)
    kinds = {quantized_kind(m) for m in model.modules()} - {None}
    assert kinds == {f"bitsandbytes {bits[0]}-bit"}
    loramix.inject(model, {"num_experts": 2, "num_tasks": 2, "router": "task", "rank": 4, "alpha": 8})
    layers = get_info(model).layers
    assert layers and all(isinstance(layer, QuantizedLinearExperts) for layer in layers)
    assert all(p.dtype == torch.float32 for p in adapter_state(model).values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_state(model).values()}

    device = trainable[0].device  # bitsandbytes puts a quantized model on the GPU where there is one
    batch = {k: v.to(device) for k, v in lm_batch(char_tokenizer()).items()}
    task_ids = torch.tensor([0, 1, 0, 1], device=device)
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    losses = train_steps(model, batch, task_ids, optimizer)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in adapter_state(model).values())
    with pytest.raises(InjectionError, match="quantized"):
        loramix.merge_and_unload(model, task=0)


def test_a_run_builds_a_quantized_checkpointed_backbone_and_trains_it(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    from loramix.data import MultiTaskData
    from loramix.methods import run_training
    from loramix.train.run import build_model, task_specs

    settings = toys.settings(
        model_dir, tasks_dir, method="mola-grad", steps=16, log_every=1, lr=1e-2, head_lr=1e-1
    )
    run = RunConfig.from_dict({**settings, "quantize": "8bit", "gradient_checkpointing": True})
    adapters = loramix.AdapterConfig(num_experts=3, num_tasks=3, router="task", rank=4)
    model, _ = build_model(run, MultiTaskData(task_specs(run)), adapters)
    layers = get_info(model.backbone).layers
    assert layers and all(isinstance(layer, QuantizedLinearExperts) for layer in layers)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.backbone.modules())

    metrics = run_training(run, tmp_path)
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses
    assert (tmp_path / "adapter" / "adapters.safetensors").is_file()


def train_steps(model, batch, task_ids, optimizer, steps: int = 8) -> list[float]:
    """`steps` routed training steps on one batch; the losses."""
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with loramix.routing(model, task_ids=task_ids, attention_mask=batch["attention_mask"]):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
