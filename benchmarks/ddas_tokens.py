"""The example configs' auto-selector with its acceptance block's base pass reading only each input's first k
tokens (a shorter, cheaper pass), on the harness of `ddas_selector.py`: the share of seen tasks' test inputs that
choose their own task and of unseen tasks' inputs sent to the base, over the continual order, mean and range over
held-out splits; block 3 (the examples') and block 2 accepting.

    python benchmarks/ddas_tokens.py --threads 1 --tokens 12 16 24 32 48 --splits 6

Writes benchmarks/results/ddas-selector-tokens.json. The features are cached beside the harness's (--cache).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ddas_selector import (  # noqa: E402
    EXAMPLE,
    ORDER,
    ROOT,
    harness_inputs,
    harness_parser,
    measure,
    task_examples,
    task_features,
)

from loramix.io.files import atomic_write_json  # noqa: E402
from loramix.methods.continual.features import selector_features  # noqa: E402


@torch.no_grad()
def cut_features(
    args: argparse.Namespace, tokens: list[int]
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """`features[task][split]["hidden<l>@<k>"]`: the state entering block l (2 or 3) of the base model run on each
    input's first k tokens only, pooled, with the token statistics of the whole input; cached beside the full
    features (one `<task>-tokens.pt` each, `<task>-tokens-bf16.pt` with `--precision bfloat16`, recomputed when it
    lacks a wanted k)."""
    out: dict[str, Any] = {}
    wanted = {f"hidden{layer}@{k}" for layer in (2, 3) for k in tokens}

    def cached(name: str) -> Path:
        return args.cache / f"{name}-tokens{'-bf16' if args.precision == 'bfloat16' else ''}.pt"

    for name in ORDER:
        if cached(name).is_file():
            out[name] = torch.load(cached(name), weights_only=True)
    if all(name in out and wanted <= set(out[name]["test"]) for name in ORDER):
        return out
    data, model, collate = harness_inputs(args)
    for name in ORDER:
        splits = task_examples(data, name, args)
        out[name] = {}
        for split, examples in splits.items():
            kinds: dict[str, list[torch.Tensor]] = {}
            for start in range(0, len(examples), 64):
                batch = collate(examples[start : start + 64])
                for k in tokens:  # the library's cut pass (`ddas_tokens`): the statistics of the whole input
                    for layer in (2, 3):
                        cut = selector_features(
                            model, batch, "hidden", layer, tokens=k, precision=args.precision
                        )
                        kinds.setdefault(f"hidden{layer}@{k}", []).append(cut)
            out[name][split] = {key: torch.cat(value) for key, value in kinds.items()}
        args.cache.mkdir(parents=True, exist_ok=True)
        torch.save(out[name], cached(name))
    return out


def tokens_rates(
    features: dict, cut: dict, tokens: list[int], splits: int, seed: int
) -> list[dict[str, Any]]:
    """The example configs' selector with its acceptance block (3, or 2) read from a base pass over each input's
    first k tokens only, the rest as before (block 0's state and the token statistics from the whole input; block
    0 comes free with the pass): the rates over the sequence, over `splits` held-out splits. What that pass costs:
    `pieces_vs_task_ids` in `benchmarks/continual.py --speed`'s row of the example configs' selector."""
    out = []
    for layer in (3, 2):
        for k in tokens:
            merged = {
                task: {
                    split: {
                        "hidden0": features[task][split]["hidden0"],
                        "hidden3": cut[task][split][f"hidden{layer}@{k}"],
                    }
                    for split in ("train", "test")
                }
                for task in ORDER
            }
            runs = [measure(merged, EXAMPLE, seed + s) for s in range(splits)]
            own, unseen = ([r[key] for r in runs] for key in ("own_task_mean", "unseen_base_mean"))
            out.append({"accept_block": layer, "tokens": k, "own_task": own, "unseen_base": unseen})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = harness_parser(__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[12, 16, 24, 32, 48])
    parser.add_argument(
        "--precision",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the cut pass's precision (bfloat16: under autocast, as `ddas_precision: bfloat16` runs it)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ddas-selector-tokens.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = tokens_rates(
        task_features(args), cut_features(args, args.tokens), args.tokens, args.splits, args.seed
    )
    for r in rows:
        own, unseen = np.array(r["own_task"]), np.array(r["unseen_base"])
        print(
            f"block {r['accept_block']} on {r['tokens']} tokens: own {100 * own.mean():.1f} "
            f"[{100 * own.min():.1f}, {100 * own.max():.1f}], unseen->base {100 * unseen.mean():.1f} "
            f"[{100 * unseen.min():.1f}, {100 * unseen.max():.1f}]",
            flush=True,
        )
    atomic_write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
