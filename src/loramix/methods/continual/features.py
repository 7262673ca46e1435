"""The auto-selector's feature of an input: always computed by the untouched base model, mean-pooled over real
tokens, from the input embeddings, a given transformer block's input (or two blocks' inputs, side by side), or the
last hidden state.

Legend: n samples, t tokens, d feature width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from loramix.blocks import transformer_blocks
from loramix.context import reroute, routing
from loramix.errors import ConfigError
from loramix.inject import disabled, get_info, is_injected
from loramix.train.model import MODEL_INPUTS

# the token statistics a `hidden` feature ends with (2: selectors fitted before the segments' lengths were added)
STATS = 3


def selector_width(backbone: torch.nn.Module, kind: str, two_blocks: bool = False) -> int:
    """The width of :func:`selector_features` of this kind (`two_blocks`: with an `accept_layer` of its own)."""
    if kind == "embeddings":
        return backbone.get_input_embeddings().embedding_dim
    if kind == "hidden":
        return (2 if two_blocks else 1) * backbone.config.hidden_size + STATS
    return backbone.config.hidden_size


def selector_stats(in_features: int, backbone: torch.nn.Module, two_blocks: bool) -> int:
    """How many token statistics a selector of `in_features` columns reads after the pooled `hidden` states: 3, or
    2 for one saved before the segments' lengths were added (it decides on the features it was fitted on)."""
    stats = in_features - (2 if two_blocks else 1) * backbone.config.hidden_size
    if stats not in (2, STATS):
        raise ConfigError(
            f"the auto-selector reads {in_features} features, not the pooled hidden states of this model "
            f"({backbone.config.hidden_size} wide) and 2 or {STATS} token statistics"
        )
    return stats


class _Reached(Exception):
    """Raised by the hook that stops a forward pass once the wanted hidden state exists."""


@torch.no_grad()
def selector_features(
    backbone: torch.nn.Module,
    batch: dict[str, Tensor],
    kind: str,
    layer: int = 3,
    accept_layer: int | None = None,
    stats: int = STATS,
    tokens: int | None = None,
    precision: str = "float32",
) -> Tensor:
    """The auto-selector's feature of each input `(n, d)`, always from the untouched base model (every adapted
    layer switched off, :func:`loramix.disabled`), mean-pooled over real tokens and L2-normalised:

    - `hidden` (the default): the hidden state entering transformer block `layer` (0: the embedding block's
      output), with three token statistics appended (:func:`hidden_features`). Only the first `layer` blocks
      run. On the ten-task benchmark a middle block told the tasks apart better than the input embeddings or the
      last block, and the statistics separate pairs from single sentences and one kind of pair from another
      (benchmarks/ddas_selector.py). With `accept_layer` (another block), the pooled state entering that block
      follows the first, before the statistics: `(n, 2d + 3)`, both from one pass through the blocks up to the
      later of the two (the selector's acceptance reads the last `d + 3` columns, see
      `AutoSelector(accept_width=...)`);
    - `embeddings`: the input embedding lookup alone (nearly free);
    - `encoder`: the encoder's last hidden state (one more forward pass).

    Two ways to make the base pass cheaper (`ddas_tokens`, `ddas_precision`), each read the same way when the
    selector is fitted and when it chooses: `tokens` k runs the blocks on each input's first k tokens only (the
    embeddings' output, block 0's state, and the token statistics still read the whole input: they cost nothing);
    `precision` bfloat16 runs the pass under autocast (on a CPU with bfloat16 instructions about half the time of
    float32; the features are pooled in float32)."""
    mask = batch["attention_mask"]
    if kind == "embeddings":
        return _pool(backbone.get_input_embeddings()(batch["input_ids"]), mask)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    layers = selector_layers(layer, accept_layer) if kind == "hidden" else [None]
    with torch.autocast(mask.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        states = _base_states(backbone, inputs, layers, tokens)
    if kind != "hidden":
        return _pool(states[0], mask)
    return hidden_features(batch, states, stats)


def _base_states(
    backbone: torch.nn.Module, inputs: dict[str, Tensor], layers: list[int | None], tokens: int | None
) -> list[Tensor]:
    """`base_hidden_states` of `layers`, those after the embeddings' output (block 0's input) over each input's
    first `tokens` tokens only where given (`(n, min(t, tokens), d)`)."""
    later = [layer for layer in layers if layer != 0]
    if tokens is None or tokens >= inputs["attention_mask"].shape[1] or not later:
        return base_hidden_states(backbone, inputs, layers)
    if not bool(inputs["attention_mask"][:, 0].all()):
        raise ConfigError(
            "ddas_tokens: the auto-selector reads each input's first tokens and needs inputs padded on the right "
            "(a tokenizer with padding_side='right'); set ddas_tokens: null"
        )
    cut = {key: value[:, :tokens] for key, value in inputs.items()}
    states = dict(zip(later, base_hidden_states(backbone, cut, later)))
    if 0 in layers:
        states[0] = base_hidden_states(backbone, inputs, [0])[0]
    return [states[layer] for layer in layers]


def selector_layers(layer: int, accept_layer: int | None = None) -> list[int]:
    """The blocks whose input states a `hidden` feature reads, in the feature's order."""
    return [layer] if accept_layer is None or accept_layer == layer else [layer, accept_layer]


def _pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens, in float32, L2-normalised: `(n, t, d) -> (n, d)`; a state of each input's first
    tokens only (`ddas_tokens`) reads the mask over those."""
    weights = mask[:, : hidden.shape[1]].float()[..., None]  # (n, t, 1)
    return F.normalize((hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0), dim=-1)


def hidden_features(batch: dict[str, Tensor], states: list[Tensor], stats: int = STATS) -> Tensor:
    """The `hidden` feature `(n, k*d + 3)` from the states `(n, t, d)` entering k blocks: each pooled, then the log
    token count and, for a sentence pair, the log token counts of its first and second segment (0 and 0 for one
    text, or a model without segment ids). The segments' lengths tell one kind of pair from another (paraphrase
    pairs of two like sentences; a long premise and a short hypothesis) where the pooled states do not. `stats=2`:
    the log token count and a sentence-pair flag, as selectors fitted before the segments' lengths read."""
    mask = batch["attention_mask"]
    pooled = torch.cat([_pool(h, mask) for h in states], -1)  # (n, k*d)
    count = mask.float().sum(1).clamp_min(1.0)  # (n,)
    segment = batch.get("token_type_ids")
    second = (segment * mask).sum(1).float() if segment is not None else torch.zeros_like(count)  # (n,)
    pair = (second > 0).float()
    if stats == 2:
        return torch.cat([pooled, count.log()[:, None], pair[:, None]], -1)
    first = (count - second).clamp_min(1.0).log() * pair
    return torch.cat([pooled, count.log()[:, None], first[:, None], second.clamp_min(1.0).log()[:, None]], -1)


def base_hidden_states(
    backbone: torch.nn.Module,
    inputs: dict[str, Tensor],
    layers: list[int | None],
    route: Tensor | None = None,
    weights: Tensor | None = None,
) -> list[Tensor]:
    """The base model's hidden states `(n, t, d)` entering each block of `layers` (None, or at least the number of
    blocks: the last hidden state), in eval mode, from one forward pass that stops once the last of them exists (a
    hook stops it there, so the later blocks never run); with `route` `(n,)`, the states of the pass along
    those experts instead (mixed by `weights` over the tasks `(n, T)` where given: `routing`'s `task_weights`)."""
    mask = inputs["attention_mask"]
    keep = torch.full((mask.shape[0],), route is None, dtype=torch.bool, device=mask.device)
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
                task_ids=torch.zeros_like(keep, dtype=torch.long) if route is None else route,
                attention_mask=mask,
                keep_base=keep,
                record=False,
                task_weights=weights,
            )
            if is_injected(backbone)
            else contextlib.nullcontext()
        )
        # on the base the adapted layers are switched off too, so no router or expert runs (about half the pass's
        # cost); the routing block stays, so that a block open around this call reads nothing of it
        switched_off = (
            disabled(backbone) if route is None and is_injected(backbone) else contextlib.nullcontext()
        )
        with on_base, switched_off:
            last = backbone(**inputs).last_hidden_state
    except _Reached:
        pass
    finally:
        backbone.train(training)
        for handle in hooks:
            handle.remove()
    return [reached[layer] if layer in inside else last for layer in layers]  # type: ignore[misc]


def encoder_blocks(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    """The backbone's list of transformer blocks (:func:`loramix.blocks.transformer_blocks`)."""
    blocks = transformer_blocks(backbone)
    if blocks is None:
        raise ConfigError(
            "ddas_features: hidden needs a model whose blocks form one list of config.num_hidden_layers modules; "
            "set ddas_features: embeddings or encoder"
        )
    return blocks


def first_adapted_block(backbone: torch.nn.Module) -> int | None:
    """The index of the first transformer block that holds an adapted layer; None when the model has no list of
    blocks or some adapted layer lies outside every block (it may run before block 0)."""
    try:
        blocks = encoder_blocks(backbone)
    except ConfigError:
        return None
    adapted = {id(layer) for layer in get_info(backbone).layers}
    first, inside = None, 0
    for index, block in enumerate(blocks):
        found = sum(id(module) in adapted for module in block.modules())
        if found and first is None:
            first = index
        inside += found
    return first if inside == len(adapted) else None


def reads_in_pass(backbone: torch.nn.Module, layers: list[int]) -> bool:
    """Whether a selector that reads the states entering `layers` can read them inside the inference pass: no
    adapted layer runs before the last of them (see :func:`routed_by_selector`)."""
    first = first_adapted_block(backbone)
    return first is not None and max(layers) <= first


Expansion = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
"""`(route, keep, features) -> (input of each row, route of each row, kept on the base)`, each `(m,)`: the rows
that the pass goes on with after the selector has chosen (:func:`routed_by_selector`)."""
Weighing = Callable[[Tensor, Tensor, Tensor], Tensor]
"""`(route, keep, features) -> weights over the tasks (n, T)` that the adapted blocks mix the experts by."""


@contextlib.contextmanager
def routed_by_selector(
    backbone: torch.nn.Module,
    batch: dict[str, Tensor],
    selector: Any,
    layers: list[int],
    expand: Expansion | None = None,
    weigh: Weighing | None = None,
) -> Iterator[dict[str, Tensor]]:
    """A routing block in which `selector` routes each input during the forward pass itself, from the states
    entering `layers` (a `hidden` feature, see :func:`hidden_features`). Every block before the last of `layers`
    must hold no adapted layer (:func:`first_adapted_block`): those blocks then compute the base model's states
    whatever the route, so the selector reads exactly what a separate base pass would give it, and the pass goes on
    through the adapted blocks along the route it chose. Yields a dict that holds `route` and `keep` `(n,)` once
    the pass has reached the last of `layers`.

    `expand`: the pass goes on with the rows it returns instead of the inputs (an input may take several routes:
    `ddas_mix`), each row from its input's state entering the last of `layers`, so the blocks before it run once
    per input; every per-input tensor a later block receives (the attention mask) is taken row by row too, and
    the backbone's output has one row per expanded row (`rows` in the dict). `weigh`: the adapted blocks mix the
    tasks' experts by the weights over the tasks `(n, T)` it returns instead (`ddas_mix: blend`).

    Example:
        >>> with routed_by_selector(backbone, batch, selector, [0, 3]) as chosen:
        ...     hidden = backbone(**inputs).last_hidden_state
        >>> chosen["route"], chosen["keep"], chosen["features"]  # what the selector read
    """
    if not reads_in_pass(backbone, layers):
        raise ConfigError(
            f"the auto-selector reads blocks {layers} in the pass itself only when no adapted layer runs before "
            f"block {max(layers)} (the first adapted block is {first_adapted_block(backbone)}); select in a base "
            "pass of its own instead"
        )
    blocks = encoder_blocks(backbone)
    stats = selector_stats(selector.in_features, backbone, len(layers) > 1)  # as the selector was fitted
    mask = batch["attention_mask"]
    n = mask.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=mask.device)
    reached: dict[int, Tensor] = {}
    chosen: dict[str, Tensor] = {}
    with routing(
        backbone,
        task_ids=torch.zeros_like(keep, dtype=torch.long),
        attention_mask=mask,
        keep_base=keep,
        record=False,
    ) as state:

        def choose(features: Tensor) -> None:
            with torch.no_grad():
                route, kept = selector(features)
            chosen["route"], chosen["keep"] = route.to(keep.device), kept.to(keep.device)
            chosen["features"] = features
            if expand is None:
                weights = None if weigh is None else weigh(chosen["route"], chosen["keep"], features)
                reroute(backbone, state, chosen["route"], chosen["keep"], task_weights=weights)
                return
            rows, row_route, row_keep = expand(chosen["route"], chosen["keep"], features)
            chosen["rows"] = rows
            reroute(
                backbone, state, row_route, row_keep, None if state.attention_mask is None else mask[rows]
            )

        def hook(index: int) -> Any:
            def read_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
                if index in layers:
                    reached[index] = args[0] if args else kwargs["hidden_states"]
                    if len(reached) == len(set(layers)) and not chosen:
                        choose(hidden_features(batch, [reached[i] for i in layers], stats))
                if "rows" not in chosen:
                    return None
                return _rows(args, chosen["rows"], n), _rows(kwargs, chosen["rows"], n)

            return read_input

        hooked = sorted(set(layers) | (set(range(max(layers), len(blocks))) if expand is not None else set()))
        handles = [blocks[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in hooked]
        try:
            yield chosen
        finally:
            for handle in handles:
                handle.remove()


def _rows(value: Any, rows: Tensor, n: int) -> Any:
    """`value` with every per-input tensor taken at `rows`, inside tuples, lists and dicts too. A per-input tensor
    has a batch dimension of `n` and more dimensions after it (states, masks, rotary tables); a vector of `n` is
    not one (a decoder's `cache_position` holds one entry per token, and a batch may be as long as the text)."""
    if isinstance(value, Tensor):
        return value[rows] if value.dim() > 1 and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, n) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, rows, n) for k, v in value.items()}
    return value
