"""Run config files: reading one, the paths it holds (read against its folder, saved relative to the run's), the
`--set` overrides, and the settings a continued run takes from the run it continues. :mod:`loramix.train.config`
validates what these return."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from loramix.config import read_yaml
from loramix.errors import ConfigError
from loramix.remote import fetch_run, hub_reference

CONFIG_FILE = "config.yaml"  # the settings a run saves in its folder, read back to resume or continue it


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML config file's mapping of keys to values; anything else is refused naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:  # unreadable: permissions, a folder, an I/O error
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # a value YAML cannot build (`2020-02-30`), deep nesting
        raise ConfigError(f"{path}: a value is not valid YAML ({exc or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def continued_settings(
    data: dict[str, Any], relative: set[str], keys: Iterable[str]
) -> tuple[dict[str, Any], set[str], Path | None]:
    """A config that continues a finished run (`continue_from`, its paths resolved) takes every setting it leaves
    out from that run's saved `config.yaml`, so that naming the new tasks is enough: the earlier run's method, model
    and selector settings, which a continued run must keep anyway. Its paths are read against the run's folder
    (and stay relative where it wrote them so); its tasks and its own `continue_from` are not carried over. Returns
    the settings, the relative path slots and the file read (None where there is none to read: a folder without
    it is refused by the continual method, naming what it lacks). `keys`: every key a run config has (a config
    that gives them all is a saved one, complete as it is)."""
    prior = data.get("continue_from")
    saved = Path(prior) / CONFIG_FILE if isinstance(prior, str) else None
    if saved is None or not saved.is_file() or set(keys) <= set(data):  # a saved config
        return data, relative, None
    earlier = read_config_file(saved)
    earlier_relative = resolve_paths(earlier, saved.parent)
    taken = {k: v for k, v in earlier.items() if k not in data and k not in ("tasks", "continue_from")}
    relative = relative | {slot for slot in earlier_relative if slot.split(".")[0] in taken}
    return {**data, **taken}, relative, saved


def path_slots(data: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """Where a config dict holds a file or folder path, by name (`tasks_dir`, `continue_from`, `tasks.2.test`,
    `model`): `(the dict holding it, its key)`. A task spec's split given as a Hugging Face dataset is no path, and
    `model` is one only when written as a path (`./tiny-gpt2`, `../models/x`, or absolute), not a hub name."""
    slots = {key: (data, key) for key in ("tasks_dir", "continue_from") if isinstance(data.get(key), str)}
    model = data.get("model")
    if isinstance(model, str) and model_is_path(model):
        slots["model"] = (data, "model")
    tasks = data.get("tasks")
    for i, spec in enumerate(tasks if isinstance(tasks, list) else []):
        if isinstance(spec, dict):
            for split in ("train", "validation", "test"):
                if isinstance(spec.get(split), str):
                    slots[f"tasks.{i}.{split}"] = (spec, split)
    return slots


def model_is_path(model: str) -> bool:
    """Whether a `model` value names a folder (`./tiny`, `../models/x`, absolute) rather than a hub model."""
    return model.startswith(("./", "../", ".\\", "..\\")) or Path(model).is_absolute()


def resolve_paths(data: dict[str, Any], base: Path) -> set[str]:
    """Resolve `data`'s relative paths against `base` in place; returns the names of those that were relative. A
    `continue_from` that names a Hub repository (`owner/name[@revision]`, no folder here) becomes the folder its
    run is fetched into."""
    relative = set()
    for slot, (holder, key) in path_slots(data).items():
        if slot == "continue_from" and hub_reference(holder[key], base) is not None:
            holder[key] = str(fetch_run(holder[key], base))
        elif not Path(holder[key]).is_absolute():
            holder[key] = str((base / holder[key]).resolve())
            relative.add(slot)
    return relative


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            data[key.strip()] = yaml.safe_load(raw)
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            raise ConfigError(f"--set {key}: value is not valid YAML ({exc or type(exc).__name__})") from None
    return data
