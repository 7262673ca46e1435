"""Section `generate` of `benchmarks/speed.py`: greedy generation of a mixed-task batch, in tokens per second.

    python benchmarks/speed.py --sections generate --threads 1     # writes results/speed-generate.json and .md

Each row of the batch belongs to another task (row k to task k mod T), every method generates exactly the same
number of new tokens (`min_new_tokens = max_new_tokens`, EOS never ends a row early), and every method holds the
same weights (PEFT's adapters and the merged weights are copied from loramix's experts), so the greedy tokens
agree; the run records how many of them do. Methods:

- `loramix`: task router, one expert per task, rank 8 on all linear layers; `LoramixModel.generate(task_ids=...)`,
  one batched pass per decoding step;
- `peft-mixed-batch`: one PEFT LoRA adapter per task in one `PeftModel`, `generate(adapter_names=[...])`, which
  loops over the adapters present inside every layer;
- `merged-per-task`: each task's rows through that task's merged model in turn. The merged weights are computed
  before timing and swapped in by reference (no copy), so the merge itself is not timed;
- `base`: the model without adapters on the whole batch, the ceiling that no adapter method reaches.

Models, with random weights built from a config: `tiny-gpt2` (`loramix.tiny_lm` default sizes: d 128, 2 layers,
4 heads, the char vocabulary of 100) and `gpt2-small` (d 768, 12 layers, 12 heads, vocab 50257). Prompts are
random token ids, all of the prompt length (no padding). Ratios are time(loramix) / time(baseline) per round,
median and quartiles over interleaved rounds; tokens per second are new tokens of the whole batch / median time.
On CUDA the models run in bf16.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import _timing as timing
import peft
import torch
import torch.nn.functional as F
from speed_plan import Results
from torch import Tensor, nn

import loramix
from loramix.experts.linear import is_conv1d
from loramix.tiny_lm import DEFAULT_SIZES, tiny_causal_lm

RANK, ALPHA = 8, 16
CASES = ("loramix", "peft-mixed-batch", "merged-per-task", "base")
BASELINES = ("peft-mixed-batch", "merged-per-task", "base")
MODELS: dict[str, dict[str, int]] = {
    "tiny-gpt2": dict(DEFAULT_SIZES),
    "gpt2-small": {
        "vocab_size": 50257,
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "max_positions": 1024,
    },
}


@dataclass
class GeneratePoint:
    """One measurement: `rows` prompts of `prompt_len` tokens from `num_tasks` tasks, `new_tokens` each."""

    model: str
    num_tasks: int
    rows: int
    prompt_len: int
    new_tokens: int
    rounds: int
    warmup_tokens: int  # one untimed warm-up call per case, generating this many tokens


def generate_plan(mode: str, device: torch.device) -> list[GeneratePoint]:
    """The default keeps the section to about 10 minutes on 2 CPU cores at one thread: GPT-2 small runs 16 rows
    and 2 rounds (its merged-per-task case alone runs 16 batch-1 generations per round at 16 tasks)."""
    if mode == "quick":
        return [GeneratePoint("tiny-gpt2", tasks, 16, 16, 8, 3, 8) for tasks in (4, 16)]
    if device.type == "cuda":
        return [
            GeneratePoint(model, tasks, 32, 32, 32, 10, 32)
            for model in ("tiny-gpt2", "gpt2-small")
            for tasks in (4, 16)
        ]
    points = [GeneratePoint("tiny-gpt2", tasks, 32, 32, 32, 7, 32) for tasks in (4, 16)]
    rounds = 3 if mode == "full" else 2
    points += [GeneratePoint("gpt2-small", tasks, 16, 32, 32, rounds, 4) for tasks in (4, 16)]
    return points


# ---- the four methods, built on one set of base weights ---------------------------------------------------------


def build_base(model: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return tiny_causal_lm("gpt2", seed=0, **MODELS[model]).to(device, dtype).eval()


def build_loramix(
    model: str, num_tasks: int, device: torch.device, dtype: torch.dtype, seed: int = 1
) -> nn.Module:
    lm = build_base(model, device, dtype)
    config = loramix.AdapterConfig(
        router="task",
        num_experts=num_tasks,
        num_tasks=num_tasks,
        rank=RANK,
        alpha=ALPHA,
        targets="all-linear",
    )
    loramix.inject(lm, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking experts: each task's continuation differs
        for layer in loramix.get_info(lm).layers:
            B = layer.experts.B
            B.copy_(torch.randn(B.shape, generator=generator) * 0.05)
    return lm.eval()


def build_peft(lm: nn.Module, model: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """One PEFT LoRA adapter per task (named by the task id), holding loramix's expert of that task."""
    info = loramix.get_info(lm)
    num_tasks = info.config.num_experts

    def config() -> peft.LoraConfig:
        return peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", fan_in_fan_out=True
        )

    wrapped = peft.get_peft_model(build_base(model, device, dtype), config(), adapter_name="0")
    for task in range(1, num_tasks):
        wrapped.add_adapter(str(task), config())
    inner = wrapped.base_model.model
    with torch.no_grad():
        for layer in info.layers:
            target = inner.get_submodule(layer.layer_name)
            for task in range(num_tasks):
                target.lora_A[str(task)].weight.copy_(layer.experts.A[task])
                target.lora_B[str(task)].weight.copy_(layer.experts.B[task])
    return wrapped.eval()


def merged_weights(lm: nn.Module) -> list[dict[str, Tensor]]:
    """Per task, every adapted layer's merged base weight `W0 + s B_t A_t` (in the base layer's own layout)."""
    info = loramix.get_info(lm)
    out: list[dict[str, Tensor]] = []
    for task in range(info.config.num_experts):
        weights = {}
        for layer in info.layers:
            gate = F.one_hot(torch.tensor(task), layer.experts.num_experts).float()
            delta = layer.experts.delta_weight(gate, layer.scaling)  # (o, i)
            weight = layer.base_layer.weight
            delta = delta.t() if is_conv1d(layer.base_layer) else delta
            weights[layer.layer_name] = nn.Parameter(
                (weight.float() + delta).to(weight.dtype), requires_grad=False
            )
        out.append(weights)
    return out


def swap_in(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Point each named layer at its merged weight (a reference swap: nothing is copied)."""
    for name, weight in weights.items():
        model.get_submodule(name).weight = weight


# ---- one point -----------------------------------------------------------------------------------------------


def make_prompts(point: GeneratePoint, vocab: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab, (point.rows, point.prompt_len), generator=generator).to(device)
    task_ids = (torch.arange(point.rows) % point.num_tasks).to(device)
    return ids, torch.ones_like(ids), task_ids


def make_cases(
    point: GeneratePoint, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Callable[[int], Tensor]], int]:
    """Each case as `call(new_tokens) -> generated ids (rows, new_tokens)`, and the number of adapted layers."""
    lm = build_loramix(point.model, point.num_tasks, device, dtype)
    wrapped = loramix.LoramixModel(lm)
    peft_model = build_peft(lm, point.model, device, dtype)
    merged = merged_weights(lm)
    plain = build_base(point.model, device, dtype)
    ids, mask, task_ids = make_prompts(point, lm.config.vocab_size, device)
    adapter_names = [str(int(task)) for task in task_ids.cpu()]
    rows_of = [torch.nonzero(task_ids == task).flatten() for task in range(point.num_tasks)]

    def settings(new_tokens: int) -> dict[str, object]:
        return {
            "do_sample": False,
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "pad_token_id": 0,
        }

    def new(out: Tensor) -> Tensor:
        return out[:, point.prompt_len :]

    @torch.inference_mode()
    def loramix_case(new_tokens: int) -> Tensor:
        return new(
            wrapped.generate(input_ids=ids, attention_mask=mask, task_ids=task_ids, **settings(new_tokens))
        )

    @torch.inference_mode()
    def peft_case(new_tokens: int) -> Tensor:
        out = peft_model.generate(
            input_ids=ids, attention_mask=mask, adapter_names=adapter_names, **settings(new_tokens)
        )
        return new(out)

    @torch.inference_mode()
    def merged_case(new_tokens: int) -> Tensor:
        out = torch.empty(point.rows, new_tokens, dtype=ids.dtype, device=device)
        for task, rows in enumerate(rows_of):
            swap_in(plain, merged[task])
            out[rows] = new(
                plain.generate(input_ids=ids[rows], attention_mask=mask[rows], **settings(new_tokens))
            )
        return out

    originals = {name: plain.get_submodule(name).weight for name in merged[0]}

    @torch.inference_mode()
    def base_case(new_tokens: int) -> Tensor:
        swap_in(plain, originals)  # the merged case leaves its last task's weights in `plain`
        return new(plain.generate(input_ids=ids, attention_mask=mask, **settings(new_tokens)))

    cases = {
        "loramix": loramix_case,
        "peft-mixed-batch": peft_case,
        "merged-per-task": merged_case,
        "base": base_case,
    }
    return cases, len(loramix.get_info(lm).layers)


def run_generate_section(
    results: Results, points: list[GeneratePoint], device: torch.device, dtype: torch.dtype
) -> None:
    for point in points:
        started = time.perf_counter()
        cases, adapted = make_cases(point, device, dtype)
        warm = {name: call(point.warmup_tokens) for name, call in cases.items()}  # untimed; also the check
        agree = {
            name: round(float((warm[name] == warm["loramix"]).float().mean()), 4) for name in BASELINES[:2]
        }
        timed = {name: partial(call, point.new_tokens) for name, call in cases.items()}
        timings = timing.interleaved(timed, device=device, rounds=point.rounds, warmup=0)
        tokens = point.rows * point.new_tokens
        speed = {name: round(tokens / (timings.median_ms(name) / 1e3), 2) for name in cases}
        fields = dict(
            section="generate",
            model=point.model,
            num_tasks=point.num_tasks,
            rows=point.rows,
            prompt_len=point.prompt_len,
            new_tokens=point.new_tokens,
            rank=RANK,
            adapted_layers=adapted,
            tokens_per_s=speed["loramix"],
            baseline_tokens_per_s=speed,
            tokens_agree_with_loramix=agree,
            warmup_tokens=point.warmup_tokens,
        )
        results.add_ratios(timings, "loramix", list(BASELINES), f"generate/{point.model}", **fields)
        for name in BASELINES:
            if name != "base":
                results.add_ratios(timings, name, ["base"], f"generate/{point.model}", **fields)
        print(
            f"  {point.model} {point.num_tasks:2d} tasks, {point.rows} rows: "
            + ", ".join(f"{name} {speed[name]:.0f} tok/s" for name in cases)
            + f"; tokens agreeing with loramix {agree} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        del cases, timed, warm
        gc.collect()
        results.save()


def generate_table(entries: list[dict]) -> list[str]:
    """The markdown table of the section: tokens/s of each method, and loramix's speed-up over each baseline."""
    rows = [e for e in entries if e.get("section") == "generate" and e["name"].endswith("/loramix")]
    if not rows:
        return []
    lines = [
        "Greedy generation of a mixed-task batch (row k is task k mod T; task router, one expert per task, r = 8 "
        "on all linear layers; same new tokens for every method). The last column is the base model without "
        "adapters against PEFT's mixed batch: the most any adapter method can gain over PEFT there:",
        "",
        "| model | tasks | rows x (prompt + new) | loramix tok/s | PEFT mixed batch tok/s | merged per task tok/s "
        "| base tok/s | loramix vs PEFT | loramix vs merged per task | loramix vs base | base vs PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((e["model"], e["num_tasks"]) for e in rows)
    for model, tasks in keys:
        by = {e["baseline"]: e for e in rows if (e["model"], e["num_tasks"]) == (model, tasks)}
        first = next(iter(by.values()))
        speed = first["baseline_tokens_per_s"]
        peft_vs_base = [
            e
            for e in entries
            if e["name"] == f"generate/{model}/peft-mixed-batch" and e.get("num_tasks") == tasks
        ]
        ceiling = _speedup({"base": peft_vs_base[0]}, "base", inverse=True) if peft_vs_base else ""
        lines.append(
            f"| {model} | {tasks} | {first['rows']} x ({first['prompt_len']} + {first['new_tokens']}) | "
            f"{speed['loramix']:.0f} | {speed['peft-mixed-batch']:.0f} | {speed['merged-per-task']:.0f} | "
            f"{speed['base']:.0f} | {_speedup(by, 'peft-mixed-batch')} | {_speedup(by, 'merged-per-task')} | "
            f"{_speedup(by, 'base')} | {ceiling} |"
        )
    lines.append("")
    return lines


def _speedup(by_baseline: dict[str, dict], baseline: str, inverse: bool = False) -> str:
    """time(baseline) / time(loramix): median [quartiles] of the per-round ratios, above 1 is faster; `inverse`:
    the entry's own ratio, time(method) / time(baseline), for how much faster the baseline is."""
    e = by_baseline.get(baseline)
    if e is None:
        return ""
    if inverse:
        return f"{e['ratio_median']:.2f}x [{e['ratio_q25']:.2f}, {e['ratio_q75']:.2f}]"
    return f"{1 / e['ratio_median']:.2f}x [{1 / e['ratio_q75']:.2f}, {1 / e['ratio_q25']:.2f}]"
