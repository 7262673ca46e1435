"""Training checkpoints for exact resumption: trainable weights, optimizer, step and RNG state.

A checkpoint is a folder `step-NNNNNN/`, filled under a temporary name (`.step-NNNNNN.XXXX.tmp`, which a resume
removes if a crash left it) and renamed when complete; `latest` names the newest. Its `manifest.json`, written
last, records every other file's sha256 and size, so a file damaged in place (same size, other bytes) is found
before anything is loaded. A resume takes the newest checkpoint that verifies and says which it skipped and why;
the newest `keep` are kept so that there is one to fall back to, and older ones go once a newer one is safely on
disk.

Weights and RNG state are safetensors; the optimizer state is read back with `torch.load(weights_only=True)`,
which cannot run code. Every process's RNG state is saved (their dropout draws differ) and each gets its own back.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramix.errors import CheckpointError
from loramix.io.files import (
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    make_temp_dir,
    read_json,
    read_tensors,
    sha256_of,
)

LATEST = "latest"
MANIFEST = "manifest.json"
FILES = ("weights.safetensors", "rng.safetensors", "optimizer.pt", "state.json")
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{name}": p.detach()
        for prefix, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def _named_parameters(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {
        f"{prefix}.{name}": p for prefix, module in modules.items() for name, p in module.named_parameters()
    }


def check_trainable(modules: dict[str, nn.Module], weights: dict[str, torch.Tensor], path: Path) -> None:
    """A `CheckpointError` naming `path` where `weights` (a :func:`trainable_state`) do not fit `modules`."""
    params = _named_parameters(modules)
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(
            f"{path}: tensors for parameters this run does not have: {', '.join(unknown[:5])}"
        )
    for name, value in weights.items():
        if params[name].shape != value.shape:
            raise CheckpointError(
                f"{path}: '{name}' has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}"
            )


def restore_trainable(modules: dict[str, nn.Module], weights: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state` back into `modules`' parameters (checked by :func:`check_trainable`)."""
    params = _named_parameters(modules)
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random state: the CPU generator's, and the current GPU's when there is one."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_training_checkpoint(
    root: Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
    keep: int = 2,
) -> Path:
    """Write `root/step-NNNNNN/` atomically, point `root/latest` at it and keep the newest `keep` checkpoints;
    returns the folder. `rng_states` holds every process's :func:`rng_state` (default: this one's)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (got {keep})")
    rng_states = [rng_state()] if rng_states is None else rng_states
    final = root / f"step-{step:06d}"
    tmp = make_temp_dir(root, f".{final.name}.")
    try:
        atomic_save_tensors(tmp / "weights.safetensors", trainable_state(modules))
        atomic_save_tensors(
            tmp / "rng.safetensors",
            {
                f"{kind}.{rank}": value
                for rank, states in enumerate(rng_states)
                for kind, value in states.items()
            },
        )
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        atomic_write_bytes(tmp / "optimizer.pt", buffer.getvalue())
        record = {"step": step, "processes": len(rng_states), **state}
        atomic_write_bytes(tmp / "state.json", json.dumps(record).encode())
        atomic_write_json(
            tmp / MANIFEST,
            {
                "format_version": FORMAT_VERSION,
                "files": {
                    name: {"sha256": sha256_of(tmp / name), "size": (tmp / name).stat().st_size}
                    for name in FILES
                },
            },
        )
        fsync_dir(tmp)
        replaced = None
        if final.exists():
            # the same step saved again: move the old one aside, where a resume would clean it up after a crash
            replaced = make_temp_dir(root, f".{final.name}.replaced.")
            os.replace(final, replaced / final.name)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(root / LATEST, final.name.encode())
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    prune_checkpoints(root, step, keep)
    return final


def checkpoint_folders(root: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in `root`, (step, folder), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`. Those of later steps go too: they belong to a run that
    this one replaced or went back from (a damaged one, skipped on resume), and a later resume must not pick one."""
    folders = checkpoint_folders(root)
    kept = [path for s, path in folders if s <= step][-keep:]
    for _, path in folders:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def remove_unfinished(root: Path) -> list[Path]:
    """Remove what interrupted saves left in `root`: `.step-*` folders and half-written `.latest.*.tmp` files.
    Only the process that saves may call this, and not while it saves."""
    if not root.is_dir():
        return []
    removed = []
    for path in [*root.glob(".step-*"), *root.glob(f".{LATEST}.*.tmp")]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def verify_checkpoint(path: Path) -> None:
    """Check every file of a checkpoint against its manifest; a CheckpointError names the first that fails."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"{manifest}: file not found, so the checkpoint's files cannot be checked (a checkpoint written "
            "before loramix recorded checksums, or a damaged one)"
        )
    record = read_json(manifest)
    files = record.get("files")
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        raise CheckpointError(f"{manifest}: no 'files' mapping of file names to checksums")
    missing = [name for name in FILES if name not in files]
    if missing:
        raise CheckpointError(f"{manifest}: lists no checksum for {', '.join(missing)}")
    for name, entry in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{manifest}: {name!r} is not a file name in the checkpoint's folder")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found")
        size = file.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(
                f"{file}: {size} bytes, but {MANIFEST} recorded {entry.get('size')}: the file is truncated or from "
                "another save"
            )
        if sha256_of(file) != entry.get("sha256"):
            raise CheckpointError(
                f"{file}: checksum does not match the one in {MANIFEST}: the file was damaged or overwritten after "
                "it was saved"
            )


def newest_good_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in `root` that verifies, and why each newer one was skipped; (None, []) when there is
    none at all. Checkpoints that all fail to verify are an error that lists each: starting over silently would
    throw away a run."""
    skipped = []
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not _STEP_DIR.fullmatch(name) or not (root / name).is_dir():
            skipped.append(f"{pointer} names {name}, which does not exist")
    for _, path in reversed(checkpoint_folders(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        return path, skipped
    if skipped:
        raise CheckpointError(
            f"no checkpoint in {root} can be resumed from: {'; '.join(skipped)}. Restore the files, or remove "
            f"{root} to train from step 0"
        )
    return None, []


def check_resumable(root: Path, processes: int) -> None:
    """Refuse now what resuming from `root` would refuse once the model is built: checkpoints of which none
    verifies, or a newest good one written by another number of processes; so that a refused resume has written
    nothing (its changed config, say) by then."""
    path = newest_good_checkpoint(root)[0] if root.is_dir() else None
    if path is not None:
        _check_processes(path, read_json(path / "state.json"), processes)


def _check_processes(path: Path, state: dict[str, Any], processes: int) -> None:
    saved_processes = int(state.get("processes", 1))
    if saved_processes != processes:
        raise CheckpointError(
            f"{path} was written by a run of {saved_processes} process(es), and this one has {processes}: resume "
            f"with {saved_processes} (each step takes one batch per process, and each process has its own random "
            "state), or train from step 0 in another output directory"
        )


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint in `root` that verifies (see :func:`newest_good_checkpoint`); None when none exists."""
    return newest_good_checkpoint(root)[0]


def load_training_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    *,
    process_index: int = 0,
    processes: int = 1,
    verified: bool = False,
) -> dict[str, Any]:
    """Restore weights, optimizer and this process's RNG from `path`; returns the saved state (step, history,
    ...). The files are checked against the manifest first unless the caller just did (`verified`)."""
    if not verified:
        verify_checkpoint(path)
    state = read_json(path / "state.json")
    _check_processes(path, state, processes)
    weights = read_tensors(path / "weights.safetensors")
    check_trainable(modules, weights, path)
    optimizer_file = path / "optimizer.pt"
    try:
        saved = torch.load(optimizer_file, weights_only=True, map_location="cpu")
    except Exception as exc:
        # whatever a damaged or foreign file makes the reader raise; nothing in the file has run
        raise CheckpointError(
            f"{optimizer_file}: not an optimizer state that can be read safely ({_reason(exc)}); only tensors and "
            "plain containers are read back. Remove the checkpoint folder to resume from an older one"
        ) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{optimizer_file}: holds a {type(saved).__name__}, not an optimizer state")
    rng = read_tensors(path / "rng.safetensors")
    own = f"torch.{process_index}" if f"torch.{process_index}" in rng else "torch"
    if own not in rng:
        raise CheckpointError(f"{path / 'rng.safetensors'}: no random state for process {process_index}")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{optimizer_file}: cannot restore the optimizer ({_reason(exc)})") from None
    restore_trainable(modules, weights)
    torch.set_rng_state(rng[own])
    cuda = own.replace("torch", "cuda")
    if cuda in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[cuda])
    return state


def _reason(exc: BaseException) -> str:
    """The line of a reader's error that says what was wrong (the safe unpickler's comes amid advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error" in line:
            return line
    return lines[0] if lines else type(exc).__name__
