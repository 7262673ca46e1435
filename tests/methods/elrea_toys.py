"""Tiny models and batches for the ELREA tests, built from configs (never downloaded).

Legend: n samples, t tokens.
"""

from __future__ import annotations

import torch
import transformers
from torch import Tensor, nn

import loramix
from tests import models

transformers.logging.set_verbosity_error()

VOCAB = 99


def tiny_bert(num_labels: int = 3, seed: int = 0) -> nn.Module:
    """A 2-layer BERT with a linear classification head, eager attention (for `torch.func.vmap`)."""
    return models.tiny_bert(seed, num_labels=num_labels, dropout=0.1, attn_implementation="eager")


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 language model (Conv1D layers), eager attention."""
    return models.tiny_gpt2(seed, lm_head=True, dropout=0.1, attn_implementation="eager")


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Non-zero A and B everywhere (B starts at zero, which would make every dL/dA vanish)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in loramix.adapter_state(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded token ids `(n, t)` (pad id 0) and the attention mask `(n, t)`."""
    generator = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=generator)
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask
