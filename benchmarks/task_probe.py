"""How well can a router that reads the input tell the ten tasks apart? A bound on MoLA-Router's routing purity.

A sample router sees one pooled vector per input and no task id. Routing purity maps each expert to the task it
serves most and counts the test samples whose top expert maps to their own task: that is the accuracy of one
particular classifier of the task from the router's input, so no router reading that input does better than the
best such classifier. This fits two on the frozen all-MiniLM-L6-v2 of the quality benchmark, trained with the task
labels themselves (which the router never gets): a logistic regression and an MLP, on the mean-pooled output of the
embedding block and of every transformer block (a router at block l could read any of blocks 0..l-1), and reports
their accuracy on the quality benchmark's fixed test sample, with each task's recall and where its errors go.

    python benchmarks/task_probe.py --threads 1        # writes results/task-probe.json and .md (about 3 min)

Data as in `quality.py`: the same train subsample (`--max-train` per task, seed 0) of which `--probe-train` inputs
per task fit the probes, the same 300 fixed test inputs per task, inputs cut at 48 tokens.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from quality import TASKS, default_data_dir  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from loramix.io.files import atomic_write_bytes, atomic_write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent
PROBES = {
    "logistic": lambda seed: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)),
    "mlp": lambda seed: make_pipeline(
        StandardScaler(),
        MLPClassifier((256,), alpha=1e-3, max_iter=500, early_stopping=True, random_state=seed),
    ),
}


def pooled_layers(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean-pooled hidden states `(layers, n, d)` of the probe's train and test inputs, and their task ids."""
    from loramix.data import MultiTaskData, TextCollator
    from loramix.data.spec import tasks_from_directory
    from loramix.models import load_backbone

    data = MultiTaskData(tasks_from_directory(args.data, TASKS, max_train_examples=args.max_train, seed=0))
    model, tokenizer = load_backbone("minilm")
    model.eval()
    collate = TextCollator(tokenizer, max_length=args.max_length)
    rng = np.random.default_rng(args.seed)
    parts: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    for task, name in enumerate(TASKS):
        own = data.examples("train", task)
        chosen = rng.choice(len(own), size=min(len(own), args.probe_train), replace=False)
        splits = {
            "train": [own[i] for i in sorted(chosen)],
            "test": data.eval_examples("test", task, args.max_eval),
        }
        for split, examples in splits.items():
            for start in range(0, len(examples), 64):
                batch = collate(examples[start : start + 64])
                with torch.no_grad():
                    out = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        token_type_ids=batch.get("token_type_ids"),
                        output_hidden_states=True,
                    )
                mask = batch["attention_mask"].unsqueeze(-1).float()  # (n, t, 1)
                pooled = torch.stack(
                    [(h * mask).sum(1) / mask.sum(1) for h in out.hidden_states]
                )  # (L+1, n, d)
                parts[split][0].append(pooled.numpy())
                parts[split][1].extend([task] * pooled.shape[1])
        print(f"features of {name}", flush=True)
    (xtr, ytr), (xte, yte) = [(np.concatenate(x, axis=1), np.array(y)) for x, y in parts.values()]
    return xtr, ytr, xte, yte


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument(
        "--probe-train", type=int, default=1000, help="train inputs per task that fit the probes"
    )
    parser.add_argument("--max-eval", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "task-probe.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    xtr, ytr, xte, yte = pooled_layers(args)
    rows = []
    for layer in range(xtr.shape[0]):
        for probe, make in PROBES.items():
            predicted = make(args.seed).fit(xtr[layer], ytr).predict(xte[layer])
            matrix = confusion_matrix(yte, predicted, labels=range(len(TASKS)))
            rows.append(
                {
                    "layer": layer,
                    "probe": probe,
                    "accuracy": float((predicted == yte).mean()),
                    "recall": {t: float(matrix[i, i] / matrix[i].sum()) for i, t in enumerate(TASKS)},
                    "confusion": matrix.tolist(),
                }
            )
            print(f"block {layer} {probe}: {rows[-1]['accuracy']:.3f}", flush=True)
    result = {
        "tasks": TASKS,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    atomic_write_bytes(args.out.with_suffix(".md"), markdown(result).encode("utf-8"))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    tasks, rows = result["tasks"], result["rows"]
    lines = [
        "# Telling the ten tasks apart from the router's input (frozen all-MiniLM-L6-v2, mean-pooled)",
        "",
        f"`python benchmarks/task_probe.py --threads 1` ({result['seconds']:.0f} s). Probes trained on "
        f"{result['settings']['probe_train']} inputs per task with the task labels, scored on the quality "
        "benchmark's fixed test sample; block 0 is the embedding block's output. Test accuracy, then each task's "
        "recall.",
        "",
        "| block | probe | accuracy | " + " | ".join(tasks) + " |",
        "|---|---|---|" + "---|" * len(tasks),
    ]
    for row in rows:
        recall = " | ".join(f"{row['recall'][t]:.2f}" for t in tasks)
        lines.append(f"| {row['layer']} | {row['probe']} | {row['accuracy']:.3f} | {recall} |")
    best = max(rows, key=lambda r: r["accuracy"])
    lines += [
        "",
        f"Best: block {best['layer']}, {best['probe']} probe, {best['accuracy']:.3f}. Its confusion (rows: true task, "
        "columns: predicted):",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    lines += [
        f"| {t} | " + " | ".join(str(v) for v in best["confusion"][i]) + " |" for i, t in enumerate(tasks)
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
