"""Section 1 of `benchmarks/speed.py`: one frozen `nn.Linear` with loramix's experts against the layer alone,
PEFT LoRA, PEFT mixed batches and a naive per-expert loop (the loop is also used by the model-level section)."""

from __future__ import annotations

import gc
import types
from collections.abc import Callable
from typing import Any

import _timing as timing
import peft
import torch
from speed_plan import PASSES, SEQ_PER_SAMPLE, Plan, Results
from torch import Tensor, nn

from loramix import AdapterConfig, RoutingState
from loramix.experts import LinearExperts
from loramix.inject import build_layer
from loramix.routers import Gate

# ---- the naive per-expert loop (MixLoRA / MoE-PEFT style) ---------------------------------------------------------


def naive_delta(layer: LinearExperts, x: Tensor, gate: Gate | None) -> Tensor:
    """`s * sum_e g_e B_e A_e x` the way per-expert-loop libraries compute it: for each expert, `where` finds the
    rows routed to it (samples for a per-sample gate, tokens for a per-token one), they are gathered, run through
    that expert, weighted, and `index_add_`-ed back. Host syncs (`where`) and E small matmuls per layer."""
    A, B = layer.experts.weights()
    assert gate is not None
    x = x.to(A.dtype)  # the experts' dtype, as the fused path computes (float32 beside a bf16 base)
    n = x.shape[0]
    weights = gate.weights.to(x.dtype)
    if weights.dim() == 2:  # per sample (hard or soft): rows are samples
        rows = x.reshape(n, -1, x.shape[-1])  # (n, t, i)
    else:  # per token: rows are tokens
        rows = x.reshape(-1, x.shape[-1])  # (n*t, i)
        weights = weights.reshape(-1, weights.shape[-1])  # (n*t, e)
    out = torch.zeros(*rows.shape[:-1], B.shape[1], dtype=x.dtype, device=x.device)
    for expert in range(weights.shape[-1]):
        idx = torch.where(weights[:, expert] > 0)[0]
        if idx.numel() == 0:
            continue
        picked = rows[idx]
        y = (picked @ A[expert].t()) @ B[expert].t()
        scale = (layer.scaling * weights[idx, expert]).view(-1, *[1] * (y.dim() - 1))
        out.index_add_(0, idx, y * scale)
    return out.reshape(*x.shape[:-1], B.shape[1])


def use_naive_loop(layer: LinearExperts) -> None:
    """Make this layer compute its mixture with `naive_delta` (routing, experts and base stay loramix's)."""
    layer._fusable = lambda x: False  # type: ignore[method-assign]
    layer.delta = types.MethodType(naive_delta, layer)  # type: ignore[method-assign]


# ---- section 1: layer level --------------------------------------------------------------------------------------


def peft_linear(base: nn.Linear, rank: int, adapters: int = 1, dropout: float = 0.0) -> nn.Module:
    from peft.tuners.lora.layer import Linear as PeftLinear

    config = peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=dropout)
    layer = PeftLinear(base, "0", config=config, r=rank, lora_alpha=16)
    for index in range(1, adapters):
        layer.update_layer(str(index), rank, lora_alpha=16, config=config)
    if adapters > 1:
        layer.set_adapter([str(i) for i in range(adapters)])
    return layer


def layer_cases(
    d_in: int,
    d_out: int,
    tokens: int,
    experts: int,
    rank: int,
    gate_kind: str,
    train: bool,
    device: torch.device,
    dtype: torch.dtype,
    with_naive: bool = True,
) -> dict[str, Callable[[], object]]:
    """One callable per case, each one layer call (and its backward when `train`)."""
    n = max(1, tokens // SEQ_PER_SAMPLE)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, tokens // n, d_in, generator=generator).to(device, dtype)
    grad_out = torch.randn(n, tokens // n, d_out, generator=generator).to(device, dtype)
    expert_index = (torch.arange(n) % experts).to(device)
    soft = torch.softmax(torch.randn(n, experts, generator=generator), -1).to(device)

    def base() -> nn.Linear:
        torch.manual_seed(0)
        layer = nn.Linear(d_in, d_out).to(device, dtype)
        layer.requires_grad_(False)
        return layer

    def loramix_layer() -> tuple[LinearExperts, RoutingState | None]:
        if gate_kind == "hard":
            config = AdapterConfig(num_experts=experts, rank=rank, router="task", num_tasks=experts)
            gate = Gate(
                weights=nn.functional.one_hot(expert_index, experts).float(), indices=expert_index, hard=True
            )
            state = RoutingState(model_gate=gate, record=False)
        elif gate_kind == "soft":
            config = AdapterConfig(num_experts=experts, rank=rank, router="sample")
            state = RoutingState(model_gate=Gate(weights=soft), record=False)
        else:
            config = AdapterConfig(num_experts=experts, rank=rank, router="token", top_k=min(2, experts))
            state = None
        layer = build_layer(LinearExperts, base(), config, "layer").to(device, dtype)
        with torch.no_grad():
            layer.experts.B.normal_(std=0.02)
        return layer, state

    modules: dict[str, tuple[nn.Module, dict[str, Any]]] = {"linear": (base(), {})}
    layer, state = loramix_layer()
    modules["loramix"] = (layer, {"routing": state})
    modules[f"peft-lora-r{rank}"] = (peft_linear(base(), rank).to(device, dtype), {})
    modules[f"peft-lora-r{experts * rank}"] = (peft_linear(base(), experts * rank).to(device, dtype), {})
    if with_naive:
        naive, naive_state = loramix_layer()
        use_naive_loop(naive)
        modules["naive-loop"] = (naive, {"routing": naive_state})
    if gate_kind == "hard" and not train:
        names = [str(int(e)) for e in expert_index]
        modules["peft-mixed-batch"] = (
            peft_linear(base(), rank, adapters=experts).to(device, dtype),
            {"adapter_names": names},
        )

    cases: dict[str, Callable[[], object]] = {}
    for name, (module, kwargs) in modules.items():
        module.train(train)
        params = [p for p in module.parameters() if p.requires_grad]
        if train:
            cases[name] = _train_call(module, kwargs, x, grad_out, params)
        else:
            cases[name] = _infer_call(module, kwargs, x)
    return cases


def _train_call(
    module: nn.Module, kwargs: dict, x: Tensor, grad_out: Tensor, params: list
) -> Callable[[], None]:
    def call() -> None:
        inp = x.detach().requires_grad_(True)  # the layer's input needs a gradient, as inside a network
        module(inp, **kwargs).backward(grad_out)
        for p in params:
            p.grad = None

    return call


def _infer_call(module: nn.Module, kwargs: dict, x: Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return module(x, **kwargs)

    return call


def run_layer_section(
    results: Results, plan: Plan, device: torch.device, dtype: torch.dtype, full: bool
) -> None:
    # the GPU's Llama-shaped points first: a run stopped early still has them
    points = [(di, do, tokens, e, r, gates, PASSES) for di, do, tokens, e, r, gates in plan.llama_points]
    points += [(d, d, tokens, e, r, gates, passes) for d, tokens, e, r, gates, passes in plan.layer_points]
    for d_in, d_out, tokens, experts, rank, gates, passes in points:
        for gate_kind in gates:
            for pass_kind in passes:
                train = pass_kind == "fwd+bwd"
                with_naive = experts * tokens <= 64 * 4096 or full  # the loop at E=64, 4k tokens is very slow
                cases = layer_cases(
                    d_in, d_out, tokens, experts, rank, gate_kind, train, device, dtype, with_naive
                )
                first = timing.time_once(cases["linear"], device)
                repeat = timing.repeat_for(first, 0.05 if device.type == "cpu" else 0.02)
                timings = timing.interleaved(
                    cases, device=device, rounds=plan.layer_rounds, warmup=1, repeat=repeat
                )
                fields = dict(
                    section="layer",
                    gate=gate_kind,
                    mode=pass_kind,
                    d_in=d_in,
                    d_out=d_out,
                    tokens=tokens,
                    num_experts=experts,
                    rank=rank,
                    top_k=2 if gate_kind == "topk" else None,
                )
                baselines = [n for n in cases if n != "loramix"]
                results.add_ratios(timings, "loramix", baselines, "layer", **fields)
                for name in baselines:  # every baseline against the frozen layer, for the overhead column
                    if name != "linear":
                        results.add_ratios(timings, name, ["linear"], "layer", **fields)
                ratio = timings.ratio("loramix", "linear")["ratio_median"]
                peft = timings.ratio("loramix", f"peft-lora-r{rank}")["ratio_median"]
                print(
                    f"  layer d={d_in}->{d_out} T={tokens} E={experts} r={rank} {gate_kind:4s} {pass_kind:7s}: "
                    f"{timings.median_ms('loramix'):8.2f} ms, x{ratio:.3f} linear, x{peft:.3f} PEFT r{rank}",
                    flush=True,
                )
                del cases
                gc.collect()
        results.save()
