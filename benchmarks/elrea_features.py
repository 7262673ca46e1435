"""ELREA feature extraction speed: exact per-example gradients from one batched backward pass against the obvious
batch-size-1 loop (one backward per example), on all-MiniLM-L6-v2 with a rank-8 LoRA on every linear layer.

Both produce the same sketched features (checked here before timing). Interleaved rounds; the ratio of each round
is loop time / batched time, and the median and quartiles are reported.

    python benchmarks/elrea_features.py [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _timing import device_name, time_once  # noqa: E402

import loramix  # noqa: E402
from loramix.methods.elrea import GradientFeaturizer, self_label_cross_entropy  # noqa: E402
from loramix.methods.elrea.projection import CountSketch  # noqa: E402
from loramix.models import load_backbone  # noqa: E402


def build(seq: int, batch: int, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    model, _ = load_backbone("minilm")
    loramix.inject(model, {"num_experts": 1, "rank": 8, "router": "none"})
    for layer in loramix.get_info(model).layers:
        torch.nn.init.normal_(layer.experts.B, std=0.02)
    head = torch.nn.Linear(model.config.hidden_size, 4)
    model.eval().to(device)
    head.to(device)
    ids = torch.randint(1000, 20000, (batch, seq), device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    return model, head, ids, mask


def loss_fn(model, head, ids, mask):
    def loss() -> torch.Tensor:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
        return self_label_cross_entropy(head(hidden))  # (n,)

    return loss


def batched(featurizer, model, head, ids, mask) -> torch.Tensor:
    return featurizer(loss_fn(model, head, ids, mask))


def loop(model, head, ids, mask, sketch: CountSketch, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    rows = []
    for i in range(ids.shape[0]):
        loss = loss_fn(model, head, ids[i : i + 1], mask[i : i + 1])().sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        grads = [
            torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)
        ]  # e.g. the pooler
        rows.append(sketch({n: g[None] for n, g in zip(names, grads)}))
    return torch.cat(rows)


def summed_backward(model, head, ids, mask, names: list[str]) -> None:
    """The floor: one ordinary backward pass of the batch's summed loss to the adapters (no per-example split)."""
    params = dict(model.named_parameters())
    loss = loss_fn(model, head, ids, mask)().sum()
    torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)


def run(batch: int = 32, seq: int = 64, rounds: int = 5, dim: int = 2048, device: str = "cpu") -> dict:
    model, head, ids, mask = build(seq, batch, device=device)
    where = torch.device(device)
    featurizer = GradientFeaturizer(model, projection_dim=dim, seed=0)
    sketch = CountSketch(dim, seed=0)
    names = featurizer.parameter_names
    fast, slow = batched(featurizer, model, head, ids, mask), loop(model, head, ids, mask, sketch, names)
    max_diff = float((fast - slow).abs().max())
    assert max_diff < 1e-4, f"batched and loop features differ by {max_diff}"
    ratios, times = [], {"batched": [], "loop": [], "summed": []}
    for _ in range(rounds):
        t_fast = time_once(lambda: batched(featurizer, model, head, ids, mask), where)
        t_slow = time_once(lambda: loop(model, head, ids, mask, sketch, names), where)
        times["summed"].append(time_once(lambda: summed_backward(model, head, ids, mask, names), where))
        times["batched"].append(t_fast)
        times["loop"].append(t_slow)
        ratios.append(t_slow / t_fast)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "name": "elrea-features-batched",
        "baseline": "batch-size-1 autograd loop",
        "speedup_median": statistics.median(ratios),
        "speedup_q25": q[0],
        "speedup_q75": q[2],
        "ratio_median": 1 / statistics.median(ratios),
        "batched_s_median": statistics.median(times["batched"]),
        "loop_s_median": statistics.median(times["loop"]),
        "summed_backward_s_median": statistics.median(times["summed"]),
        "batch": batch,
        "seq": seq,
        "projection_dim": dim,
        "max_abs_diff": max_diff,
        "model": "all-MiniLM-L6-v2, LoRA r=8 on all linear layers",
        "device": f"{device_name(where)}, {torch.get_num_threads()} threads",
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the entry as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entry = run(args.batch, args.seq, args.rounds, device=args.device)
    print(json.dumps(entry, indent=1))
    if args.out:
        args.out.write_text(json.dumps(entry, indent=1) + "\n")


if __name__ == "__main__":
    main()
