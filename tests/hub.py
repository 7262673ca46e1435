"""The Hugging Face Hub's client, as loramix calls it, against a folder per repository: the `hub` fixture (conftest) puts
it in place of the real one. Uploads and fetches keep only the files their patterns allow, as the Hub's client does."""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from huggingface_hub import RepoUrl
from huggingface_hub.utils import LocalEntryNotFoundError, filter_repo_objects


class FakeHub:
    """`create_repo`, `upload_folder`, `create_commit` and `snapshot_download` against `root/<owner>/<name>/`."""

    def __init__(self, root: Path) -> None:
        self.root, self.created, self.fetched, self.commits, self.uploads = root, [], [], [], []
        self.refuse: Exception | None = None  # raised by the next upload, as a Hub that refuses it would

    def create_repo(
        self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, **_: Any
    ) -> RepoUrl:
        self.created.append((repo_id, private, exist_ok))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(
        self,
        *,
        repo_id: str,
        folder_path: str,
        allow_patterns: list[str] | None = None,
        ignore_patterns: list[str] | None = None,
        path_in_repo: str | None = None,
        run_as_future: bool = False,
        **_: Any,
    ) -> str | Future:
        """The folder's files the patterns keep, under `path_in_repo`; as a finished `Future` when run as one
        (Hugging Face `Trainer` pushes its checkpoints so)."""
        source = Path(folder_path)
        relative = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        for name in filter_repo_objects(
            relative, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        ):
            self._write(
                repo_id, f"{path_in_repo}/{name}" if path_in_repo else name, (source / name).read_bytes()
            )
        self.uploads.append((repo_id, path_in_repo))
        url = f"https://huggingface.co/{repo_id}/commit/0"
        if not run_as_future:
            return url
        done: Future = Future()
        done.set_result(url)
        return done

    def create_commit(self, repo_id: str, operations: list[Any], *, commit_message: str, **_: Any) -> str:
        if self.refuse is not None:
            raise self.refuse
        for op in operations:
            content = op.path_or_fileobj
            data = content if isinstance(content, bytes) else Path(content).read_bytes()
            self._write(repo_id, op.path_in_repo, data)
        self.commits.append((repo_id, commit_message, sorted(op.path_in_repo for op in operations)))
        return f"https://huggingface.co/{repo_id}/commit/{len(self.commits)}"

    def snapshot_download(
        self, repo_id: str, *, revision: str | None = None, allow_patterns: list[str]
    ) -> str:
        self.fetched.append((repo_id, revision, allow_patterns))
        stored = self.root / repo_id
        if not stored.is_dir():
            raise LocalEntryNotFoundError(f"{repo_id} is not in the cache and the Hub cannot be reached")
        # a cache folder of the allowed files only, as the real client fetches them
        snapshot = self.root.parent / "cache" / repo_id / (revision or "main")
        shutil.rmtree(snapshot, ignore_errors=True)
        relative = [p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()]
        for name in filter_repo_objects(relative, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(stored / name, snapshot / name)
        return str(snapshot)

    def files(self, repo_id: str) -> list[str]:
        """The repository's files, relative, sorted."""
        stored = self.root / repo_id
        return sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file())

    def _write(self, repo_id: str, name: str, data: bytes) -> None:
        target = self.root / repo_id / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
