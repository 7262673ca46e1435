"""Names that mean a Hugging Face Hub repository (`owner/name`, `owner/name@revision`) rather than a local folder,
and fetching such a repository's files into the Hub's cache. Nothing here imports torch: the command line reads a
run's name before it loads torch."""

from __future__ import annotations

import re
from pathlib import Path

from loramix.errors import CheckpointError

REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # a Hugging Face Hub repository: owner/name
# the files of a run that travel to and from the Hub (`loramix push`): data and pictures, never a pickle or code
RUN_PATTERNS = ["*.yaml", "*.json", "*.jsonl", "*.safetensors", "*.md", "*.png"]


def hub_reference(source: str | Path, base: Path | None = None) -> tuple[str, str | None] | None:
    """`(repo_id, revision)` where `source` names a Hub repository (`owner/name`, or `owner/name@revision`) and no
    local path (read against `base`, else the current folder): None for a path that exists, for one whose folder
    exists (`runs/x` with `runs/` here is a local path, mistyped), and for anything not of that form."""
    text = str(source)
    repo, _, revision = text.partition("@")
    path = (base or Path()) / text
    if not REPO_ID.fullmatch(repo) or path.exists() or path.parent.is_dir():
        return None
    return repo, revision or None


def check_repo_id(repo_id: str, field: str) -> None:
    """Refuse, naming `field`, a Hub repository id that is not `owner/name`."""
    if not REPO_ID.fullmatch(repo_id):
        raise CheckpointError(f"{field} {repo_id!r}: a Hub repository is named 'owner/name'")


def fetch(
    source: str | Path,
    patterns: list[str],
    revision: str | None = None,
    what: str = "adapter folder",
    base: Path | None = None,
) -> Path:
    """The folder `source` names: itself where it is local (or not a Hub reference; read against `base`), else
    the files of the Hub repository it names that match `patterns`, fetched into the Hub's cache (`revision` where
    `source` names none). A repository that cannot be read is named in the error, with the Hub's reason."""
    reference = hub_reference(source, base)
    if reference is None:
        return Path(source)
    repo, revision = reference[0], reference[1] or revision
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"{source}: no such {what} here, and the Hugging Face Hub repository of that name could not be "
            f"read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None


def fetch_run(source: str | Path, base: Path | None = None) -> Path:
    """The run folder `source` names: a local folder, or a Hub repository (`owner/name[@revision]`) that `loramix
    push` wrote, its run's files fetched into the Hub's cache."""
    return fetch(source, RUN_PATTERNS, what="run folder", base=base)
