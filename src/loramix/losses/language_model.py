"""The causal LM's next-token loss, per sample, on the labelled tokens only (generation tasks train on the response,
ELREA's features read the prompt).

Legend: n samples, t tokens, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # the label of a token without loss, as torch's cross_entropy skips


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample next-token loss `(n,)`: the mean over the sample's labelled tokens (labels `IGNORE` are
    skipped). `logits` `(n, t, v)` at position t predict `labels[:, t + 1]` (the Hugging Face convention). A sample
    with no labelled token has loss 0."""
    total, count = token_nll(logits, labels)
    return total / count.clamp_min(1)


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample summed next-token loss and labelled-token count, `(n,)` each: what a perplexity over many
    batches adds up (`exp(sum of losses / sum of counts)`)."""
    targets = labels[:, 1:]  # (n, t-1)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none")
    mask = targets != IGNORE
    return torch.where(mask, nll, torch.zeros_like(nll)).sum(1), mask.sum(1)
