"""Toy models and helpers shared by the test suites: tiny sizes, built from configs, never downloaded.

Legend: n samples, t tokens, i / o features, c channels, e experts.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import Tensor, nn

import loramix
from loramix.experts import AdaptedLayer
from loramix.inject import get_info

transformers.logging.set_verbosity_error()

BATCH, TOKENS, FEATURES = 4, 5, 6

# The smallest config of each router kind that has more than one expert where it can.
ROUTER_CONFIGS: dict[str, dict[str, Any]] = {
    "none": {"num_experts": 1},
    "task": {"num_experts": 3, "num_tasks": 3},
    "poly": {"num_experts": 3, "num_tasks": 2},
    "token": {"num_experts": 3},
    "sample": {"num_experts": 3, "router_hidden": 8},
}
ROUTERS = list(ROUTER_CONFIGS)
SHARES = ["none", "A", "B"]


class MLP(nn.Module):
    """A plain MLP on `(n, t, i)` inputs (no `get_input_embeddings`: the sample router pools the model input)."""

    def __init__(self, in_features: int = FEATURES, hidden: int = 12, out_features: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.act(self.fc2(self.act(self.fc1(x))))))


class CNN(nn.Module):
    """Two Conv2d layers (one padded, one strided and dilated) and a linear head, on `(n, c, h, w)` images."""

    def __init__(self, channels: int = 3, width: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, dilation=2)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (n, c, h, w)
        return self.head(h.mean((2, 3)))


def tiny_bert(
    seed: int | None = 0,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    dropout: float = 0.0,
    num_labels: int | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A tiny BERT encoder (or, with `num_labels`, a sequence classifier), in eval mode; `seed=None` draws its
    weights from torch's generator as it stands."""
    if seed is not None:
        torch.manual_seed(seed)
    extra: dict[str, Any] = {} if num_labels is None else {"num_labels": num_labels}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    config = transformers.BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=99,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **extra,
    )
    model_class = transformers.BertModel if num_labels is None else transformers.BertForSequenceClassification
    return model_class(config).eval()


def tiny_gpt2(
    seed: int | None = 0,
    *,
    lm_head: bool = False,
    dropout: float = 0.0,
    special_token_id: int | None = 0,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A tiny GPT-2 (Conv1D layers), with or without its LM head, in eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    extra: dict[str, Any] = (
        {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    )
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=99,
        n_positions=64,
        bos_token_id=special_token_id,
        eos_token_id=special_token_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        **extra,
    )
    model = transformers.GPT2LMHeadModel(config) if lm_head else transformers.GPT2Model(config)
    return model.eval()


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP()


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CNN()


def mlp_inputs(n: int = BATCH, seed: int = 1) -> Tensor:
    return torch.randn(n, TOKENS, FEATURES, generator=torch.Generator().manual_seed(seed))


def cnn_inputs(n: int = BATCH, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, 9, 9, generator=torch.Generator().manual_seed(seed))


def text_inputs(n: int = BATCH, length: int = 7, seed: int = 1) -> dict[str, Tensor]:
    """Token ids and an attention mask whose last samples are padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 99, (n, length), generator=generator)
    attention_mask = torch.ones(n, length, dtype=torch.long)
    for row in range(1, n):
        attention_mask[row, length - row :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def adapter_config(router: str, share: str = "none", **overrides: Any) -> loramix.AdapterConfig:
    return loramix.AdapterConfig(**{**ROUTER_CONFIGS[router], "router": router, "share": share, **overrides})


def task_ids_for(model: nn.Module, n: int) -> Tensor | None:
    """Task ids covering every task (0, 1, 2, 0, ...) when the model routes by task, else None."""
    config = get_info(model).config
    if config.router not in ("task", "poly"):
        return None
    assert config.num_tasks is not None
    return torch.arange(n) % config.num_tasks


def call(model: nn.Module, inputs: Tensor | dict[str, Tensor]) -> Tensor:
    """The model's main output tensor, whatever kind of model it is."""
    if isinstance(inputs, dict):
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state
    return model(inputs)


def run(
    model: nn.Module, inputs: Tensor | dict[str, Tensor], *, task_ids: Tensor | None = None
) -> tuple[Tensor, loramix.RoutingState]:
    """One forward pass inside the routing context, with task ids covering every task by default."""
    n = (inputs["input_ids"] if isinstance(inputs, dict) else inputs).shape[0]
    if task_ids is None:
        task_ids = task_ids_for(model, n)
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    with loramix.routing(model, task_ids=task_ids, attention_mask=mask) as state:
        out = call(model, inputs)
    return out, state


def adapted_names(model: nn.Module) -> list[str]:
    """The names of the modules loramix wrapped."""
    return [name for name, module in model.named_modules() if isinstance(module, AdaptedLayer)]


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 2, std: float = 0.3) -> None:
    """Make every B (and Poly table) non-zero so that the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    for layer in get_info(model).layers:
        layer.experts.B.copy_(torch.randn(layer.experts.B.shape, generator=generator) * std)
        table = getattr(layer.router, "table", None)
        if table is not None:
            table.copy_(torch.randn(table.shape, generator=generator))
