"""Injection: find target modules in any `nn.Module`, wrap them with experts, freeze what should be frozen, undo.

A short list of builders decides how a module is wrapped; the first that accepts it wins. Injection reports what
it matched, never edits the caller's config, and a target that matches nothing is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loramix.blocks import transformer_blocks
from loramix.config import AdapterConfig
from loramix.errors import InjectionError, did_you_mean
from loramix.experts import (
    AdaptedLayer,
    Conv1DExperts,
    Conv2dExperts,
    LinearExperts,
    ParallelExperts,
    build_experts,
)
from loramix.experts.conv import is_conv2d
from loramix.experts.linear import is_conv1d, is_linear
from loramix.experts.quantized import QuantizedLinearExperts, is_quantized_linear, quantized_kind
from loramix.kinds import check_kinds, scaling
from loramix.routers import Router, router_class

Builder = tuple[str, Callable[[nn.Module], bool], type[AdaptedLayer]]

# (kind, accepts, layer class): the first that accepts a module wraps it (placement 'wrap').
BUILDERS: list[Builder] = [
    # a quantized linear first: bitsandbytes' layers are nn.Linear subclasses that the next builder would take
    ("QLinear", is_quantized_linear, QuantizedLinearExperts),
    ("Linear", is_linear, LinearExperts),
    ("Conv1D", is_conv1d, Conv1DExperts),
    ("Conv2d", is_conv2d, Conv2dExperts),
]
# placement 'parallel': any module, the experts beside it
PARALLEL: Builder = ("parallel", lambda module: True, ParallelExperts)

INFO_ATTR = "_loramix_info"


@dataclass
class InjectionInfo:
    """What loramix keeps on an injected model (a plain attribute, not a module: it holds no parameters)."""

    config: AdapterConfig
    layers: list[AdaptedLayer]
    names: list[str]
    original_requires_grad: dict[str, bool]
    router_input: str | None = None  # module whose output the sample router pools; "" means the model's input
    active_states: list[Any] = field(default_factory=list)  # open routing blocks, innermost last
    routed: list[nn.Module] | None = field(default=None, repr=False)  # `routed_modules`, found once

    @property
    def router_class(self) -> type[Router]:
        return router_class(self.config.router)

    @property
    def model_router(self) -> Router | None:
        """The one router that runs per forward, kept as a submodule of the first adapted layer so that it moves,
        trains and saves with the model without adding a child to the user's model (an `nn.Sequential` would
        call it)."""
        return getattr(self.layers[0], "model_router", None)

    def router_source(self, model: nn.Module) -> nn.Module | None:
        if not self.router_input:
            return None
        return model.get_submodule(self.router_input)

    def routed_modules(self, model: nn.Module) -> list[nn.Module]:
        """`model` and every module on the way to an adapted layer or to the router's input module: those whose
        forward a routed pass runs through, and so the blocks whose activation checkpointing must route. Found
        once: only injection and its undo replace modules, and the undo drops this record."""
        if self.routed is None:
            found = {id(model): model}
            for name in [*self.names, *([self.router_input] if self.router_input else [])]:
                module = model
                for part in name.split("."):
                    module = module._modules[part]  # type: ignore[assignment]
                    found.setdefault(id(module), module)
            self.routed = list(found.values())
        return self.routed


@dataclass
class InjectionReport:
    """What `inject` did: the adapted modules, and the parameter counts."""

    matched: list[tuple[str, str, int, int]] = field(default_factory=list)  # (name, kind, in, out)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    adapter_parameters: int = 0
    trainable_parameters: int = 0
    total_parameters: int = 0

    def __str__(self) -> str:
        lines = [f"loramix adapted {len(self.matched)} modules:"]
        lines += [f"  {name:<50} {kind:<7} {i:>6} -> {o:<6}" for name, kind, i, o in self.matched]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        pct = 100 * self.trainable_parameters / max(self.total_parameters, 1)
        lines.append(
            f"adapter parameters: {self.adapter_parameters:,}; trainable: {self.trainable_parameters:,} of "
            f"{self.total_parameters:,} ({pct:.2f}%)"
        )
        return "\n".join(lines)


def get_info(model: nn.Module) -> InjectionInfo:
    """What :func:`inject` added to `model`: its config, the adapted layers and their names, the model-wide router.

    Example:
        >>> info = loramix.get_info(model)
        >>> info.names[:2], info.config.num_experts
    """
    info = getattr(model, INFO_ATTR, None)
    if info is None:
        raise InjectionError("this model has no loramix adapters: call loramix.inject(model, config) first")
    return info


def is_injected(model: nn.Module) -> bool:
    return getattr(model, INFO_ATTR, None) is not None


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The injected `model` with every adapted layer switched off until the block ends: each returns its base
    layer's output, and no router or expert runs, so the pass costs what the base model's does (a pass that keeps
    every sample on the base inside :func:`loramix.routing` gives the same outputs but still runs them).

    Example:
        >>> with loramix.disabled(model):
        ...     base_out = model(**inputs)
    """
    layers = get_info(model).layers
    before = [layer.disabled for layer in layers]
    try:
        for layer in layers:
            layer.disabled = True
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def saved_modules(model: nn.Module, config: AdapterConfig) -> list[nn.Module]:
    """The modules `config.modules_to_save` names (each entry a module's name or its end), trained beside the
    adapters; an entry that names none is refused."""
    found = []
    for target in config.modules_to_save:
        hits = [m for n, m in model.named_modules() if _matches(n, target)]
        if not hits:
            raise InjectionError(f"modules_to_save entry {target!r} matched no module")
        found += hits
    return found


def _output_head_name(model: nn.Module) -> str | None:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def builders_for(config: AdapterConfig) -> list[Builder]:
    return [PARALLEL] if config.placement == "parallel" else BUILDERS


def _select_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The modules the config asks for, checked against the builders and the excludes."""
    builders = builders_for(config)
    if config.placement == "parallel" and config.targets == "all-linear" and config.target_regex is None:
        raise InjectionError(
            "placement 'parallel' puts experts beside whole modules: name them in targets (e.g. ['mlp']) or "
            "target_regex"
        )
    candidates = [(n, m) for n, m in model.named_modules() if n and not isinstance(m, AdaptedLayer)]
    excluded = set(config.exclude) | set(config.modules_to_save)

    def is_excluded(name: str) -> bool:
        return any(_matches(name, e) or name.startswith(e + ".") for e in excluded)

    if config.target_regex is not None:
        regex = re.compile(config.target_regex)
        chosen = [(n, m) for n, m in candidates if regex.fullmatch(n) and not is_excluded(n)]
        if not chosen:
            example = f", such as {candidates[-1][0]!r}" if candidates else ""
            outside = ", outside exclude and modules_to_save" if excluded else ""
            raise InjectionError(
                f"target_regex {config.target_regex!r} matched no module of the model (it must match a module's "
                f"whole name{example}{outside})"
            )
    elif config.targets == "all-linear":
        head = _output_head_name(model)
        chosen = [
            (n, m)
            for n, m in candidates
            if (is_linear(m) or is_conv1d(m)) and n != head and not is_excluded(n)
        ]
        if not chosen:
            found = any(is_linear(m) or is_conv1d(m) for n, m in candidates if n != head)
            raise InjectionError(
                "targets 'all-linear': every nn.Linear and Conv1D module of the model is in exclude or "
                "modules_to_save"
                if found
                else "targets 'all-linear' found no nn.Linear or Conv1D module in the model"
            )
    else:
        chosen = []
        for target in config.targets:
            hits = [(n, m) for n, m in candidates if _matches(n, target) and not is_excluded(n)]
            if not hits:
                close = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in candidates if any(b[1](m) for b in builders)}
                )
                raise InjectionError(
                    f"target {target!r} matched no module; adaptable module names end in: {', '.join(close[:20])}"
                )
            chosen += [hit for hit in hits if hit not in chosen]
    if config.layers_to_transform is not None:
        chosen = _inside_blocks(model, chosen, config.layers_to_transform)
    for name, module in chosen:
        if not any(accepts(module) for _, accepts, _ in builders):
            kinds = ", ".join(kind for kind, _, _ in builders)
            why = (  # nn.MultiheadAttention reads its out_proj's weight itself and never calls it
                "; it is the out_proj of an nn.MultiheadAttention, which uses its weight without calling it"
                if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)
                else ""
            )
            raise InjectionError(
                f"module '{name}' ({type(module).__name__}) matched a target but loramix can only adapt: {kinds}"
                f"{why}"
            )
    return chosen


def _inside_blocks(
    model: nn.Module, chosen: list[tuple[str, nn.Module]], layers: list[int]
) -> list[tuple[str, nn.Module]]:
    """The chosen targets that lie inside the transformer blocks `layers`."""
    blocks = transformer_blocks(model)
    if blocks is None:
        raise InjectionError(
            "layers_to_transform needs a model whose blocks form one list of config.num_hidden_layers modules; "
            "this one has none: name the modules to adapt in targets instead"
        )
    wrong = [i for i in layers if not 0 <= i < len(blocks)]
    if wrong:
        raise InjectionError(
            f"layers_to_transform: {wrong} are not blocks of the model, which has {len(blocks)} (0 to "
            f"{len(blocks) - 1})"
        )
    inside = {id(module) for i in layers for module in blocks[i].modules()}
    kept = [(name, module) for name, module in chosen if id(module) in inside]
    if not kept:
        raise InjectionError(f"layers_to_transform: blocks {layers} hold none of the targets")
    return kept


def _router_input_module(model: nn.Module, wanted: str) -> tuple[str, nn.Module]:
    """The module `router_input` names: its full name, or the one module whose name ends with it (`embeddings`
    is `bert.embeddings` in a BERT classifier, as a target's suffix names its modules)."""
    names = dict(model.named_modules())
    if wanted in names:
        return wanted, names[wanted]
    ending = [name for name in names if _matches(name, wanted)]
    if len(ending) == 1:
        return ending[0], names[ending[0]]
    if ending:
        raise InjectionError(
            f"router_input {wanted!r} ends the names of {len(ending)} modules ({', '.join(ending[:4])}); give the "
            "full name of one",
            "router_input",
        )
    raise InjectionError(
        f"router_input {wanted!r} is not a module of the model{did_you_mean(wanted, names)}", "router_input"
    )


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embeddings, or those of the first module inside it that has them (a Hugging Face encoder
    inside a user's module); None where none has."""
    for module in model.modules():
        get_in = getattr(module, "get_input_embeddings", None)
        try:
            found = get_in() if callable(get_in) else None
        except NotImplementedError:
            found = None
        if isinstance(found, nn.Module):
            return found
    return None


def _resolve_router_input(model: nn.Module, config: AdapterConfig) -> tuple[str | None, int | None]:
    """Where a model-wide router that pools the input looks, and its width."""
    if not router_class(config.router).pools_model_input:
        return None, None
    if config.router_input is not None:
        name, module = _router_input_module(model, config.router_input)
    else:
        module = _input_embeddings(model)
        if module is None:
            first = next((m for m in model.modules() if is_linear(m) or isinstance(m, nn.Conv2d)), None)
            if first is None:
                raise InjectionError(
                    "cannot tell the sample router's input width; set router_input", "router_input"
                )
            width = first.in_features if is_linear(first) else first.in_channels
            return "", width
        name = next(n for n, m in model.named_modules() if m is module)
    if isinstance(module, nn.Embedding):
        return name, module.embedding_dim
    width = next(
        (getattr(module, a) for a in ("out_features", "out_channels", "embedding_dim") if hasattr(module, a)),
        None,
    )
    # a block (BERT's embeddings): its config's width, the model's, or its last layer norm's
    if width is None:
        configs = (getattr(module, "config", None), getattr(model, "config", None))
        width = next((c.hidden_size for c in configs if hasattr(c, "hidden_size")), None)
    if width is None:
        norms = [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
        width = norms[-1].normalized_shape[-1] if norms else None
    if width is None:
        raise InjectionError(f"cannot tell the output width of router_input {name!r}", "router_input")
    return name, int(width)


def inject(
    model: nn.Module, config: AdapterConfig | dict[str, Any], *, router_network: nn.Module | None = None
) -> InjectionReport:
    """Wrap the target modules of `model` with experts, in place, and return a report of what was done.

    The base is frozen unless `config.train_backbone`; `modules_to_save` (e.g. heads) stay trainable.

    Example:
        >>> report = loramix.inject(model, {"num_experts": 4, "rank": 8, "router": "task", "num_tasks": 4})
        >>> print(report)
    """
    config = check_kinds(AdapterConfig.from_dict(config) if isinstance(config, dict) else config)
    if is_injected(model):
        raise InjectionError("this model already has loramix adapters; call loramix.remove(model) first")
    if config.train_backbone:
        quantized = next(((n, m) for n, m in model.named_modules() if is_quantized_linear(m)), None)
        if quantized is not None:
            raise InjectionError(
                f"train_backbone is set but module '{quantized[0]}' is quantized ({quantized_kind(quantized[1])}): "
                "quantized weights cannot be trained; set train_backbone false, or load the base unquantized"
            )
    targets = _select_targets(model, config)
    router_input, router_width = _resolve_router_input(model, config)
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    report = InjectionReport()
    layers, names = [], []
    built = []  # build every wrapper before installing any, so a builder that refuses leaves the model untouched
    for name, module in targets:
        kind, layer_class = next(
            (kind, cls) for kind, accepts, cls in builders_for(config) if accepts(module)
        )
        wrapped = build_layer(layer_class, module, config, name)
        built.append((name, kind, wrapped.train(module.training)))  # new submodules follow the model's mode
    for name, kind, wrapped in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        layers.append(wrapped)
        names.append(name)
        report.matched.append((name, kind, wrapped.in_features, wrapped.out_features))
    cls = router_class(config.router)
    router = None
    if cls.scope == "model":
        network = {"network": router_network} if router_network is not None else {}
        router = cls.from_config(config, router_width, **network)
        assert router is not None
        layers[0].model_router = router.to(layers[0].experts.device).train(layers[0].training)
    if not config.train_backbone:
        for p in model.parameters():
            p.requires_grad_(False)
    for layer in layers:
        for sub_name, p in layer.named_parameters():
            if not sub_name.startswith("base_layer."):
                p.requires_grad_(True)
    if router is not None:
        router.requires_grad_(True)
    for module in saved_modules(model, config):
        module.requires_grad_(True)
    info = InjectionInfo(config, layers, names, original, router_input)
    for layer in layers:  # each reads the innermost routing block open on the model from this one list
        layer.routing_states = info.active_states
    setattr(model, INFO_ATTR, info)
    report.adapter_parameters = sum(p.numel() for n, p in adapter_state(model).items())
    report.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_parameters = sum(p.numel() for p in model.parameters())
    return report


def build_layer(
    layer_class: type[AdaptedLayer], module: nn.Module, config: AdapterConfig, name: str
) -> AdaptedLayer:
    """One adapted layer: its bank of the config's expert kind, and its own router if the kind lives per layer."""
    in_features, out_features, expert_in = layer_class.features_of(module)
    cls = router_class(config.router)
    check = getattr(layer_class, "check", None)
    if check is not None:
        check(module, name, per_token=cls.per_token, expert_kind=config.experts)
    return layer_class(
        module,
        experts=build_experts(config, expert_in, out_features),
        router=cls.from_config(config, in_features) if cls.scope == "layer" else None,
        gate_source=cls.scope or "none",
        name=name,
        in_features=in_features,
        out_features=out_features,
        scaling=scaling(config),
        dropout=config.dropout,
    )


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters loramix owns (experts, routers), by their stable names in `model.state_dict()`."""
    info = get_info(model)
    return {
        f"{name}.{sub}": p
        for name, layer in zip(info.names, info.layers)
        for sub, p in layer.named_parameters()
        if not sub.startswith("base_layer.")
    }


def adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers loramix owns (a task router's task-to-expert map, which experts a per-task router
    may use), by their names in `model.state_dict()`: saved with the adapters, since growth changes them."""
    info = get_info(model)
    return {
        f"{name}.{sub}": b
        for name, layer in zip(info.names, info.layers)
        for sub, b in layer.state_dict(keep_vars=True).items()
        if not sub.startswith("base_layer.") and not isinstance(b, nn.Parameter)
    }


def unwrap(model: nn.Module) -> nn.Module:
    """Put each adapted layer's base module back as it is now (a merged one keeps what was merged into it), drop
    everything else loramix added, and restore each parameter's requires_grad."""
    info = get_info(model)
    for name, layer in zip(info.names, info.layers):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    if info.model_router is not None:
        del info.layers[0].model_router
    delattr(model, INFO_ATTR)
    for n, p in model.named_parameters():
        p.requires_grad_(info.original_requires_grad.get(n, p.requires_grad))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Put the original modules back (unmerging any merged layer) and restore each parameter's requires_grad."""
    for layer in get_info(model).layers:
        layer.unmerge()
    return unwrap(model)
