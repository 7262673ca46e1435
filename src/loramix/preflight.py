"""Checks the command line runs before it imports torch or reads data: paths it will write, and what `export` was
asked for. Loading torch and transformers takes seconds; a mistake in a path or an argument should be named at
once, not after the imports, the data and the model. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from loramix.errors import CheckpointError, ConfigError, did_you_mean

# The registered methods' names, read before torch loads so that a misspelt method answers at once;
# tests/test_cli.py holds this tuple equal to `loramix.methods.METHODS`.
METHOD_NAMES = (
    "lora",
    "lora-wide",
    "per-task-lora",
    "mola-grad",
    "mola-router",
    "token-router",
    "sequential-lora",
    "zero-shot",
    "lae",
    "continual-mola-grad",
    "continual-mola-grad-task-id",
    "moe-adapters",
    "moe-adapters-task-id",
    "joint",
    "elrea",
    "full-finetune",
)


def check_method_name(name: str) -> None:
    """An unknown method, named with the known ones (the message `loramix.methods.get_method` gives)."""
    if name not in METHOD_NAMES:
        allowed = ", ".join(repr(m) for m in METHOD_NAMES)
        raise ConfigError(
            f"method: {name!r} is not a method; the methods are: {allowed}{did_you_mean(name, METHOD_NAMES)}"
        )


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> None:
    """Refuse an output folder that cannot be made or written: the path, or a folder on the way to it, is a file;
    or the nearest existing folder is not writable. Makes nothing, so that a run refused later leaves no trace."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        raise ConfigError(
            f"{flag} {path} {where}, not a folder; pass another {flag} or move the file out of the way"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == path else f"cannot be made: {existing} is not writable"
        raise ConfigError(
            f"{flag} {path} {where} (by this user); pass another {flag} or change the folder's permissions"
        )


# What `loramix export` writes, named here so that the folder it may replace is recognised before torch loads.
EXPORT_NOTE_FILE = "loramix_export.json"  # beside each exported task's adapter
MANIFEST_FILE = "manifest.json"  # beside the task folders of a several-task export
MANIFEST_FORMAT = "loramix-multi-lora"


def select_tasks(
    names: Sequence[str], requested: str | Sequence[str] | None, all_tasks: bool = False
) -> list[str]:
    """The tasks `loramix export` is asked for, in the order asked: `--task` (repeatable) or `--all-tasks`."""
    requested = [requested] if isinstance(requested, str) else list(requested or [])
    listed = ", ".join(names)
    if all_tasks and requested:
        raise ConfigError("--all-tasks exports every task: drop --task, or name the tasks with --task alone")
    if all_tasks:
        return list(names)
    if not requested:
        raise ConfigError(
            f"pass --task, one of this run's tasks: {listed} (repeat --task for several, or pass --all-tasks for "
            "every task and a serving manifest; --expert N for a run whose experts are not tasks, as in an ELREA "
            "run)"
        )
    for task in requested:
        if task not in names:
            raise ConfigError(
                f"--task {task!r} is not a task of this run; its tasks are: {listed}{did_you_mean(task, names)}"
            )
    return list(dict.fromkeys(requested))


def unfolded_error(method: str, kinds: list[str]) -> ConfigError:
    """The refusal of an export whose experts of these kinds do not fold into a LoRA."""
    return ConfigError(
        f"method {method}: its {', '.join(map(repr, kinds))} experts do not fold into a LoRA, so the run cannot be "
        "exported as PEFT adapters; load it with loramix (`loramix.load`, `loramix eval`) instead"
    )


def check_export_request(
    run_dir: str | Path, tasks: str | Sequence[str] | None, expert: int | None, *, all_tasks: bool = False
) -> None:
    """What `loramix export` can tell from the run's JSON files before it loads a model: that tasks were named
    (`--task`, or `--all-tasks`) and are the run's (read from `adapter/loramix_config.json`), and that its experts
    fold into a LoRA; or that `--expert` (experts that are not tasks, as in an ELREA run) names one of its experts.
    When the file is missing or unreadable, nothing is decided here: the full load reports it with its own
    message."""
    try:
        record = json.loads((Path(run_dir) / "adapter" / "loramix_config.json").read_text(encoding="utf-8"))
        experts = int(record["config"]["num_experts"])
        names = [str(meta["name"]) for meta in record["metadata"]["tasks"]]
        kind, method = str(record["config"].get("experts", "lora")), record["metadata"]["run"]["method"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    if expert is not None:
        if not 0 <= expert < experts:
            raise ConfigError(f"--expert {expert} is not an expert of this run: 0..{experts - 1}")
        return
    if names:
        select_tasks(names, tasks, all_tasks)
    from loramix.experts import EXPERT_KINDS

    if kind in EXPERT_KINDS and not EXPERT_KINDS[kind].mergeable:
        raise unfolded_error(method, [kind])


def finished_adapter(run_dir: str | Path) -> Path:
    """A run's `adapter/` folder; a run that holds its config but no adapter yet was stopped before it finished,
    and is told how to finish it."""
    run_dir = Path(run_dir)
    if not (run_dir / "adapter").is_dir() and (run_dir / "config.yaml").is_file():
        raise CheckpointError(
            f"{run_dir}: the run has not finished (no adapter/ yet); finish it with `loramix train CONFIG "
            f"--output-dir {run_dir} --resume`, CONFIG the config it was started with"
        )
    return run_dir / "adapter"


def is_earlier_export(folder: str | Path) -> bool:
    """Whether `folder` holds what `loramix export` wrote: one task's note, or a several-task manifest."""
    folder = Path(folder)
    if (folder / EXPORT_NOTE_FILE).is_file():
        return True
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


def check_export_out(path: str | Path, flag: str = "--out") -> None:
    """An export is written whole beside its folder and renamed into place, so the folder must be new, empty, or
    an earlier export (which is then replaced whole); anything else is refused before any work."""
    check_output_dir(path, flag)
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not is_earlier_export(path):
        raise ConfigError(
            f"{flag} {path} holds files that are not a loramix export; pass a new or empty folder (an export is "
            "written beside it and renamed into place whole, replacing only an earlier export)"
        )
