"""The report of `benchmarks/speed.py`: the targets checked against the entries, and the markdown tables for
README.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from speed_generate import generate_table
from speed_plan import Results

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
        "ELREA features: batched >= 10x the batch-size-1 loop (32 x 64 tokens)",
        "features/elrea-batched/32x64",
        "batch-size-1 autograd loop",
        {},
        0.1,
        "ratio_median",
    ),
    (
        "ELREA features: batched >= 10x the batch-size-1 loop (64 x 16 tokens)",
        "features/elrea-batched/64x16",
        "batch-size-1 autograd loop",
        {},
        0.1,
        "ratio_median",
    ),
    *[
        (
            f"mixed-task generation >= 1.5x PEFT mixed-batch tokens/s (16 tasks, {model})",
            f"generate/{model}/loramix",
            "peft-mixed-batch",
            {"num_tasks": 16},
            1 / 1.5,
            "ratio_median",
        )
        for model in ("tiny-gpt2", "gpt2-small")
    ],
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
    lines += generate_table(results.entries)
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
            "| batch x seq | batched (s) | batch-size-1 loop (s) | speedup (median [q25, q75]) | "
            "one summed backward (s) |",
            "|---|---|---|---|---|",
        ]
        for e in elrea:
            lines.append(
                f"| {e['batch']} x {e['seq']} | {e['batched_s_median']:.2f} | {e['loop_s_median']:.2f} | "
                f"{e['speedup_median']:.2f}x [{e['speedup_q25']:.2f}, {e['speedup_q75']:.2f}] | "
                f"{e.get('summed_backward_s_median', float('nan')):.2f} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))
