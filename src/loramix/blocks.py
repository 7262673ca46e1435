"""The list of a transformer's blocks, found without knowing the architecture: the first `nn.ModuleList` as long as
the model's `config.num_hidden_layers` (BERT's `encoder.layer`, GPT-2's `h`, Llama's `layers`, ...)."""

from __future__ import annotations

from torch import nn


def transformer_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's blocks in order, or None when it has no `config.num_hidden_layers` or no list that long."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if count is None:
        return None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    return None
