"""One process of `tests/test_hf_trainer.py`'s data-parallel run: `LoramixTrainer` on the tiny BERT classifier
under `torchrun` (CPU, gloo), each process writing what its adapters hold at the end.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_trainer_worker.py ROUTER OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainingArguments  # noqa: E402

import loramix  # noqa: E402
from loramix.inject import adapter_state  # noqa: E402
from tests.test_hf_trainer import classifier, rows  # noqa: E402


def main() -> None:
    router, out = sys.argv[1], Path(sys.argv[2])
    model = classifier(router)
    args = TrainingArguments(
        str(out),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=2,
        save_strategy="steps",
        save_steps=3,
        seed=0,
        disable_tqdm=True,
    )
    # task routing sees two tasks of three: the third task's expert gets no gradient, on every process
    trainer = loramix.LoramixTrainer(
        model=model, args=args, train_dataset=rows(tasks=2 if router == "task" else 3)
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    state = {name: value.tolist() for name, value in adapter_state(model).items()}
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(state))


if __name__ == "__main__":
    main()
