"""The multi-task model: an encoder with loramix adapters, pooled, then a head (or a causal LM whose own output layer
is the head, for generation tasks). Routing is set up by the caller."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from loramix.context import routing
from loramix.heads import Head, pool

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class MultiTaskModel(nn.Module):
    """`model(batch)` runs the backbone, pools its last hidden state and hands it to the head (the head decides:
    a language-model head reads the backbone's logits instead).

    `encode(inputs, route_ids)` is the same encoder for other texts (a label-prompt head's class texts), routed by
    `route_ids` in a routing block of its own.
    """

    def __init__(self, backbone: nn.Module, heads: Head, *, pooling: str = "mean") -> None:
        super().__init__()
        self.backbone, self.heads, self.pooling = backbone, heads, pooling

    def hidden(self, inputs: dict[str, Tensor]) -> Tensor:
        """The backbone's last hidden state `(n, t, d)` of `inputs`."""
        return self.backbone(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs}).last_hidden_state

    def pooled(self, inputs: dict[str, Tensor]) -> Tensor:
        return pool(self.hidden(inputs), inputs.get("attention_mask"), self.pooling)  # (n, d)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.heads.outputs(self, batch)

    def encode(
        self,
        inputs: dict[str, Tensor],
        route_ids: Tensor,
        keep_base: Tensor | None = None,
        *,
        noise: bool = True,
    ) -> Tensor:
        """Pooled embeddings `(n, d)` of `inputs`, each routed by its id in `route_ids` (`noise` False: noisy
        routers without their training noise)."""
        with routing(
            self.backbone,
            task_ids=route_ids,
            attention_mask=inputs.get("attention_mask"),
            keep_base=keep_base,
            record=False,
            noise=noise,
        ):
            return self.pooled(inputs)


def unwrapped(model: nn.Module) -> MultiTaskModel:
    """The :class:`MultiTaskModel` inside the wrapper that several processes put around it
    (`DistributedDataParallel`): routing hooks and heads live there, while the forward pass must go through the
    wrapper so that gradients are synchronised."""
    while not isinstance(model, MultiTaskModel) and isinstance(
        getattr(model, "module", None), torch.nn.Module
    ):
        model = model.module
    return model  # type: ignore[return-value]


def route_of(batch: dict[str, Any]) -> Tensor:
    """The ids the routers see: `route_ids` when a batch carries them (experts that are not tasks, e.g. clusters),
    else the task ids that the heads read too."""
    return batch.get("route_ids", batch["task_ids"])
