"""A Hugging Face `Trainer` step with loramix against the same step with PEFT: what `LoramixTrainer` costs a user who
trains through `Trainer`.

Each case is one `trainer.training_step(model, batch)` (the batch moved to the device, forward, loss, backward)
then the optimizer's step, on a BERT sequence classifier with LoRA (or experts) of rank 8 on every linear layer:
- `peft`: PEFT's LoRA under the plain `Trainer` (the baseline);
- `lora`: loramix's one LoRA under `LoramixTrainer`;
- `mola-grad-mixed`: eight task-routed experts, a batch of eight tasks;
- `mola-router`: eight experts, a learned router, TwD added by the trainer.
Interleaved rounds, medians of per-round ratios to `peft` (`_timing.py`).

    python benchmarks/trainer_step.py --threads 1          # a tiny BERT: the regime where overhead shows
    python benchmarks/trainer_step.py --threads 1 --hidden 384 --tokens 128 --batch 32 --out ...  # MiniLM's shape
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing as timing  # noqa: E402

import loramix  # noqa: E402

ROOT = Path(__file__).resolve().parent
TASKS = 8
CONFIGS = {
    "lora": {"num_experts": 1, "rank": 8, "router": "none"},
    "mola-grad-mixed": {"num_experts": TASKS, "rank": 8, "router": "task", "num_tasks": TASKS},
    "mola-router": {"num_experts": TASKS, "rank": 8, "router": "sample"},
}


def classifier(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(timing.bert_config(args, num_labels=4))


def cases(args: argparse.Namespace, folder: Path) -> dict[str, Callable[[], object]]:
    ids = torch.randint(0, 1000, (args.batch, args.tokens))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 4, (args.batch,)),
    }
    training = transformers.TrainingArguments(
        str(folder), report_to=[], use_cpu=args.device == "cpu", learning_rate=1e-4, max_steps=1_000_000
    )

    def step(trainer: transformers.Trainer, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
        trainer.create_optimizer_and_scheduler(num_training_steps=1_000_000)
        trainer.current_gradient_accumulation_steps = 1  # `train()` sets it; the step runs here without it
        model = trainer.model

        def run() -> object:
            trainer.training_step(model, dict(inputs))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            return None

        return run

    made: dict[str, Callable[[], object]] = {}
    model = peft.get_peft_model(
        classifier(args),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"),
    )
    made["peft"] = step(transformers.Trainer(model=model, args=training), batch)
    for name, config in CONFIGS.items():
        model = classifier(args)
        loramix.inject(model, {**config, "modules_to_save": ["classifier"]})
        routed = {**batch, "task_ids": torch.arange(args.batch) % TASKS}
        made[name] = step(loramix.LoramixTrainer(model=model, args=training), routed)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    timing.shape_arguments(parser)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        made = cases(args, Path(folder))
        probe = timing.time_once(made["mola-router"], device)
        timings = timing.interleaved(
            made, device=device, rounds=args.rounds, warmup=2, repeat=timing.repeat_for(probe, 0.1)
        )
    entries = []
    for name in made:
        entry = {
            "case": name,
            "ms": round(timings.median_ms(name), 3),
            "vs_peft": timings.ratio(name, "peft"),
        }
        entries.append(entry)
        stats = entry["vs_peft"]
        print(
            f"{name:16s} {entry['ms']:9.3f} ms  {stats['ratio_median']:.2f}x PEFT "
            f"[{stats['ratio_q25']:.2f}, {stats['ratio_q75']:.2f}]",
            flush=True,
        )
    out = args.out or ROOT / "results" / "trainer-step.json"
    timing.write_shape_results(
        out, args, device, entries, transformers=transformers.__version__, peft=peft.__version__
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
