"""Experts around bitsandbytes' quantized linears, on its CPU backend: the output is the quantized base's plus the
mixture, computed in the experts' float dtype; gradients reach the experts only; merging is refused while PEFT export
and save/load work. The CUDA kernels have their own test (tests/test_cuda_quantized.py).

Legend: n samples, t tokens, i / o in / out features, e experts, r rank.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import loramix
from loramix.errors import InjectionError
from loramix.experts.quantized import QuantizedLinearExperts, quantized_kind
from loramix.inject import adapter_state, get_info

bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'loramix[quantize]')")

IN, OUT, HIDDEN = 16, 12, 20
BITS = ["8bit", "4bit"]


def quantized(linear: nn.Linear, bits: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes copy of `linear` (weights quantized when it is moved to its device, here the CPU)."""
    bias = linear.bias is not None
    if bits == "8bit":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False
        )
        layer.weight = bnb.nn.Int8Params(
            linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.clone().to(compute_dtype))
    return layer.to("cpu")


def quantized_mlp(bits: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        quantized(nn.Linear(IN, HIDDEN), bits), nn.GELU(), quantized(nn.Linear(HIDDEN, OUT), bits)
    )


def inputs(n: int = 4, t: int = 3, seed: int = 1) -> Tensor:
    return torch.randn(n, t, IN, generator=torch.Generator().manual_seed(seed))


def config(**overrides) -> loramix.AdapterConfig:
    return loramix.AdapterConfig(
        **{
            "num_experts": 3,
            "num_tasks": 3,
            "router": "task",
            "rank": 4,
            "targets": "all-linear",
            **overrides,
        }
    )


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for layer in get_info(model).layers:
        layer.experts.B.copy_(torch.randn(layer.experts.B.shape, generator=generator) * 0.3)


def routed(model: nn.Module, x: Tensor, task_ids: Tensor) -> Tensor:
    with loramix.routing(model, task_ids=task_ids):
        return model(x)


@pytest.mark.parametrize("bits", BITS)
def test_quantized_linears_are_wrapped_with_float_experts(bits: str) -> None:
    model = quantized_mlp(bits)
    report = loramix.inject(model, config())
    assert [(name, kind, i, o) for name, kind, i, o in report.matched] == [
        ("0", "QLinear", IN, HIDDEN),
        ("2", "QLinear", HIDDEN, OUT),
    ]
    for layer in get_info(model).layers:
        assert isinstance(layer, QuantizedLinearExperts)
        assert quantized_kind(layer.base_layer) == f"bitsandbytes {bits[0]}-bit"
        assert not layer.base_layer.weight.is_floating_point()  # still the quantized module
        assert {p.dtype for p in layer.experts.parameters()} == {torch.float32}


@pytest.mark.parametrize("bits", BITS)
def test_output_is_the_quantized_base_plus_each_samples_expert(bits: str) -> None:
    model = quantized_mlp(bits)
    x, task_ids = inputs(), torch.tensor([0, 1, 2, 1])
    loramix.inject(model, config())
    randomize(model)
    first, second = get_info(model).layers
    with torch.no_grad():
        got = routed(model, x, task_ids)

        def by_hand(layer: QuantizedLinearExperts, h: Tensor) -> Tensor:
            A, B = layer.experts.A[task_ids], layer.experts.B[task_ids]  # (n, r, i), (n, o, r)
            mixture = layer.scaling * torch.einsum("nor,nri,nti->nto", B, A, h)  # (n, t, o)
            return layer.base_layer(h) + mixture

        want = by_hand(second, nn.functional.gelu(by_hand(first, x)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_zero_B_keeps_the_quantized_base_output(bits: str) -> None:
    model = quantized_mlp(bits)
    x = inputs()
    with torch.no_grad():
        want = model(x)
        loramix.inject(model, config())
        got = routed(model, x, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(got, want)


def test_a_bf16_base_gets_the_mixture_computed_in_float32_and_cast_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(quantized(nn.Linear(IN, OUT), "4bit", compute_dtype=torch.bfloat16))
    loramix.inject(model, config())
    randomize(model)
    (layer,) = get_info(model).layers
    x = inputs().to(torch.bfloat16)
    task_ids = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        got = routed(model, x, task_ids)
        A, B = layer.experts.A[task_ids], layer.experts.B[task_ids]
        mixture = layer.scaling * torch.einsum("nor,nri,nti->nto", B, A, x.float())  # in float32
        want = layer.base_layer(x) + mixture.to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert layer.experts.A.dtype == torch.float32
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", BITS)
def test_gradients_reach_the_experts_only(bits: str) -> None:
    model = quantized_mlp(bits)
    loramix.inject(model, config())
    randomize(model)
    model.train()
    routed(model, inputs(), torch.tensor([0, 1, 2, 0])).pow(2).mean().backward()
    experts = {name for name in adapter_state(model)}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == experts
    for name, p in model.named_parameters():
        if name in experts:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            assert p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad, name


@pytest.mark.parametrize("bits", BITS)
def test_training_keeps_the_experts_float_and_the_base_untouched(bits: str) -> None:
    model = quantized_mlp(bits)
    loramix.inject(model, config())
    base = {k: v.clone() for k, v in model.state_dict().items() if "experts" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, task_ids = inputs(), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        optimizer.zero_grad()
        routed(model.train(), x, task_ids).pow(2).mean().backward()
        optimizer.step()
    assert all(p.dtype == torch.float32 for p in adapter_state(model).values())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


@pytest.mark.parametrize("bits", BITS)
def test_save_then_load_gives_identical_outputs(bits: str, tmp_path) -> None:
    model = quantized_mlp(bits)
    loramix.inject(model, config())
    randomize(model)
    loramix.save(model, tmp_path / "adapter")
    fresh = quantized_mlp(bits)  # the same base, quantized again
    loramix.load(fresh, tmp_path / "adapter")
    x, task_ids = inputs(), torch.tensor([2, 1, 0, 2])
    with torch.no_grad():
        assert torch.equal(routed(fresh, x, task_ids), routed(model, x, task_ids))
    assert all(isinstance(layer, QuantizedLinearExperts) for layer in get_info(fresh).layers)


@pytest.mark.parametrize("bits", BITS)
def test_merging_into_quantized_weights_is_refused(bits: str) -> None:
    model = quantized_mlp(bits)
    loramix.inject(model, config())
    with pytest.raises(InjectionError, match="quantized.*export"):
        loramix.merge_and_unload(model, task=1)
    with pytest.raises(InjectionError, match="cannot be merged into quantized weights"):
        get_info(model).layers[0].merge(torch.tensor([1.0, 0.0, 0.0]))


def test_peft_export_of_a_quantized_base_holds_float_factors(tmp_path) -> None:
    from safetensors.torch import load_file

    from loramix.io.export import export_peft

    model = quantized_mlp("8bit")
    loramix.inject(model, config())
    randomize(model)
    directory = export_peft(model, tmp_path / "peft", task=1)
    tensors = load_file(directory / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    layer = get_info(model).layers[1]
    B = tensors["base_model.model.2.lora_B.weight"]
    A = tensors["base_model.model.2.lora_A.weight"]
    torch.testing.assert_close(
        B @ A, layer.experts.delta_weight(torch.tensor([0.0, 1.0, 0.0]), layer.scaling)
    )


def test_train_backbone_with_a_quantized_base_is_refused() -> None:
    model = quantized_mlp("8bit")
    with pytest.raises(InjectionError, match="train_backbone.*'0' is quantized"):
        loramix.inject(model, config(train_backbone=True))
    assert not any(isinstance(m, QuantizedLinearExperts) for m in model.modules())


def test_an_integer_weight_linear_counts_as_quantized() -> None:
    plain = nn.Linear(4, 3)
    assert quantized_kind(plain) is None
    plain.weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.int8), requires_grad=False)
    assert quantized_kind(plain) == "torch.int8 weights"
