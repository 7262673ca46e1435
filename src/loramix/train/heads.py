"""Per-task heads on a shared encoder, each task with its own label space (MoLA gives every task its own head).

All heads are one Linear into the concatenated label spaces; each sample reads its own task's slice. No loop over
tasks. Legend: n samples, t tokens, d hidden, L all tasks' outputs together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TaskHeads(nn.Module):
    """Classification heads (`num_labels[task]` outputs) and regression heads (one output) in one matrix."""

    def __init__(self, hidden: int, num_labels: list[int], regression: list[bool] | None = None) -> None:
        super().__init__()
        self.num_labels = list(num_labels)
        regression = regression or [False] * len(num_labels)
        self.has_regression = any(regression)
        self.proj = nn.Linear(hidden, sum(num_labels))
        offsets = torch.tensor([0] + num_labels[:-1]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)  # (T,)
        self.register_buffer("sizes", torch.tensor(num_labels), persistent=False)  # (T,)
        self.register_buffer("regression", torch.tensor(regression), persistent=False)  # (T,)
        columns = torch.arange(sum(num_labels))
        own = (columns[None] >= offsets[:, None]) & (columns[None] < (offsets + self.sizes)[:, None])
        self.register_buffer("own", own, persistent=False)  # (T, L)

    def forward(self, pooled: Tensor, task_ids: Tensor) -> Tensor:
        """Logits `(n, L)` with every column outside the sample's task set to -inf."""
        logits = self.proj(pooled)  # (n, L)
        return logits.float().masked_fill(~self.own[task_ids], float("-inf"))

    def loss(self, logits: Tensor, labels: Tensor, task_ids: Tensor) -> Tensor:
        """Mean over samples of cross-entropy (classification) or squared error (regression)."""
        per_sample = self.per_sample_loss(logits, labels, task_ids)
        return per_sample.mean()

    def per_sample_loss(self, logits: Tensor, labels: Tensor, task_ids: Tensor) -> Tensor:
        offsets = self.offsets[task_ids]  # (n,)
        is_reg = self.regression[task_ids]  # (n,)
        targets = torch.where(is_reg, offsets, offsets + labels.long().clamp_min(0))
        ce = F.cross_entropy(logits, targets, reduction="none")  # (n,)
        if not self.has_regression:
            return ce
        value = logits.masked_fill(~self.own[task_ids], 0.0).gather(1, offsets[:, None]).squeeze(1)
        return torch.where(is_reg, (value - labels.float()) ** 2, ce)

    def predict(self, logits: Tensor, task_ids: Tensor) -> Tensor:
        """Label index within the task (classification) or the value (regression), as float `(n,)`."""
        offsets = self.offsets[task_ids]
        cls = (logits.argmax(-1) - offsets).float()
        value = logits.masked_fill(~self.own[task_ids], 0.0).gather(1, offsets[:, None]).squeeze(1)
        return torch.where(self.regression[task_ids], value, cls)


def pool(hidden: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    """`(n, t, d) -> (n, d)`: masked mean (sentence-transformers style) or the first token."""
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype)[..., None]  # (n, t, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class MultiTaskModel(nn.Module):
    """An encoder with loramix adapters, pooled, then per-task heads. Routing is set up by the caller."""

    def __init__(self, backbone: nn.Module, heads: TaskHeads, *, pooling: str = "mean") -> None:
        super().__init__()
        self.backbone, self.heads, self.pooling = backbone, heads, pooling

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        hidden = self.backbone(**inputs).last_hidden_state  # (n, t, d)
        return self.heads(pool(hidden, batch.get("attention_mask"), self.pooling), batch["task_ids"])
