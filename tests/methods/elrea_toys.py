"""Tiny models and batches for the ELREA tests, built from configs (never downloaded).

Legend: n samples, t tokens.
"""

from __future__ import annotations

import torch
import transformers
from torch import Tensor, nn

import loramix

transformers.logging.set_verbosity_error()

VOCAB = 99


def tiny_bert(num_labels: int = 3, seed: int = 0) -> nn.Module:
    """A 2-layer BERT with a linear classification head, in eval mode (dropout off)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=VOCAB,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 language model (Conv1D layers), in eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).eval()


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
