"""What a resumed run may change: only bookkeeping (`BOOKKEEPING_KEYS`). A resume that changed the learning rate, the
seed or the method would end somewhere neither config leads to, and then overwrite `config.yaml`, which would no
longer say how the run was made. So a changed config is refused, naming each key, before anything is written;
`--allow-config-change` lets it through and appends the changes to `config-changes.jsonl` in the run directory.

The same holds for the data: a run writes the size and SHA-256 of each local file its tasks read to `data-files.json`
beside its config, and a resume whose files differ (edited, replaced, or a split added or gone) is refused naming
each, as a changed setting is.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from loramix.errors import CheckpointError, ConfigError
from loramix.train.config import BOOKKEEPING_KEYS, CONFIG_FILE, RunConfig
from loramix.train.config_files import resolve_paths

CHANGES_FILE = "config-changes.jsonl"
DATA_FILE = "data-files.json"
STARTED_FILES = frozenset({CONFIG_FILE, DATA_FILE})  # what a run writes before it builds the model
_ABSENT = object()


def config_changes(
    saved: dict[str, Any], run: RunConfig, saved_in: Path | None = None
) -> dict[str, tuple[Any, Any]]:
    """The keys outside bookkeeping whose values differ: key -> (saved value, this run's value). A key the saved
    config lacks counts with its default (added since: the saved run had that default). Paths (`path_slots`: the
    tasks folder, task spec files, `continue_from`) count by what they name: a saved config holds them relative to
    its own folder `saved_in`, a run relative to here."""
    defaults = RunConfig.model_construct().model_dump(mode="json")
    now, saved = run.to_dict(), copy.deepcopy(saved)
    resolve_paths(saved, saved_in or Path.cwd())
    resolve_paths(now, Path.cwd())
    changed: dict[str, tuple[Any, Any]] = {}
    # with keep_best or eval_patience, which steps are evaluated (and on what) decides where the run ends
    chosen = run.keep_best or run.eval_patience is not None
    free = BOOKKEEPING_KEYS - ({"eval_every", "eval_split", "eval_metric"} if chosen else set())
    for key in sorted((set(saved) | set(now)) - free):
        before = saved.get(key, defaults.get(key, _ABSENT))
        after = now.get(key, _ABSENT)
        _differences(key, before, after, changed)
    return changed


def _differences(path: str, before: Any, after: Any, changed: dict[str, tuple[Any, Any]]) -> None:
    """Each place where `before` and `after` differ, by its path: into mappings by key and into lists of one length
    by index (`tasks[2].scorer`), so that an edited task spec names the field that changed."""
    if before == after:
        return
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after), key=str):
            _differences(f"{path}.{key}", before.get(key, _ABSENT), after.get(key, _ABSENT), changed)
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for index, (one, other) in enumerate(zip(before, after)):
            _differences(f"{path}[{index}]", one, other, changed)
    else:
        changed[path] = (None if before is _ABSENT else before, None if after is _ABSENT else after)


def data_files(specs: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Each local file the tasks `specs` read, by `task.split`: its path, size in bytes and SHA-256. (A task read
    from the Hugging Face hub is named in the config, with its revision, and has no entry.)"""
    from loramix.data.spec import SPLITS  # here: this module is read before torch loads
    from loramix.io.files import sha256_of

    files: dict[str, dict[str, Any]] = {}
    for spec in specs:
        for split in SPLITS:
            source = spec.source(split)
            if isinstance(source, str) and os.path.isfile(source):
                size, digest = os.path.getsize(source), sha256_of(Path(source))
                files[f"{spec.name}.{split}"] = {"path": source, "size": size, "sha256": digest}
    return files


def _data_changes(saved_in: Path, specs: Sequence[Any]) -> dict[str, tuple[Any, Any]]:
    """The data files that differ from those the run in `saved_in` started with (`data-files.json`; a run written
    before it existed has none, and nothing to compare), as `data <task>.<split> (<path>)` -> (then, now)."""
    path = saved_in / DATA_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    fields = {"path", "size", "sha256"}
    if not isinstance(saved, dict) or not all(
        isinstance(v, dict) and fields <= v.keys() for v in saved.values()
    ):
        raise CheckpointError(
            f"{path}: not a readable list of the run's data files, so the data it was started with is unknown; "
            "delete it to resume without comparing the data, or train into another --output-dir"
        )
    now = data_files(specs)

    def described(entry: dict[str, Any] | None) -> str | None:
        return None if entry is None else f"{entry['size']} bytes, sha256 {entry['sha256'][:12]}"

    return {
        f"data {key} ({(now.get(key) or saved[key])['path']})": (
            described(saved.get(key)),
            described(now.get(key)),
        )
        for key in sorted(set(saved) | set(now))
        if (saved.get(key) or {}).get("sha256") != (now.get(key) or {}).get("sha256")
    }


def check_resume_config(
    run: RunConfig,
    output_dir: Path,
    *,
    specs: Sequence[Any] = (),
    allow_change: bool = False,
    main_process: bool = True,
) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume the run in `output_dir` with a config that differs from its `config.yaml` outside
    bookkeeping, or with data files (of the task `specs`) other than it started with: a ConfigError names each
    key or file, from what to what; unless `allow_change`: then the changes are appended to `config-changes.jsonl`
    (by the main process) and returned. Nothing to compare (no `config.yaml` yet, or nothing beside it but the
    list of data files) is no change."""
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file() or {p.name for p in path.parent.iterdir()} <= STARTED_FILES:
        return {}  # nothing ran with it: a run stopped after writing its config, before it built the model
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable run config ({exc}), so what the run was started with is unknown; restore it "
            "or train into another --output-dir"
        ) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: expected a mapping of keys to values at the top level")
    changed = config_changes(saved, run, path.parent) | _data_changes(path.parent, specs)
    if not changed:
        return {}
    listing = ", ".join(
        f"{key} ({_show(before)} -> {_show(after)})" for key, (before, after) in changed.items()
    )
    if not allow_change:
        raise ConfigError(
            f"{path}: the run being resumed was started with other settings: {listing}. Resume with the config "
            "and data it was started with; or pass --allow-config-change to resume anyway (the changes are "
            f"recorded in {CHANGES_FILE}); or train into another --output-dir. Only "
            f"{', '.join(sorted(BOOKKEEPING_KEYS))} may change freely"
        )
    if main_process:
        from loramix.io.files import atomic_write_bytes  # here: the check above runs before torch loads

        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "changed": {key: {"from": before, "to": after} for key, (before, after) in changed.items()},
        }
        log = Path(output_dir) / CHANGES_FILE
        previous = log.read_bytes() if log.is_file() else b""
        if previous and not previous.endswith(b"\n"):
            previous += b"\n"
        atomic_write_bytes(log, previous + (json.dumps(record) + "\n").encode())
        print(
            f"loramix: warning: resuming with changed settings: {listing}; recorded in {log}", file=sys.stderr
        )
    return changed


def _show(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
