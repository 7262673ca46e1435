"""How well can a router that reads the input tell the ten tasks apart? A bound on MoLA-Router's routing purity.

A sample router sees one pooled vector per input and no task id. Routing purity maps each expert to the task it
serves most and counts the test samples whose top expert maps to their own task: that is the accuracy of one
particular classifier of the task from the router's input, so no router reading that input does better than the
best such classifier. This fits two on the frozen all-MiniLM-L6-v2 of the quality benchmark, trained with the task
labels themselves (which the router never gets): a logistic regression and an MLP, on the mean-pooled output of the
embedding block and of every transformer block (a router at block l could read any of blocks 0..l-1), and reports
their accuracy on the quality benchmark's fixed test sample, with each task's recall and where its errors go.

    python benchmarks/task_probe.py --threads 1        # writes results/task-probe.json and .md (about 3 min)
    python benchmarks/task_probe.py --threads 1 --finetune 3   # also the whole encoder fine-tuned as the classifier

The fine-tuned encoder is the strongest classifier of the task from the input tried here, and the test inputs found
word for word in another task's data are ones no classifier can place.

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
import torch.nn.functional as F  # noqa: E402
from quality import TASKS, default_data_dir  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from loramix.context import masked_mean  # noqa: E402
from loramix.io.files import atomic_write_bytes, atomic_write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent
PROBES = {
    "logistic": lambda seed: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)),
    "mlp": lambda seed: make_pipeline(
        StandardScaler(),
        MLPClassifier((256,), alpha=1e-3, max_iter=500, early_stopping=True, random_state=seed),
    ),
}


def probe_inputs(args: argparse.Namespace) -> tuple[list, list]:
    """The probes' train inputs (`--probe-train` of each task's train subsample) and the fixed test sample, each a
    list of `(example, task id)`."""
    from loramix.data import MultiTaskData
    from loramix.data.spec import tasks_from_directory

    data = MultiTaskData(tasks_from_directory(args.data, TASKS, max_train_examples=args.max_train, seed=0))
    rng = np.random.default_rng(args.seed)
    train, test = [], []
    for task in range(len(TASKS)):
        own = data.examples("train", task)
        chosen = rng.choice(len(own), size=min(len(own), args.probe_train), replace=False)
        train += [(own[i], task) for i in sorted(chosen)]
        test += [(e, task) for e in data.eval_examples("test", task, args.max_eval)]
    return train, test


def pooled_layers(
    args: argparse.Namespace, train: list, test: list
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean-pooled hidden states `(layers, n, d)` of the probe's train and test inputs, and their task ids."""
    from loramix.data import TextCollator
    from loramix.models import load_backbone

    model, tokenizer = load_backbone("minilm")
    model.eval()
    collate = TextCollator(tokenizer, max_length=args.max_length)
    out = []
    for inputs in (train, test):
        pooled = []
        for start in range(0, len(inputs), 64):
            batch = collate([e for e, _ in inputs[start : start + 64]])
            with torch.no_grad():
                states = model(**model_inputs(batch), output_hidden_states=True).hidden_states
            mask = batch["attention_mask"]
            pooled.append(torch.stack([masked_mean(h, mask) for h in states]).numpy())  # (L+1, n, d)
        out += [np.concatenate(pooled, axis=1), np.array([t for _, t in inputs])]
    return tuple(out)


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def finetuned(args: argparse.Namespace, train: list, test: list) -> list[dict]:
    """The strongest classifier of the task from the input tried here: the whole encoder fine-tuned with a linear
    layer on its mean-pooled output (AdamW 5e-5, batch 32, the probes' train inputs), scored after each epoch."""
    from loramix.data import TextCollator
    from loramix.models import load_backbone

    torch.manual_seed(args.seed)
    model, tokenizer = load_backbone("minilm")
    collate = TextCollator(tokenizer, max_length=args.max_length)
    head = torch.nn.Linear(model.config.hidden_size, len(TASKS))
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=5e-5, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)

    def logits(inputs: list) -> torch.Tensor:
        batch = collate([e for e, _ in inputs])
        return head(masked_mean(model(**model_inputs(batch)).last_hidden_state, batch["attention_mask"]))

    rows, labels = [], np.array([t for _, t in test])
    for epoch in range(1, args.finetune + 1):
        model.train()
        order = rng.permutation(len(train))  # one pass over the inputs, shuffled
        for start in range(0, len(train), 32):
            inputs = [train[i] for i in order[start : start + 32]]
            loss = F.cross_entropy(logits(inputs), torch.tensor([t for _, t in inputs]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = np.concatenate(
                [logits(test[s : s + 128]).argmax(-1).numpy() for s in range(0, len(test), 128)]
            )
        rows.append(scored("all", f"fine-tuned, epoch {epoch}", labels, predicted))
        print(f"fine-tuned encoder, epoch {epoch}: {rows[-1]['accuracy']:.3f}", flush=True)
    return rows


def scored(layer: int | str, probe: str, labels: np.ndarray, predicted: np.ndarray) -> dict:
    matrix = confusion_matrix(labels, predicted, labels=range(len(TASKS)))
    return {
        "layer": layer,
        "probe": probe,
        "accuracy": float((predicted == labels).mean()),
        "recall": {t: float(matrix[i, i] / matrix[i].sum()) for i, t in enumerate(TASKS)},
        "confusion": matrix.tolist(),
    }


def shared_inputs(args: argparse.Namespace, test: list) -> list[dict]:
    """Test inputs found word for word among another task's inputs (any split): no reader of the input can tell
    their task. SUBJ's subjective sentences and SST-2's come from the same film-review snippets."""
    from loramix.data import MultiTaskData
    from loramix.data.spec import tasks_from_directory
    from loramix.data.tasks import SPLITS

    data = MultiTaskData(tasks_from_directory(args.data, TASKS))
    known = [
        {(e.text, e.text_pair) for split in SPLITS for e in data.examples(split, task)}
        for task in range(len(TASKS))
    ]
    out = []
    for task, name in enumerate(TASKS):
        inputs = [(e.text, e.text_pair) for e, t in test if t == task]
        for other, other_name in enumerate(TASKS):
            found = sum(x in known[other] for x in inputs) if other != task else 0
            if found:
                out.append({"task": name, "found_in": other_name, "inputs": found, "of": len(inputs)})
    return out


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
    parser.add_argument(
        "--finetune",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also fine-tune the whole encoder for EPOCHS",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "task-probe.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, test = probe_inputs(args)
    xtr, ytr, xte, yte = pooled_layers(args, train, test)
    rows = []
    for layer in range(xtr.shape[0]):
        for probe, make in PROBES.items():
            rows.append(scored(layer, probe, yte, make(args.seed).fit(xtr[layer], ytr).predict(xte[layer])))
            print(f"block {layer} {probe}: {rows[-1]['accuracy']:.3f}", flush=True)
    rows += finetuned(args, train, test) if args.finetune else []
    result = {
        "tasks": TASKS,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "shared_inputs": shared_inputs(args, test),
    }
    atomic_write_json(args.out, result)
    atomic_write_bytes(args.out.with_suffix(".md"), markdown(result).encode("utf-8"))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    tasks, rows, settings = result["tasks"], result["rows"], result["settings"]
    command = "python benchmarks/task_probe.py --threads 1" + (
        f" --finetune {settings['finetune']}" if settings.get("finetune") else ""
    )
    lines = [
        "# Telling the ten tasks apart from the router's input (all-MiniLM-L6-v2, mean-pooled)",
        "",
        f"`{command}` ({result['seconds']:.0f} s). Probes trained on {settings['probe_train']} inputs per task with "
        "the task labels on the frozen encoder's states, scored on the quality benchmark's fixed test sample; block "
        "0 is the embedding block's output. Block `all`: the whole encoder fine-tuned as the task classifier on the "
        "same inputs. Test accuracy, then each task's recall.",
        "",
        "| block | probe | accuracy | " + " | ".join(tasks) + " |",
        "|---|---|---|" + "---|" * len(tasks),
    ]
    for row in rows:
        recall = " | ".join(f"{row['recall'][t]:.2f}" for t in tasks)
        lines.append(f"| {row['layer']} | {row['probe']} | {row['accuracy']:.3f} | {recall} |")
    frozen = max((r for r in rows if r["layer"] != "all"), key=lambda r: r["accuracy"])
    best_of_all = max(rows, key=lambda r: r["accuracy"])
    for best in [frozen] if best_of_all is frozen else [frozen, best_of_all]:
        lines += [
            "",
            f"Best {'frozen' if best is frozen else 'of all'}: block {best['layer']}, {best['probe']}, "
            f"{best['accuracy']:.3f}. Its confusion (rows: true task, columns: predicted):",
            "",
            "| | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        lines += [
            f"| {t} | " + " | ".join(str(v) for v in best["confusion"][i]) + " |" for i, t in enumerate(tasks)
        ]
    lines += [
        "",
        "Test inputs found word for word among another task's inputs (any split), which no reader of the input can "
        "place:",
        "",
        "| task | found in | inputs |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['task']} | {r['found_in']} | {r['inputs']} of {r['of']} |" for r in result["shared_inputs"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
