"""What loramix adds per adapted layer where the arithmetic costs nothing: the regime of a GPU running a small
model, where a pass is the sum of its kernel launches and the Python that issues them.

A BERT of hidden width 64, 6 blocks, batch 8 x 16 tokens, LoRA or experts of rank 8 on every linear layer (36
layers): each case's time minus the plain (or frozen) model's, per adapted layer, and its ratio to PEFT's one LoRA
timed in the same rounds (interleaved, medians of per-round ratios; `_timing.py`). Cases:
- inference (`torch.inference_mode`): the plain model, PEFT, loramix's one LoRA, mola-grad with one task's batch
  and with a batch of eight tasks, mola-router;
- training step (forward, backward, AdamW): the frozen model's backprop, PEFT, the same loramix cases;
- `-unfused`: the same loramix case with the base layer and the mixture run apart (`base(x) + delta(x)`, plain
  autograd) instead of fused in one pair of custom autograd nodes (`experts/ops.py: linear`);
- `-compiled` (with `--compile`): the model under `torch.compile` (inductor), PEFT's too.

    python benchmarks/overhead.py --threads 1 --compile   # writes benchmarks/results/overhead.json
    python benchmarks/overhead.py --device cuda --hidden 384 --tokens 128 --batch 32   # MiniLM's shape on a GPU
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing as timing  # noqa: E402

import loramix  # noqa: E402
from loramix.experts.linear import LinearExperts  # noqa: E402

ROOT = Path(__file__).resolve().parent
CONFIGS = {
    "lora": {"num_experts": 1, "rank": 8, "router": "none"},
    "mola-grad": {"num_experts": 8, "rank": 8, "router": "task", "num_tasks": 8},
    "mola-router": {"num_experts": 8, "rank": 8, "router": "sample"},
}


def unfused(call: Callable[[], object]) -> Callable[[], object]:
    """`call` with every adapted linear layer running its base and its mixture apart."""
    fusable = LinearExperts._fusable

    def run() -> object:
        LinearExperts._fusable = lambda self, x: False  # type: ignore[method-assign]
        try:
            return call()
        finally:
            LinearExperts._fusable = fusable  # type: ignore[method-assign]

    return run


def build(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> Callable[[], torch.nn.Module]:
    config = timing.bert_config(args)

    def base() -> torch.nn.Module:
        torch.manual_seed(0)
        return transformers.BertModel(config, add_pooling_layer=False).to(device, dtype)

    return base


def cases(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, train: bool) -> dict:
    base = build(args, device, dtype)
    ids = torch.randint(0, 1000, (args.batch, args.tokens), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # task ids on the CPU, as a caller builds them (the routing block moves them): a one-task batch is then known
    # as one without reading the device, and runs its expert as one LoRA (`Gate.single_expert`)
    one_task = torch.zeros(args.batch, dtype=torch.long)
    mixed = torch.arange(args.batch) % 8

    def model(kind: str) -> torch.nn.Module:
        made = base()
        if kind == "peft":
            made = peft.get_peft_model(made, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        elif kind != "plain":
            loramix.inject(made, CONFIGS[kind])
            with torch.no_grad():  # trained-looking experts
                for layer in loramix.get_info(made).layers:
                    layer.experts.B.normal_(std=0.02)
        return made.train(train)

    def call(
        made: torch.nn.Module, task_ids: torch.Tensor | None, routed: bool, compiled: bool = False
    ) -> Callable[[], object]:
        runner = torch.compile(made) if compiled else made
        if train:
            params = [p for p in made.parameters() if p.requires_grad]
            if not params:  # the frozen model: back-propagate through it all the same
                made.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
            optimizer = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=1e-4)

        def forward() -> torch.Tensor:
            if routed:
                with loramix.routing(made, task_ids=task_ids, record=train):
                    return runner(**inputs).last_hidden_state
            return runner(**inputs).last_hidden_state

        def step() -> object:
            if not train:
                with torch.inference_mode():
                    return forward()
            forward().float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return None

        return step

    plain = model("plain")
    if train:
        plain.requires_grad_(False)
    models = {name: model(name) for name in ("peft", "lora", "mola-grad", "mola-router")}
    made = {
        "plain" if not train else "frozen": call(plain, None, False),
        "peft": call(models["peft"], None, False),
        "lora": call(models["lora"], None, False),
        "mola-grad-one-task": call(models["mola-grad"], one_task, True),
        "mola-grad-mixed": call(models["mola-grad"], mixed, True),
        "mola-router": call(models["mola-router"], None, True),
    }
    for name in ("lora", "mola-grad-mixed", "mola-router"):
        made[f"{name}-unfused"] = unfused(made[name])
    if args.compile:  # each model compiled whole by torch.compile (inductor), PEFT's too
        made["peft-compiled"] = call(models["peft"], None, False, compiled=True)
        made["lora-compiled"] = call(models["lora"], None, False, compiled=True)
        made["mola-grad-mixed-compiled"] = call(models["mola-grad"], mixed, True, compiled=True)
        made["mola-router-compiled"] = call(models["mola-router"], None, True, compiled=True)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    timing.shape_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="also each model under torch.compile")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    entries = []
    for train in (False, True):
        made = cases(args, device, dtype, train)
        baseline = "frozen" if train else "plain"
        probe = timing.time_once(made["mola-router"], device)
        timings = timing.interleaved(
            made, device=device, rounds=args.rounds, warmup=2, repeat=timing.repeat_for(probe, 0.1)
        )
        layers = 36
        for name in made:
            entry = {
                "mode": "training step" if train else "inference",
                "case": name,
                "ms": round(timings.median_ms(name), 3),
                "us_per_layer_over_" + baseline: round(
                    1e3 * (timings.median_ms(name) - timings.median_ms(baseline)) / layers, 1
                ),
                "vs_peft": timings.ratio(name, "peft"),
            }
            entries.append(entry)
            print(
                f"{entry['mode']:14s} {name:24s} {entry['ms']:8.3f} ms  "
                f"{entry['us_per_layer_over_' + baseline]:7.1f} us/layer over {baseline:6s} "
                f"{entry['vs_peft']['ratio_median']:.2f}x PEFT [{entry['vs_peft']['ratio_q25']:.2f}, "
                f"{entry['vs_peft']['ratio_q75']:.2f}]",
                flush=True,
            )
    out = args.out or ROOT / "results" / "overhead.json"
    dtype_name = str(dtype).removeprefix("torch.")
    timing.write_shape_results(out, args, device, entries, dtype=dtype_name, peft=peft.__version__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
