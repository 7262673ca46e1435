"""The auto-selector's feature of an input: always computed by the untouched base model, mean-pooled over real
tokens, from the input embeddings, a given transformer block's input (or two blocks' inputs, side by side), or the
last hidden state.

Legend: n samples, t tokens, d feature width.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from loramix.context import routing
from loramix.errors import ConfigError
from loramix.inject import is_injected
from loramix.train.model import MODEL_INPUTS


def selector_width(backbone: torch.nn.Module, kind: str, two_blocks: bool = False) -> int:
    """The width of :func:`selector_features` of this kind (`two_blocks`: with an `accept_layer` of its own)."""
    if kind == "embeddings":
        return backbone.get_input_embeddings().embedding_dim
    if kind == "hidden":
        return (2 if two_blocks else 1) * backbone.config.hidden_size + 2
    return backbone.config.hidden_size


class _Reached(Exception):
    """Raised by the hook that stops a forward pass once the wanted hidden state exists."""


@torch.no_grad()
def selector_features(
    backbone: torch.nn.Module,
    batch: dict[str, Tensor],
    kind: str,
    layer: int = 3,
    accept_layer: int | None = None,
) -> Tensor:
    """The auto-selector's feature of each input `(n, d)`, always from the untouched base model (every sample kept
    on the base inside a routing block of its own), mean-pooled over real tokens and L2-normalised:

    - `hidden` (the default): the hidden state entering transformer block `layer` (0: the embedding block's
      output), with two token statistics appended: the log token count and whether the input is a sentence pair
      (any token in the second segment). Only the first `layer` blocks run. On the ten-task benchmark a middle
      block told the tasks apart better than the input embeddings or the last block, and the two statistics
      separate pairs from single sentences (benchmarks/ddas_selector.py). With `accept_layer` (another block),
      the pooled state entering that block follows the first, before the two statistics: `(n, 2d + 2)`, both from
      one pass through the blocks up to the later of the two (the selector's acceptance reads the last `d + 2`
      columns, see `AutoSelector(accept_width=...)`);
    - `embeddings`: the input embedding lookup alone (nearly free);
    - `encoder`: the encoder's last hidden state (one more forward pass)."""
    mask = batch["attention_mask"]
    weights = mask.float()[..., None]  # (n, t, 1)

    def pool(hidden: Tensor) -> Tensor:
        return F.normalize(
            (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0), dim=-1
        )  # (n, d)

    if kind == "embeddings":
        return pool(backbone.get_input_embeddings()(batch["input_ids"]))
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if kind != "hidden":
        return pool(base_hidden_state(backbone, inputs, None))
    layers = [layer] if accept_layer is None or accept_layer == layer else [layer, accept_layer]
    pooled = torch.cat([pool(h) for h in base_hidden_states(backbone, inputs, layers)], -1)  # (n, d or 2d)
    count = weights.sum((1, 2)).clamp_min(1.0).log()  # (n,)
    second = batch.get("token_type_ids")
    pair = (second * mask).any(-1).float() if second is not None else torch.zeros_like(count)
    return torch.cat([pooled, count[:, None], pair[:, None]], -1)  # (n, d + 2) or (n, 2d + 2)


def base_hidden_state(backbone: torch.nn.Module, inputs: dict[str, Tensor], layer: int | None) -> Tensor:
    """The base model's hidden state `(n, t, d)` entering block `layer` (None, or at least the number of blocks:
    the last hidden state), in eval mode; a hook stops the forward pass there, so the later blocks never run."""
    return base_hidden_states(backbone, inputs, [layer])[0]


def base_hidden_states(
    backbone: torch.nn.Module, inputs: dict[str, Tensor], layers: list[int | None]
) -> list[Tensor]:
    """The base model's hidden states `(n, t, d)` entering each block of `layers` (see `base_hidden_state`), from
    one forward pass that stops once the last of them exists."""
    mask = inputs["attention_mask"]
    keep = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    blocks = encoder_blocks(backbone) if any(layer is not None for layer in layers) else torch.nn.ModuleList()
    inside = {layer for layer in layers if layer is not None and layer < len(blocks)}
    stop = set(layers) <= inside  # no wanted state is the last one: stop once all exist
    reached: dict[int, Tensor] = {}

    def hook(index: int) -> Any:
        def keep_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            reached[index] = args[0] if args else kwargs["hidden_states"]
            if stop and len(reached) == len(inside):
                raise _Reached

        return keep_input

    hooks = [
        blocks[index].register_forward_pre_hook(hook(index), with_kwargs=True) for index in sorted(inside)
    ]
    training = backbone.training
    backbone.eval()  # the base model's feature, without dropout, whatever mode the caller left the model in
    last = None
    try:
        on_base = (
            routing(
                backbone,
                task_ids=torch.zeros_like(keep, dtype=torch.long),
                attention_mask=mask,
                keep_base=keep,
                record=False,
            )
            if is_injected(backbone)
            else contextlib.nullcontext()
        )
        with on_base:
            last = backbone(**inputs).last_hidden_state
    except _Reached:
        pass
    finally:
        backbone.train(training)
        for handle in hooks:
            handle.remove()
    return [reached[layer] if layer in inside else last for layer in layers]  # type: ignore[misc]


def encoder_blocks(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    """The backbone's list of transformer blocks: the first module list as long as `config.num_hidden_layers`."""
    count = getattr(backbone.config, "num_hidden_layers", None)
    for module in backbone.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ConfigError(
        "ddas_features: hidden needs a model whose blocks form one list of config.num_hidden_layers modules; "
        "set ddas_features: embeddings or encoder"
    )
