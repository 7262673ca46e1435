"""Section 4 of `benchmarks/speed.py`: peak memory of one training step, each case measured in a fresh process
(`speed.py --memory-probe ...` runs `memory_probe` there)."""

from __future__ import annotations

import gc
import tempfile
import threading
import time
from pathlib import Path

import _timing as timing
import torch
from speed_model import build_method, make_batch, training_step
from speed_plan import Plan, Results

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
