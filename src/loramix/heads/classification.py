"""Per-task heads on a shared encoder, each task with its own label space (MoLA gives every task its own head).

All heads are one Linear into the concatenated label spaces; each sample reads its own task's slice. No loop over
tasks. Legend: n samples, t tokens, d hidden, L all tasks' outputs together.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.heads.base import Head, smoothed


class TaskHeads(Head):
    """Classification heads (`num_labels[task]` outputs) and regression heads (one output) in one matrix."""

    def __init__(
        self,
        hidden: int,
        num_labels: list[int],
        regression: list[bool] | None = None,
        *,
        label_smoothing: float = 0.0,
    ) -> None:
        """`label_smoothing`: the share of a classification target spread evenly over the task's own classes (never
        over another task's columns)."""
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.proj = nn.Linear(hidden, sum(num_labels))
        self._layout(list(num_labels), list(regression or [False] * len(num_labels)))

    def _layout(self, num_labels: list[int], regression: list[bool]) -> None:
        self.num_labels, self.is_regression = num_labels, regression
        self.has_regression = any(regression)
        offsets = torch.tensor([0] + num_labels[:-1]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)  # (T,)
        self.register_buffer("sizes", torch.tensor(num_labels), persistent=False)  # (T,)
        self.register_buffer(
            "regression", torch.tensor(regression, dtype=torch.bool), persistent=False
        )  # (T,)
        columns = torch.arange(sum(num_labels))
        own = (columns[None] >= offsets[:, None]) & (columns[None] < (offsets + self.sizes)[:, None])
        self.register_buffer("own", own, persistent=False)  # (T, L)

    def forward(self, pooled: Tensor, batch: dict[str, Tensor], model: Any = None) -> Tensor:
        """Logits `(n, L)` with every column outside the sample's task set to -inf."""
        logits = self.proj(pooled)  # (n, L)
        return logits.float().masked_fill(~self.own[batch["task_ids"]], float("-inf"))

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean over samples of cross-entropy (classification) or squared error (regression)."""
        return self.per_sample_loss(outputs, batch["labels"], batch["task_ids"]).mean()

    def predict(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        return self.decide(model(batch), batch["task_ids"])

    @torch.no_grad()
    def add_task(self, num_labels: int, *, regression: bool = False, **kwargs: Any) -> int:
        """A new task's rows are appended to the one matrix; the other tasks' rows keep their exact values."""
        rows = 1 if regression else num_labels
        old = self.proj
        grown = nn.Linear(old.in_features, old.out_features + rows).to(old.weight)
        grown.weight[: old.out_features] = old.weight
        grown.bias[: old.out_features] = old.bias
        grown.requires_grad_(old.weight.requires_grad)
        self.proj = grown
        self._layout(self.num_labels + [rows], self.is_regression + [regression])
        self.to(old.weight.device)
        return len(self.num_labels) - 1

    def per_sample_loss(self, logits: Tensor, labels: Tensor, task_ids: Tensor) -> Tensor:
        offsets = self.offsets[task_ids]  # (n,)
        is_reg = self.regression[task_ids]  # (n,)
        targets = torch.where(is_reg, offsets, offsets + labels.long().clamp_min(0))
        ce = F.cross_entropy(logits, targets, reduction="none")  # (n,)
        if self.label_smoothing:  # spread over the sample's own task's classes
            ce = smoothed(ce, logits.float().log_softmax(-1), self.own[task_ids], self.label_smoothing)
        if not self.has_regression:
            return ce
        value = logits.masked_fill(~self.own[task_ids], 0.0).gather(1, offsets[:, None]).squeeze(1)
        return torch.where(is_reg, (value - labels.float()) ** 2, ce)

    def decide(self, logits: Tensor, task_ids: Tensor) -> Tensor:
        """Label index within the task (classification) or the value (regression), as float `(n,)`."""
        offsets = self.offsets[task_ids]
        cls = (logits.argmax(-1) - offsets).float()
        value = logits.masked_fill(~self.own[task_ids], 0.0).gather(1, offsets[:, None]).squeeze(1)
        return torch.where(self.regression[task_ids], value, cls)
