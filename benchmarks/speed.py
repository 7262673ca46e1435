"""Speed benchmark: loramix's mixtures against one LoRA, PEFT, a naive per-expert loop, X-LoRA and the MoLA-code
style, at the layer level, for a whole training step, for mixed-task inference, and for peak memory.

    python benchmarks/speed.py            # the default run: about 10-15 minutes on 2 quiet CPU cores
    python benchmarks/speed.py --quick    # small shapes, every section, under 2 minutes
    python benchmarks/speed.py --full     # the whole layer grid and every model-level baseline (hours on CPU)
    python benchmarks/speed.py --sections generate --threads 1   # generation only (about 10 minutes on 2 cores)

Every comparison is measured in one process: one warm-up round, then interleaved rounds that run every case once in
a shuffled order; a case is compared with its baseline by the median (and quartiles) of the per-round ratios of
their times, so that the drift of a shared machine cancels. Threads are set explicitly (`--threads`, default 2) and
the load average is recorded with every entry.

Results: `benchmarks/results/speed.json` (a list of entries: name, baseline, ratio_median/q25/q75, times, shape
parameters, device) and `benchmarks/results/speed.md` (the tables for README.md). `--quick` writes
`speed-quick.json` / `speed-quick.md` instead, so it never overwrites a full run. The generation section run on
its own writes `speed-generate.json` / `speed-generate.md` (`speed-generate-quick.*` with `--quick`).

What is measured (ratios are time(candidate) / time(baseline): below 1 is faster):
1. Layer level, frozen `nn.Linear(d, d)`, tokens split into samples of 64: forward (inference) and forward +
   backward; gates hard (a task id per sample), soft per sample, top-2 per token (a router in the layer). Against a
   frozen `nn.Linear`, PEFT LoRA of rank r and of rank E*r, a naive per-expert loop (`where` + `index_add_`, the
   MixLoRA / MoE-PEFT style), and PEFT mixed batches (`adapter_names`; hard gate, forward only).
2. Model level, all-MiniLM-L6-v2 (real weights) and a GPT-2-small-shaped model (random weights): one training step
   (forward inside `loramix.routing`, mean of the last hidden state as the loss, backward, AdamW, zero_grad) of
   `lora`, `mola-grad` and `mola-router` (+ TwD; dense, and top-1 as `mola-router-top1`) with E = 8, r = 8 on all
   linear layers, against PEFT LoRA r = 8 with the same dropout, back-propagation through the frozen model alone,
   the naive loop, X-LoRA (PEFT, the same 8 experts, trainable) and the MoLA-code style (one encoder pass per task
   in the batch).
3. Inference: 64 samples from 8 tasks through `mola-grad` in one pass, against PEFT mixed batches and one merged
   model per task run in turn; and a one-task batch against one merged LoRA model.
4. Peak memory of the training step, each case in a fresh process: RSS on CPU, `max_memory_allocated` on CUDA.
5. On a GPU (`--device cuda`, or auto): the same in bf16, plus Llama-shaped layers at d = 4096.
6. Generation (`--sections generate`, not in the default run): greedy generation of a mixed-task batch in tokens
   per second, loramix's task router against PEFT mixed batches and one merged model per task run in turn, at 4
   and 16 tasks, on a tiny GPT-2 and a GPT-2-small-shaped model (`speed_generate.py`).
"""

# The benchmark lives in a few modules beside this file, one job each; this one is the command line and the run:
#   speed_plan.py    what a run measures (Plan, make_plan), the results list (Results), shared constants
#   speed_layer.py   section 1, layer level (and the naive per-expert loop)
#   speed_model.py   sections 2 and 3, the training step on a model and mixed-task inference
#   speed_memory.py  section 4, peak memory (`--memory-probe` runs one case of it in a fresh process)
#   speed_generate.py section 6, mixed-task generation
#   speed_report.py  the targets and the markdown tables
#   _timing.py       interleaved rounds, ratios, memory probes; elrea_features.py, the ELREA section's measurement

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as timing  # noqa: E402
from speed_generate import generate_plan, generate_table, run_generate_section  # noqa: E402
from speed_layer import run_layer_section  # noqa: E402
from speed_memory import memory_probe, run_memory_section  # noqa: E402
from speed_model import run_inference_section, run_model_section  # noqa: E402
from speed_plan import Results, make_plan  # noqa: E402
from speed_report import check_targets, write_markdown  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
ROOT = Path(__file__).resolve().parent


# ---- main -----------------------------------------------------------------------------------------------------


def run_elrea_section(results: Results, device: torch.device, *, quick: bool) -> None:
    """ELREA's per-example gradient features: one batched backward pass against a batch-size-1 loop, at 64
    tokens and at 16 (about the length of the ten tasks' sentences)."""
    from elrea_features import run as run_features

    shapes = [(8, 64)] if quick else [(32, 64), (64, 16)]
    for batch, seq in shapes:
        entry = run_features(batch=batch, seq=seq, rounds=2 if quick else 3, device=device.type)
        stats = {k: entry.pop(k) for k in ("ratio_median",)}
        stats.update(ratio_q25=1 / entry["speedup_q75"], ratio_q75=1 / entry["speedup_q25"])
        fields = {k: v for k, v in entry.items() if k not in ("name", "baseline")}
        results.add(
            f"features/elrea-batched/{batch}x{seq}", entry["baseline"], stats, section="elrea", **fields
        )
        print(
            f"  elrea features {batch}x{seq}: {entry['speedup_median']:.2f}x faster than the batch-size-1 loop",
            flush=True,
        )


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
        choices=["layer", "model", "inference", "memory", "elrea", "generate"],
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
    stem = "speed-generate" if args.sections == ["generate"] else "speed"
    out = args.out or ROOT / "results" / (f"{stem}-quick.json" if args.quick else f"{stem}.json")
    command = "python benchmarks/speed.py" + {"quick": " --quick", "full": " --full", "default": ""}[mode]
    if args.sections != parser.get_default("sections"):
        command += " --sections " + " ".join(args.sections)
    if args.threads != 2:
        command += f" --threads {args.threads}"
    if args.cases:
        command += " --cases " + " ".join(args.cases)
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
        ("elrea", lambda: run_elrea_section(results, device, quick=mode == "quick")),
        ("generate", lambda: run_generate_section(results, generate_plan(mode, device), device, dtype)),
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
    if "generate" in args.sections:
        print("\n".join(generate_table(results.entries)))
    for row in targets:
        print(
            f"  {'met ' if row['met'] else 'MISS'} {row['label']}: {row['value']:.3f} (<= {row['threshold']:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
