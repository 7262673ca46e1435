"""What one speed run measures and where its entries go: the run modes' shapes and cases (`Plan`, `make_plan`),
the results list (`Results`), and the constants every section shares (the loramix methods, the number of tasks).
Used by `benchmarks/speed.py`; see its docstring for the benchmark itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _timing as timing
import torch

NUM_TASKS = 8
SEQ_PER_SAMPLE = 64  # layer level: tokens are split into samples of this many tokens

# loramix methods as adapter configs (E = 8, r = 8 on all linear layers; alpha 16 as PEFT's r = 8 runs use)
METHODS: dict[str, dict[str, Any]] = {
    "loramix-lora-d0.1": {"num_experts": 1, "rank": 8, "router": "none", "dropout": 0.1},
    "loramix-lora-d0": {"num_experts": 1, "rank": 8, "router": "none", "dropout": 0.0},
    "mola-grad": {"num_experts": 8, "rank": 8, "router": "task", "num_tasks": NUM_TASKS},
    "mola-router": {"num_experts": 8, "rank": 8, "router": "sample"},
    "mola-router-top1": {"num_experts": 8, "rank": 8, "router": "sample", "top_k": 1},
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
    "mola-router-top1",
    "naive-loop",
    "xlora",
    "mola-code-per-task",
)
GPT2_DEFAULT_CASES = ("peft-lora-d0", "loramix-lora-d0", "mola-grad", "mola-router", "mola-router-top1")
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
