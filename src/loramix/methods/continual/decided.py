"""What a continual method answers an input with: the label index within its task and that label's probability,
the score `loramix predict --scores` reports.

Every way of answering ends in the head's decision within the input's task, on logits (a route's answer, `-inf`
outside the task) or on probabilities (answers mixed by the auto-selector's posterior, LAE's element-wise max of two
softmaxes); the score is the decided label's probability in the same terms: the softmax of the logits, the
mixture's weight on the label, or the larger of LAE's two probabilities.

Legend: n samples, L classes of every task.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor


class Decided(NamedTuple):
    labels: Tensor  # (n,) float: label indices within each input's task
    scores: Tensor  # (n,): each decided label's probability


def from_logits(heads: Any, logits: Tensor, task_ids: Tensor) -> Decided:
    """The head's decision on logits `(n, L)` (`-inf` outside each input's task) and its softmax probability."""
    return Decided(heads.decide(logits, task_ids), torch.softmax(logits.float(), -1).amax(-1))


def from_probabilities(heads: Any, probabilities: Tensor, task_ids: Tensor) -> Decided:
    """The head's decision on class probabilities `(n, L)` (zero outside each input's task) and the decided one's."""
    return Decided(heads.decide(probabilities, task_ids), probabilities.amax(-1))


def unanswered(n: int, device: torch.device) -> Decided:
    """`n` answers to fill in (:func:`fill`): labels and scores zero."""
    return Decided(torch.zeros(n, device=device), torch.zeros(n, device=device))


def fill(answers: Decided, rows: Tensor, part: Decided) -> None:
    """Write `part`'s answers into `answers` at `rows` (a bool mask), in place."""
    for column, value in zip(answers, part):
        column[rows] = value.to(column)


def either(condition: Tensor, chosen: Decided, other: Decided) -> Decided:
    """`chosen` where `condition` `(n,)` holds, else `other`."""
    return Decided(*(torch.where(condition, a, b.to(a)) for a, b in zip(chosen, other)))
