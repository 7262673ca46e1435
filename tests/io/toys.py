"""Toy models for the io tests: a tiny BERT (Linear, with a choice of width and depth), a tiny GPT-2 (Conv1D) and a
small CNN (Conv2d without dilation, which PEFT's LoRA conv cannot express), all built from configs with random
weights; plus helpers that give adapters random non-zero weights and route."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

import loramix
from loramix.inject import adapter_state
from tests import models

NUM_TASKS = 3


def tiny_bert(*, hidden_size: int = 32, num_hidden_layers: int = 2) -> nn.Module:
    """BERT's default dropout, weights from torch's generator as it stands (see `bert_pair`)."""
    return models.tiny_bert(None, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, dropout=0.1)


def tiny_gpt2() -> nn.Module:
    """A language model without special token ids (PEFT's export must not depend on them)."""
    return models.tiny_gpt2(None, lm_head=True, dropout=0.1, special_token_id=None)


class SmallCNN(nn.Module):
    """Two convolutions (one strided) and a linear head: `(n, 3, h, w) -> (n, 5)`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def task_settings(router: str, num_experts: int = NUM_TASKS) -> dict[str, Any]:
    """Settings that make a valid config for each router kind."""
    if router == "none":
        return {"router": "none", "num_experts": 1}
    if router in ("task", "poly"):
        return {"router": router, "num_experts": num_experts, "num_tasks": num_experts}
    return {"router": router, "num_experts": num_experts}


@torch.no_grad()
def randomize_adapters(model: nn.Module, std: float = 0.3) -> None:
    """Every loramix parameter (A, B, router weights, poly tables) random and non-zero, so outputs depend on them."""
    for param in adapter_state(model).values():
        param.normal_(std=std)


@contextlib.contextmanager
def routed(model: nn.Module, task_ids: Tensor | None = None) -> Iterator[None]:
    """Route by task when the model needs it, else plainly; gradients off."""
    needs_tasks = loramix.get_info(model).config.router in ("task", "poly")
    with torch.no_grad(), loramix.routing(model, task_ids=task_ids if needs_tasks else None):
        yield


def token_ids(batch: int = 2, length: int = 7, seed: int = 0) -> Tensor:
    return torch.randint(0, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def bert_pair(**kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """(tiny BERT, an untouched copy with the same weights)."""
    torch.manual_seed(0)
    model = tiny_bert(**kwargs)
    return model, copy.deepcopy(model)
