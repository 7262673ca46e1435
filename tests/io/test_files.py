"""Atomic writes and safe reads: a failed write leaves the old file and no temp file; reads check what they read
and never unpickle."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import loramix.io.files as files
from loramix import CheckpointError


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_bytes_creates_parents_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "file.bin"
    files.atomic_write_bytes(path, b"first")
    files.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert names(path.parent) == ["file.bin"]


@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
def test_failed_atomic_write_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    path = tmp_path / "file.json"
    files.atomic_write_bytes(path, b"old")

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError(f"crash in {stage}")

    with monkeypatch.context() as patch:
        if stage == "write":
            # the module's own `open`, ahead of the builtin it calls
            patch.setattr(
                files, "open", lambda name, mode: _FailingHandle(builtins.open(name, mode)), raising=False
            )
        else:
            patch.setattr(files.os, stage, boom)
        with pytest.raises(OSError, match="crash in"):
            files.atomic_write_bytes(path, b"new")

    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["file.json"]


class _FailingHandle:
    """A file object that writes half the data, then fails, as a full disk would."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __enter__(self) -> _FailingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def write(self, data: bytes) -> None:
        self.handle.write(data[: len(data) // 2])
        raise OSError("crash in write")


def test_atomic_write_json_is_deterministic(tmp_path: Path) -> None:
    files.atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    files.atomic_write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    text = (tmp_path / "a.json").read_text()
    assert text == (tmp_path / "b.json").read_text()
    assert text.endswith("\n") and json.loads(text) == {"a": [1, 2], "b": 1}


def test_atomic_save_tensors_returns_the_file_digest(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tensors = {
        "x": torch.arange(6.0).reshape(2, 3).t(),
        "y": torch.ones(2, dtype=torch.int64),
    }  # x not contiguous
    digest = files.atomic_save_tensors(path, tensors, metadata={"format": "pt"})

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == files.sha256_of(path)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    loaded = files.read_tensors(path, digest)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert names(tmp_path) == ["w.safetensors"]


def test_failed_tensor_save_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    digest = files.atomic_save_tensors(path, {"x": torch.ones(3)})
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses tensors that share memory
        shared = torch.zeros(4)
        files.atomic_save_tensors(path, {"a": shared, "b": shared})
    assert files.sha256_of(path) == digest
    assert names(tmp_path) == ["w.safetensors"]


def test_read_json_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    with pytest.raises(CheckpointError, match="file not found") as caught:
        files.read_json(path)
    assert str(path) in str(caught.value)
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        files.read_json(path)
    path.write_text('"just a string"')
    with pytest.raises(CheckpointError, match="JSON object"):
        files.read_json(path)


def test_read_tensors_checks_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    digest = files.atomic_save_tensors(path, {"x": torch.ones(3)})
    files.read_tensors(path, digest)
    with pytest.raises(CheckpointError, match="checksum does not match") as caught:
        files.read_tensors(path, "0" * 64)
    assert str(path) in str(caught.value)


class _Exploit:
    """Unpickling this would create a file: proof that a reader ran code from the data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_read_tensors_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "w.safetensors"
    path.write_bytes(pickle.dumps({"x": _Exploit(marker)}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as caught:
        files.read_tensors(path)
    assert str(path) in str(caught.value)
    assert not marker.exists()
    torch.save({"x": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        files.read_tensors(path)


@pytest.mark.parametrize("keep", [0, 7, 8, 20, -1])
def test_read_tensors_rejects_truncated_files(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "w.safetensors"
    files.atomic_save_tensors(path, {"x": torch.randn(16, 16), "y": torch.randn(3)})
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        files.read_tensors(path)


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request: pytest.FixtureRequest):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_saved_files_get_the_users_usual_modes(tmp_path: Path, umask: int) -> None:
    """Not mkstemp's 0600: a team sharing a run directory reads what each member writes, as the umask says."""
    files.atomic_write_bytes(tmp_path / "a.bin", b"x")
    files.atomic_write_json(tmp_path / "b.json", {"a": 1})
    files.atomic_save_tensors(tmp_path / "c.safetensors", {"x": torch.ones(2)})
    folder = files.make_temp_dir(tmp_path, ".step-000001.")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()}
    assert modes == dict.fromkeys(["a.bin", "b.json", "c.safetensors"], 0o666 & ~umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert folder.name.startswith(".step-000001.") and folder.name.endswith(".tmp")
    assert files.current_umask() == umask


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="half-way"), files.atomic_folder(target) as tmp:
        (tmp / "a.json").write_text("{}")
        raise RuntimeError("half-way")
    assert names(tmp_path) == []  # neither the folder nor its temporary twin
    with files.atomic_folder(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.json").write_text("1")
    assert (target / "sub" / "a.json").read_text() == "1" and names(tmp_path) == ["out"]
    assert stat.S_IMODE(target.stat().st_mode) == files.folder_mode()

    with pytest.raises(CheckpointError, match="not an empty folder"), files.atomic_folder(target):
        pass
    with pytest.raises(RuntimeError), files.atomic_folder(target, replace=True) as tmp:
        (tmp / "b.json").write_text("2")
        raise RuntimeError
    assert names(target) == ["sub"]  # a failed replacement keeps the earlier folder
    with files.atomic_folder(target, replace=True) as tmp:
        (tmp / "b.json").write_text("2")
    assert names(target) == ["b.json"] and names(tmp_path) == ["out"]
    (tmp_path / "empty").mkdir()
    with files.atomic_folder(tmp_path / "empty") as tmp:  # an empty folder is simply taken
        (tmp / "c").write_text("3")
    assert names(tmp_path / "empty") == ["c"]
