"""Timing helpers for benchmarks/speed.py: interleaved rounds, per-round ratios, peak memory, the environment.

Why interleaved rounds: on a shared machine the speed of the whole box drifts by tens of percent within a minute.
Timing case A for a minute and then case B for a minute measures the drift as much as the cases. Here every round
runs every case once (in a shuffled order, so no case always follows the same neighbour), and a case is compared
with its baseline by the ratio of their times *within the same round*; the median of those ratios and its quartiles
are what the benchmark reports. A slow round slows both sides of its ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - Windows
        return float("nan")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"cpu: {model or platform.processor() or platform.machine()}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per call of every case, one value per round (wall clock, and process CPU time on CPU)."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)

    def median_ms(self, name: str) -> float:
        return 1e3 * statistics.median(self.wall[name])

    def ratio(self, name: str, baseline: str) -> dict[str, float]:
        """Median and quartiles of the per-round ratios time(name) / time(baseline)."""
        return ratio_stats(self.wall[name], self.wall[baseline])

    def cpu_ratio(self, name: str, baseline: str) -> float:
        return ratio_stats(self.cpu[name], self.cpu[baseline])["ratio_median"]


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75), linear interpolation; a single value is its own quartiles."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def ratio_stats(times: list[float], baseline: list[float]) -> dict[str, float]:
    ratios = [a / b for a, b in zip(times, baseline)]
    q25, median, q75 = quantiles(ratios)
    return {"ratio_median": round(median, 4), "ratio_q25": round(q25, 4), "ratio_q75": round(q75, 4)}


def interleaved(
    cases: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    rounds: int,
    warmup: int = 1,
    repeat: int = 1,
    seed: int = 0,
) -> Timings:
    """Run `warmup` untimed rounds, then `rounds` timed rounds; in each, every case `repeat` times back to back.

    A case is a callable doing one unit of work (a layer call, a training step). Returns per-round seconds per call.
    """
    rng = random.Random(seed)
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    synchronize(device)
    timings = Timings(wall={n: [] for n in names}, cpu={n: [] for n in names})
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        timings.load.append(load_average())
        for name in order:
            synchronize(device)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(repeat):
                cases[name]()
            synchronize(device)
            timings.wall[name].append((time.perf_counter() - wall0) / repeat)
            timings.cpu[name].append((time.process_time() - cpu0) / repeat)
    return timings


def repeat_for(seconds_per_call: float, target_seconds: float = 0.05) -> int:
    """How many back-to-back calls make one timed sample of about `target_seconds` (at least 1)."""
    return max(1, min(50, round(target_seconds / max(seconds_per_call, 1e-6))))


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# ---- memory -------------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_probe(args: list[str], timeout: float = 600) -> dict[str, float] | None:
    """Run `python benchmarks/speed.py --memory-probe ...` in a fresh process (peak RSS is per process) and parse
    the one JSON line it prints last. None if it failed (the reason goes to stderr)."""
    import json

    command = [sys.executable, os.path.join(os.path.dirname(__file__), "speed.py"), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  memory probe timed out: {' '.join(args)}", file=sys.stderr)
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  memory probe failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def bert_config(args: argparse.Namespace, **extra: object) -> transformers.BertConfig:
    """The small-BERT benchmarks' model: six blocks of width `--hidden`, four heads, a vocabulary of 1,000."""
    return transformers.BertConfig(
        hidden_size=args.hidden,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=2 * args.hidden,
        vocab_size=1000,
        **extra,
    )


def shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the small-BERT benchmarks (`overhead.py`, `trainer_step.py`): threads, device, the model's
    width, the batch's shape, and the timed rounds."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)


def write_shape_results(
    out: Path, args: argparse.Namespace, device: torch.device, entries: list[dict], **versions: str
) -> None:
    """Write a small-BERT benchmark's entries with what they ran on (device, threads, shape, versions, load)."""
    meta = {
        "device": device_name(device),
        "threads": args.threads,
        "shape": {"hidden": args.hidden, "tokens": args.tokens, "batch": args.batch, "blocks": 6},
        "torch": torch.__version__,
        **versions,
        "load_average": load_average(),
    }
    out.write_text(json.dumps({"meta": meta, "entries": entries}, indent=2) + "\n")
    print(f"wrote {out}")
