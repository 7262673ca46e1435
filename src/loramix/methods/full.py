"""Full fine-tuning with per-task heads: the reference the adapter methods are measured against.

The backbone is trained at `backbone_lr` with one classification head per task, and nothing else learns. The
training parts expect an adapted model, so the model carries one rank-1 LoRA frozen at zero from the start: its B
is zero and stays so (a frozen expert gets no gradient), so it adds exactly nothing and the run is plain full
fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramix.config import AdapterConfig
from loramix.inject import get_info
from loramix.methods.base import Method, register_method
from loramix.train.config import RunConfig
from loramix.train.model import MultiTaskModel
from loramix.train.run import prepare_run, train_one_phase


def freeze_every_expert(model: MultiTaskModel) -> None:
    """Freeze all experts of every adapted layer of the model's backbone at their values (B = 0: no change)."""
    for layer in get_info(model.backbone).layers:
        layer.experts.freeze_experts(list(range(layer.experts.num_experts)))


@register_method
class FullFinetune(Method):
    name = "full-finetune"
    description = (
        "the backbone and per-task heads trained, no adapter (the reference); backbone_lr sets its rate"
    )

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        return AdapterConfig(
            num_experts=1, router="none", rank=1, alpha=1.0, targets=run.targets, train_backbone=True
        )

    def train(
        self, run: RunConfig, output_dir: Path, *, resume: bool = False, replaces: Sequence[Path] = ()
    ) -> dict[str, Any]:
        data = prepare_run(run, output_dir, replaces=replaces)
        return train_one_phase(
            run,
            data,
            output_dir,
            adapters=self.adapter_config(run, data.num_tasks),
            prepare_model=freeze_every_expert,
            resume=resume,
        )
