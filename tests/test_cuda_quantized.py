"""bitsandbytes' CUDA kernels under the experts: 8-bit (LLM.int8, fp16 activations) and 4-bit (NF4, bf16 compute)
bases on the GPU, the mixture in float32 beside them, and a quantized tiny causal LM loaded through `load_backbone`
that trains with activation checkpointing. Skipped without a GPU or bitsandbytes; the CPU backend's tests are
tests/experts/test_quantized.py and tests/test_quantize.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import loramix
from loramix.experts.quantized import QuantizedLinearExperts
from loramix.inject import adapter_state, get_info
from loramix.models import load_backbone
from loramix.tiny_lm import char_tokenizer, write_tiny_lm
from tests.test_quantize import train_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'loramix[quantize]')")
CUDA = torch.device("cuda")
ACTIVATIONS = {"8bit": torch.float16, "4bit": torch.bfloat16}


def quantized_on_cuda(linear: nn.Linear, bits: str) -> nn.Module:
    if bits == "8bit":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(
            linear.weight.data.half(), requires_grad=False, has_fp16_weights=False
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, compute_dtype=torch.bfloat16, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(linear.bias.data.to(ACTIVATIONS[bits]), requires_grad=False)
    return layer.to(CUDA)  # quantizes


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_cuda_quantized_base_plus_float32_mixture(bits: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(quantized_on_cuda(nn.Linear(64, 48), bits))
    loramix.inject(model, {"num_experts": 3, "num_tasks": 3, "router": "task", "rank": 8})
    (layer,) = get_info(model).layers
    assert isinstance(layer, QuantizedLinearExperts)
    assert layer.experts.A.device.type == "cuda" and layer.experts.A.dtype == torch.float32
    with torch.no_grad():
        layer.experts.B.normal_(std=0.3)
    x = torch.randn(4, 5, 64, device=CUDA, dtype=ACTIVATIONS[bits])
    task_ids = torch.tensor([0, 1, 2, 1], device=CUDA)
    model.train()
    with loramix.routing(model, task_ids=task_ids):
        out = model(x)
    assert out.dtype == ACTIVATIONS[bits]
    with torch.no_grad():
        A, B = layer.experts.A[task_ids], layer.experts.B[task_ids]  # (n, r, i), (n, o, r)
        mixture = layer.scaling * torch.einsum("nor,nri,nti->nto", B, A, x.float())
        want = layer.base_layer(x) + mixture.to(out.dtype)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    out.float().pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == set(adapter_state(model))
    assert all(p.grad.dtype == torch.float32 for p in adapter_state(model).values())


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_cuda_quantized_tiny_causal_lm_trains_with_checkpointing(bits: str, tmp_path: Path) -> None:
    folder = write_tiny_lm(tmp_path / "tiny-llama", "llama", hidden_size=64, num_layers=2)
    model, _ = load_backbone(str(folder), causal_lm=True, quantize=bits, gradient_checkpointing=True)
    loramix.inject(model, {"num_experts": 2, "num_tasks": 2, "router": "task", "rank": 4, "alpha": 8})
    assert all(isinstance(layer, QuantizedLinearExperts) for layer in get_info(model).layers)
    assert {p.device.type for p in adapter_state(model).values()} == {"cuda"}
    tokenizer = char_tokenizer()
    batch = tokenizer(
        ["the cat sat on the mat", "red green blue", "one two three", "a b c d e"], padding=True
    )
    batch = {k: torch.tensor(v, device=CUDA) for k, v in batch.items()}
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    task_ids = torch.tensor([0, 1, 0, 1], device=CUDA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = train_steps(model, batch, task_ids, optimizer)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in adapter_state(model).values())
