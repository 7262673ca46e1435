"""The head interface: what turns the adapted encoder's output into a task's answer, and its loss.

A head is called by the multi-task model as `head.outputs(model, batch)`, by default `head(pooled, batch, model)`,
and returns the outputs its `loss` and `predict` read. `loss(outputs, batch)` is the task loss of a training step; `predict(model, batch)` runs the model
on the batch (inside the caller's routing block) and returns one prediction per sample: a label index within the
sample's task, or a value for regression. Heads declare the "head" role for their parameters.

Legend: n samples, t tokens, d hidden.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

from torch import Tensor, nn


class Head(nn.Module):
    """Base of heads; see the module docstring for the contract."""

    loramix_role: ClassVar[str] = "head"

    def outputs(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        """What `loss` and `predict` read, from the multi-task model and a batch: by default this head on the
        pooled encoder output; a head that reads every token (a causal LM's) overrides it."""
        return self(model.pooled(batch), batch, model)

    def forward(self, pooled: Tensor, batch: dict[str, Tensor], model: Any = None) -> Tensor:
        raise NotImplementedError

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def predict(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def inference_cache(self) -> AbstractContextManager[None]:
        """A block over many batches (evaluation, prediction) in which the head may keep what it computes from the
        weights alone and reuse it; the weights must not change inside. By default nothing is kept."""
        return nullcontext()

    def add_task(self, num_labels: int, *, regression: bool = False, **kwargs: Any) -> int:
        """Make room for one more task without touching the others; returns its task id."""
        raise NotImplementedError


def pool(hidden: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    """`(n, t, d) -> (n, d)`: masked mean (sentence-transformers style) or the first token."""
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype)[..., None]  # (n, t, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def smoothed(nll: Tensor, log_probs: Tensor, own: Tensor, smoothing: float) -> Tensor:
    """Cross-entropy `nll` `(n,)` with label smoothing: `(1 - smoothing) * nll` plus `smoothing` times the mean of
    `-log_probs` `(n, K)` over each row's own classes (`own`, a boolean mask of them); `nll` itself at 0."""
    if not smoothing:
        return nll
    uniform = -log_probs.masked_fill(~own, 0.0).sum(-1) / own.sum(-1)
    return (1.0 - smoothing) * nll + smoothing * uniform
