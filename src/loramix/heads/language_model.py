"""Generation tasks: the causal LM's own output layer is the head; the loss is the next-token loss on the response.

Every task shares the LM head (the vocabulary is one label space); what differs per task is the routing, so the
head holds no parameters and adding a task only counts it.

Legend: n samples, t tokens, v vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from loramix.heads.base import Head
from loramix.losses.language_model import causal_lm_loss

LM_INPUTS = ("input_ids", "attention_mask")


class LanguageModelHead(Head):
    """`outputs(model, batch)`: the backbone's logits `(n, t, v)`; `loss`: the mean over samples of each one's
    mean next-token loss on its response tokens (`batch["lm_labels"]`, -100 elsewhere); `generate`: greedy
    continuations of left-padded prompts inside the caller's routing block."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks

    def outputs(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        return model.backbone(**{k: batch[k] for k in LM_INPUTS if k in batch}).logits

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return causal_lm_loss(outputs, batch["lm_labels"]).mean()

    @torch.no_grad()
    def generate(
        self,
        model: Any,
        prompts: dict[str, Tensor],
        *,
        max_new_tokens: int,
        pad_token_id: int,
        eos_token_id: int | None,
        sampling: dict[str, Any] | None = None,
    ) -> Tensor:
        """The new tokens `(n, k)` of greedy decoding, or of sampling with `sampling`'s `generate` options
        (`do_sample`, `temperature`, `top_p`), padded after a row's EOS, for a batch made by
        `GenerationCollator.prompts`. Run it inside a routing block whose `keep_model_gate` is set, so that a
        sample router decides once, on the prompt."""
        out = model.backbone.generate(
            **{k: prompts[k] for k in LM_INPUTS},
            max_new_tokens=max_new_tokens,
            **{"do_sample": False, "num_beams": 1, **(sampling or {})},
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
        return out[:, prompts["input_ids"].shape[1] :]

    def predict(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError(
            "generation tasks are scored by their generated text (train/generation_eval.py)"
        )

    def add_task(self, num_labels: int = 0, *, regression: bool = False, **kwargs: Any) -> int:
        self.num_tasks += 1
        return self.num_tasks - 1
