"""Training checkpoints for exact resumption: trainable weights, optimizer, step and RNG state.

A checkpoint is a directory written under a temporary name and renamed when complete; `latest` names the newest
complete one. Weights and RNG state are safetensors; the optimizer state is read back with
`torch.load(weights_only=True)`, which cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramix.errors import CheckpointError
from loramix.io.files import atomic_save_tensors, atomic_write_bytes, read_json, read_tensors

LATEST = "latest"


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{name}": p.detach()
        for prefix, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def save_training_checkpoint(
    root: Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write `root/step-NNNNNN/` atomically and point `root/latest` at it; returns the directory."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:06d}."))
    try:
        atomic_save_tensors(tmp / "weights.safetensors", trainable_state(modules))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        atomic_save_tensors(tmp / "rng.safetensors", rng)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_bytes(tmp / "state.json", json.dumps({"step": step, **state}).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(root / LATEST, final.name.encode())
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def load_training_checkpoint(
    path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from `path`; returns the saved state (step, history, ...)."""
    weights = read_tensors(path / "weights.safetensors")
    params = {
        f"{prefix}.{name}": p for prefix, module in modules.items() for name, p in module.named_parameters()
    }
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(
            f"{path}: tensors for parameters this run does not have: {', '.join(unknown[:5])}"
        )
    with torch.no_grad():
        for name, value in weights.items():
            if params[name].shape != value.shape:
                raise CheckpointError(
                    f"{path}: '{name}' has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}"
                )
            params[name].copy_(value)
    try:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / 'optimizer.pt'}: cannot restore the optimizer ({exc})") from None
    rng = read_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return read_json(path / "state.json")
