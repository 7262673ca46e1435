"""The auto-selector (DDAS) on the ten real tasks, without training anything: the base model's features of each
task's inputs are computed once (cached), then for the continual order, after each task t the selector is fitted on
tasks 1..t and every task's test inputs are routed. A seen task's inputs should choose their own task (target
>= 90%), a task not learned yet should go to the base model (target >= 80%).

    python benchmarks/ddas_selector.py --threads 1                 # every variant, writes results/ddas-selector.*
    python benchmarks/ddas_selector.py --threads 1 --variants default paper

Features: the same train sample `Continual.task_features` takes (`ddas_examples` of the run's training inputs, the
benchmark's `max_train_examples` 2000, seed 0) and the fixed test sample of `max_eval_examples`, tokenised at the
continual benchmark's `max_length` (48); cached under --cache as one `.pt` per task.

Legend: n samples, d feature width, T tasks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
ORDER = ["ag_news", "sst2", "trec", "emotion", "sms_spam", "subj", "banking77", "cola", "mrpc", "rte"]


@torch.no_grad()
def task_features(args: argparse.Namespace) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """`features[task][split][kind]`, each `(n, d)`: kinds `embeddings` (input embeddings mean-pooled over real
    tokens, the library's default), `embeddings_std` (their spread over the tokens), and `layer<k>` (hidden state
    k mean-pooled, k = 0 the embedding block's output, the last one the encoder output)."""
    from loramix.data import MultiTaskData, TextCollator
    from loramix.models import load_backbone
    from loramix.train.config import RunConfig
    from loramix.train.run import task_specs

    out: dict[str, Any] = {}
    missing = [t for t in ORDER if not (args.cache / f"{t}.pt").is_file()]
    if missing:
        run = RunConfig.from_dict(
            {
                "method": "moe-adapters",
                "model": "minilm",
                "tasks_dir": str(args.data),
                "tasks": ORDER,
                "head": "label-prompt",
                "steps": 1,
                "steps_per_task": 1,
                "max_train_examples": args.max_train,
                "max_eval_examples": args.max_eval,
                "max_length": args.max_length,
                "seed": args.seed,
            }
        )
        data = MultiTaskData(task_specs(run))
        model, tokenizer = load_backbone("minilm")
        model.eval()
        collate = TextCollator(tokenizer, max_length=args.max_length)
        embed = model.get_input_embeddings()
    for name in ORDER:
        path = args.cache / f"{name}.pt"
        if path.is_file():
            out[name] = torch.load(path)
            continue
        started = time.perf_counter()
        task = data.task_names.index(name)
        own = [e for e in data.split("train") if e.task == task]
        rng = np.random.default_rng(args.seed)  # as Continual.task_features draws them
        chosen = rng.choice(len(own), size=min(len(own), args.train_examples), replace=False)
        splits = {"train": [own[i] for i in sorted(chosen)], "test": data.eval_examples("test", task, args.max_eval)}
        out[name] = {}
        for split, examples in splits.items():
            kinds: dict[str, list[torch.Tensor]] = {}
            for start in range(0, len(examples), 64):
                batch = collate(examples[start : start + 64])
                mask = batch["attention_mask"].float()[..., None]  # (n, t, 1)
                count = mask.sum(1).clamp_min(1.0)
                words = embed(batch["input_ids"])  # (n, t, d)
                mean = (words * mask).sum(1) / count
                spread = (((words - mean[:, None]) ** 2 * mask).sum(1) / count).sqrt()
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
                hidden = model(**inputs, output_hidden_states=True).hidden_states
                pooled = {f"layer{k}": (h * mask).sum(1) / count for k, h in enumerate(hidden)}
                for kind, value in {"embeddings": mean, "embeddings_std": spread, **pooled}.items():
                    kinds.setdefault(kind, []).append(value)
            out[name][split] = {k: torch.cat(v) for k, v in kinds.items()}
        args.cache.mkdir(parents=True, exist_ok=True)
        torch.save(out[name], path)
        print(f"features of {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--train-examples", type=int, default=1000, help="ddas_examples: inputs fitted per task")
    parser.add_argument("--max-eval", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/loramix-ddas-features"))
    parser.add_argument("--features-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    features = task_features(args)
    print({k: tuple(v["train"]["embeddings"].shape) for k, v in features.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
