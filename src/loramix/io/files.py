"""Atomic file writes and safe reads: a crash never leaves a half-written file under the final name.

Temporary files and folders come from `mkstemp`/`mkdtemp`, which make them private (0600, 0700); what is renamed
into place gets the modes any other file of the user's gets (0666 and 0777 less the umask), so that a team sharing a
run directory can read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loramix.errors import CheckpointError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask. Read from /proc where it can be: setting it to read it back (the only portable way)
    changes it for every thread for a moment, so there it is set to the strictest mask meanwhile."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a file the user creates gets: 0666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a folder the user creates gets: 0777 less the umask."""
    return 0o777 & ~current_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder `parent/<prefix>XXXX.tmp` with the user's usual folder mode, to fill and then rename into
    place. Its name says it is unfinished, so that what a crash leaves behind can be found and removed."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
    os.chmod(path, folder_mode())
    return path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write and flush to disk; renamed over `path` when the block
    ends, removed if it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    with _replacing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: Path, obj: Any, *, sort_keys: bool = True) -> None:
    """`obj` as indented JSON, atomically: its keys sorted (the same text however the dict was built), or with
    `sort_keys=False` in their own order (a report's tasks as the run's config lists them)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Save tensors as safetensors atomically; returns the file's sha256 so a config can vouch for it."""
    with _replacing(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        digest = sha256_of(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    return digest


def tensors_sha256(tensors: dict[str, torch.Tensor], text: str = "") -> str:
    """A digest of tensors (names, dtypes, shapes, bytes) and `text`, for the file that holds them to carry in its
    own metadata, where a digest of the whole file cannot be."""
    digest = hashlib.sha256(text.encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu().reshape(-1)
        digest.update(f"|{key}|{tensor.dtype}|{tuple(tensors[key].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return data


def read_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never a pickle), checking its checksum when one is known."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if expected_sha256 is not None and sha256_of(path) != expected_sha256:
        raise CheckpointError(
            f"{path}: checksum does not match the one recorded beside it; the file is corrupted, truncated or "
            "from another save"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


@contextmanager
def atomic_folder(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; renamed to `path` when the block ends without error and removed
    when it does not, so that a reader (or a crash) never finds a half-written `path`.

    `path` may be missing or an empty folder. A folder with entries is swapped out whole only when `replace` is
    true (the caller has checked it holds an earlier copy of the same kind); it is renamed aside before the new one
    is renamed in, and removed after.

    Example:
        >>> with atomic_folder(Path("exported")) as tmp:
        ...     (tmp / "a.json").write_text("{}")
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not replace)):
        raise CheckpointError(f"{path} exists and is not an empty folder; pass a new or empty folder")
    tmp = make_temp_dir(path.parent, f".{path.name}-")
    old: Path | None = None
    try:
        yield tmp
        if path.is_dir() and any(path.iterdir()):
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-", suffix=".old"))
            os.replace(path, old)  # onto the empty folder mkdtemp made
        elif path.is_dir():
            path.rmdir()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():  # the swap failed half-way: put the earlier copy back
            os.replace(old, path)
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
