"""Save and load adapters: `loramix_config.json` + `adapters.safetensors`.

Only what loramix adds (experts, routers), the modules named in `modules_to_save`, and, when the backbone is
trained, the backbone's trainable weights are written, under their names in `model.state_dict()`. The weights are
written first and the JSON last, with the weights' sha256 inside it, so a crash between the two leaves a pair
that refuses to load instead of a silent mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramix.config import AdapterConfig
from loramix.errors import CheckpointError, ConfigError
from loramix.frozen_rows import FrozenRows
from loramix.inject import adapter_buffers, adapter_state, get_info, inject, remove
from loramix.io.files import atomic_save_tensors, atomic_write_json, read_json, read_tensors
from loramix.kinds import check_kinds

FORMAT_VERSION = 1
CONFIG_FILE = "loramix_config.json"
WEIGHTS_FILE = "adapters.safetensors"


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a save holds: loramix's parameters plus whatever else is trainable (heads, backbone)."""
    info = get_info(model)
    for layer in info.layers:  # frozen experts and frozen task routers alike
        for module in layer.modules():
            if isinstance(module, FrozenRows):
                module.sync_frozen_into_parameters()
    state = {**adapter_state(model), **adapter_buffers(model)}
    for name, param in model.named_parameters():
        if param.requires_grad and name not in state:
            state[name] = param
    return state


def save(
    model: nn.Module,
    directory: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's adapters to `directory` (created if needed); returns the directory.

    `metadata` (JSON-able) and `extra_tensors` (e.g. task heads kept outside the model) travel with the adapters.

    Example:
        >>> loramix.save(model, "runs/mola")
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"{directory} is a file; adapters are saved into a folder: pass a folder's path"
        )
    info = get_info(model)
    tensors = saved_state(model)
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra.{key}"] = value
    for layer in info.layers:  # merged layers would save a shifted base weight
        if layer.merged_gate is not None:
            raise CheckpointError(f"layer '{layer.layer_name}' is merged; unmerge before saving")
    digest = atomic_save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "loramix"})
    atomic_write_json(
        directory / CONFIG_FILE,
        {
            "library": "loramix",
            "format_version": FORMAT_VERSION,
            "config": info.config.to_dict(),
            "layers": info.names,
            "frozen_experts": {
                name: layer.experts.frozen_experts
                for name, layer in zip(info.names, info.layers)
                if layer.experts.frozen_experts
            },
            "frozen_routers": {
                name: layer.router.frozen_rows
                for name, layer in zip(info.names, info.layers)
                if isinstance(layer.router, FrozenRows) and layer.router.frozen_rows
            },
            "weights_sha256": digest,
            "tensors": sorted(tensors),
            "metadata": metadata or {},
        },
    )
    return directory


def read_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The verified JSON record and tensors of a save, without touching any model."""
    directory = Path(directory)
    if not directory.is_dir():
        if directory.is_file():
            raise CheckpointError(
                f"{directory}: a file; pass the adapter directory that holds it ({directory.parent})"
            )
        raise CheckpointError(f"{directory}: no such adapter directory")
    if not (directory / CONFIG_FILE).is_file() and (directory / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{directory}: a PEFT adapter, not a loramix save; bring it in with loramix.import_peft(model, "
            f"{str(directory)!r})"
        )
    if not (directory / CONFIG_FILE).is_file() and (directory / "adapter" / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{directory}: a run folder; its adapters are in {directory / 'adapter'} (load that folder)"
        )
    record = read_json(directory / CONFIG_FILE)
    version = record.get("format_version")
    if record.get("library") != "loramix" or not isinstance(version, int):
        raise CheckpointError(f"{directory / CONFIG_FILE}: not a loramix adapter config")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: format version {version} is newer than this loramix reads "
            f"({FORMAT_VERSION}); upgrade loramix"
        )
    tensors = read_tensors(directory / WEIGHTS_FILE, record.get("weights_sha256"))
    listed = set(record.get("tensors", tensors))
    if listed != set(tensors):
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: holds other tensors than {CONFIG_FILE} lists")
    return record, tensors


def config_of(record: dict[str, Any], where: Path) -> AdapterConfig:
    try:
        return check_kinds(AdapterConfig.from_dict(record.get("config", {})))
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def load(model: nn.Module, directory: str | Path, *, router_network: nn.Module | None = None) -> nn.Module:
    """Inject the saved adapters into an untouched `model` and load their weights; returns the model.

    Example:
        >>> model = loramix.load(AutoModel.from_pretrained(name), "runs/mola")
    """
    directory = Path(directory)
    record, tensors = read_checkpoint(directory)
    config = config_of(record, directory / CONFIG_FILE)
    inject(model, config, router_network=router_network)
    try:
        restore(model, directory, record, tensors)
    except BaseException:
        remove(model)  # a load that fails leaves the model as it was, so the caller can retry or fall back
        raise
    return model


def load_into(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a save into a model that already carries the same adapters (a training run resumed from its
    checkpoint, the best checkpoint restored at its end); returns the model. Adapters of another config are
    refused, naming the file."""
    directory = Path(directory)
    record, tensors = read_checkpoint(directory)
    if config_of(record, directory / CONFIG_FILE) != get_info(model).config:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: saved with other adapter settings than this model carries"
        )
    restore(model, directory, record, tensors)
    return model


def restore(
    model: nn.Module, directory: Path, record: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Copy a verified save's tensors into the model's adapters and freeze what was frozen."""
    info = get_info(model)
    if record.get("layers") != info.names:
        missing = sorted(set(record.get("layers", [])) - set(info.names))
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: the adapters were saved for other layers than this model has"
            + (f" (not found here: {', '.join(missing[:5])})" if missing else "")
        )
    load_tensors(
        model, {k: v for k, v in tensors.items() if not k.startswith("extra.")}, directory / WEIGHTS_FILE
    )
    for name, experts in record.get("frozen_experts", {}).items():
        info.layers[info.names.index(name)].experts.freeze_experts(experts)
    for name, rows in record.get("frozen_routers", {}).items():
        router = info.layers[info.names.index(name)].router
        if not isinstance(router, FrozenRows):
            raise CheckpointError(
                f"{directory / CONFIG_FILE}: layer '{name}' has no router whose rows freeze"
            )
        router.freeze_rows(rows)


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy tensors into the model's parameters (and loramix's buffers) by name, checking names and shapes first.
    Buffers are optional: adapters saved before they were written load with the defaults."""
    params = {**dict(model.named_parameters()), **adapter_buffers(model)}
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise CheckpointError(
            f"{where}: tensors that this model has no parameter for: {', '.join(unknown[:5])}"
        )
    missing = sorted(set(adapter_state(model)) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: adapter tensors missing from the file: {', '.join(missing[:5])}")
    for name, value in tensors.items():
        if params[name].shape != value.shape:
            raise CheckpointError(
                f"{where}: tensor '{name}' has shape {tuple(value.shape)} but the model expects "
                f"{tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
