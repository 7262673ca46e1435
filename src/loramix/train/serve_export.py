"""Tasks of a finished run exported for serving: `loramix export RUN --all-tasks --out DIR` (or `--task` repeated)
writes each task's adapter into `DIR/<task>/`, as :func:`export_task` writes one, and `DIR/manifest.json`: for every
task its adapter folder, and the base model, the rank and the adapted modules, with the vLLM command line and the
LoRAX request parameters that serve all the tasks on one base model (multi-LoRA serving: each request names its
task's adapter). One `--task` alone writes that task's adapter into `DIR` itself, as before.

What a static multi-LoRA server can serve is one fixed LoRA per request. A run that routes by task (mola-grad,
per-task-lora), by a Poly table (a fixed mixture of experts per task) or shares one adapter (lora) exports exactly:
each task's adapter computes what the run computes for that task. A learned router that chooses per input (per
sample, per token, per-task routers) is not a fixed LoRA; a classification task of such a run is exported as its mean
gate, an approximation whose gap to the routed model is measured and recorded per task, and a generation task of
such a run is refused (see `task_export`).

`merged=True` adds `merged/` to each task's folder: the base model with the task's adapter folded into its weights,
saved by `save_pretrained` with the tokenizer, which `AutoModelForCausalLM.from_pretrained` (or `AutoModel`, for an
encoder) loads as a plain model. Building it holds a second copy of the model in memory, one task at a time.

A run that trained its backbone (`train_backbone: true`) changed the base itself: its adapters compute the run's
tasks only on top of that trained base, so the export writes it too, as `base/` (`save_pretrained`, with the
tokenizer, the adapters removed), and every adapter, the manifest and the serving commands name it as the base.

The output folder is written whole beside its final place and renamed into it at the end: an error or a crash leaves
no half-written export, and an earlier export there is replaced only once the new one is complete.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramix.data import MultiTaskData
from loramix.errors import ConfigError
from loramix.inject import get_info, remove
from loramix.io.export import serving_commands
from loramix.io.files import atomic_folder, atomic_write_bytes
from loramix.merge import merge_and_unload
from loramix.models import resolve_model_path
from loramix.preflight import MANIFEST_FILE, MANIFEST_FORMAT, is_earlier_export
from loramix.train.config import RunConfig
from loramix.train.model import MultiTaskModel
from loramix.train.task_export import GENERATION, HEAD_FILE, TaskExport, export_task

MANIFEST_VERSION = 1
MERGED_FOLDER = "merged"
BASE_FOLDER = "base"


@dataclass
class RunExport:
    """What :func:`export_tasks` wrote (at the folders' final places), and the lines the command prints."""

    directory: Path
    exports: list[TaskExport]
    manifest: dict[str, Any] | None = None
    merged: list[Path] = field(default_factory=list)
    trained_base: Path | None = None

    def trained_base_line(self) -> str:
        return (
            f"the run trained its backbone: the trained base is in {self.trained_base}, and the adapters name it as "
            "their base (they compute the run's tasks only on top of it)"
        )

    def summary(self) -> str:
        if self.manifest is None:  # one task, in the output folder itself
            lines = [self.exports[0].summary()]
            if self.trained_base:
                lines.append(self.trained_base_line())
            if self.merged:
                lines.append(f"and the base model with this adapter merged into it, in {self.merged[0]}")
            return "\n".join(lines)
        manifest, out = self.manifest, self.directory
        names = ", ".join(manifest["adapters"])
        lines = [
            f"{len(self.exports)} PEFT LoRA adapters to {out}/<task>/ ({names}), with {out / MANIFEST_FILE}",
            manifest["static_serving"],
        ]
        if self.trained_base:
            lines.append(self.trained_base_line())
        for written in self.exports:
            if written.approximate:
                lines.append(f"  {written.note['task']}: {written.check_line()}")
        if self.merged:
            lines.append(f"each task's base model with its adapter merged in: {out}/<task>/{MERGED_FOLDER}/")
        if "vllm" in manifest:
            vllm, lorax = manifest["vllm"], manifest["lorax"]
            lines.append("serve every task on one base model with vLLM (a request's `model` names its task):")
            lines.append(f"  {vllm['command'] or vllm['note']}")
            first = next(iter(lorax["requests"].values()))
            lines.append(
                f'or with LoRAX: {lorax["command"]}, and per request "parameters": '
                f'{{"adapter_id": "{first["adapter_id"]}", "adapter_source": "local"}} (that task\'s folder)'
            )
            if "quantization_note" in manifest:
                lines.append(f"note: {manifest['quantization_note']}")
        else:
            lines.append(manifest["serving_note"])
        return "\n".join(lines)


def task_folders(names: Sequence[str]) -> dict[str, str]:
    """A folder name for each task that is safe on any file system and as a served adapter name (`name=path` in
    vLLM's `--lora-modules`): the task's name where it is one, else its letters, digits, `.`, `_` and `-`."""
    folders: dict[str, str] = {}
    for name in names:
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "task"
        if folder == MANIFEST_FILE:
            folder += "_"
        candidate, n = folder, 2
        while candidate in folders.values():
            candidate, n = f"{folder}-{n}", n + 1
        folders[name] = candidate
    return folders


def _gate_of(note: Mapping[str, Any]) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """The fixed mixture an export's note records (a mean gate), or None for the task's own gate."""
    gate = note["gate"]
    if gate["kind"] != "mean":
        return None
    values = gate["values"]
    if isinstance(values, dict):
        return {name: torch.tensor(v) for name, v in values.items()}
    return torch.tensor(values)


def write_merged(
    model: MultiTaskModel,
    task: int,
    gate: torch.Tensor | dict[str, torch.Tensor] | None,
    out: Path,
    tokenizer: Any,
) -> Path:
    """The base model with task `task`'s fixed gate (or `gate`) folded into its weights, as a plain
    `save_pretrained` folder with the tokenizer; the model itself is left as it was."""
    plain = copy.deepcopy(model.backbone)
    merge_and_unload(plain, task=None if gate is not None else task, gate=gate)  # type: ignore[arg-type]
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_trained_base(model: MultiTaskModel, out: Path, tokenizer: Any) -> Path:
    """The backbone as it was trained, without its adapters, as a plain `save_pretrained` folder with the
    tokenizer; the model itself is left as it was."""
    plain = copy.deepcopy(model.backbone)
    remove(plain)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def static_serving(model: MultiTaskModel, exports: Sequence[TaskExport]) -> str:
    """What a static multi-LoRA server computes for these exports, in one sentence."""
    info = get_info(model.backbone)
    router = info.config.router
    if any(written.approximate for written in exports):
        return (
            f"approximate: router '{router}' chooses experts per input, which a static multi-LoRA server (one fixed "
            "LoRA per request) cannot do; each task's adapter is its mean gate, and the manifest's `gap` per task "
            "says how far it is from the routed model:"
        )
    if info.router_class.scope is None:
        return "exact: the run has one adapter, shared by every task; each task's folder holds it, with its own note"
    return (
        f"exact: router '{router}' gives each task a fixed gate (its own expert, or a fixed mixture of experts), "
        "so each task's adapter computes what the run computes for that task"
    )


def build_manifest(
    run: RunConfig,
    model: MultiTaskModel,
    exports: Sequence[TaskExport],
    folders: Mapping[str, str],
    final: Path,
    *,
    merged: bool,
) -> dict[str, Any]:
    """The manifest of a several-task export (see the module docstring); `final` is where the folder ends up."""
    info = get_info(model.backbone)
    base = exports[0].note["base_model"]
    rank = max(written.rank for written in exports)
    adapters: dict[str, Any] = {}
    for written in exports:
        note, folder = written.note, folders[written.note["task"]]
        adapters[note["task"]] = {
            "path": folder,
            "served_as": folder,
            "task_id": note["task_id"],
            "task_type": note["task_type"],
            "rank": written.rank,
            "exact": not written.approximate,
            "gate": note["gate"]["note"],
            "gap": note["gate"].get("check"),
            "head": f"{folder}/{HEAD_FILE}" if note.get("head") else None,
            "merged": f"{folder}/{MERGED_FOLDER}" if merged else None,
        }
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "base_model": base,
        "method": exports[0].note["method"],
        "router": info.config.router,
        "exact": not any(written.approximate for written in exports),
        "static_serving": static_serving(model, exports),
        "rank": rank,  # the largest adapter rank (each adapter pads every layer to its own)
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in info.names}),
        "adapted_layers": len(info.names),
        "paths": "`path`, `head` and `merged` are relative to this file's folder; the serving commands name the "
        f"folders where the export was written ({final}): after moving it, rebuild them from `path`",
        "adapters": adapters,
    }
    if all(written.note["task_type"] == GENERATION for written in exports):
        served = {folders[written.note["task"]]: final / folders[written.note["task"]] for written in exports}
        manifest.update(serving_commands(base, served, rank, run.quantize))
    else:
        manifest["serving_note"] = (
            "serving: these tasks answer through their head rows (head.safetensors) on the pooled output, which "
            "vLLM's and LoRAX's text generation does not apply; load a task with PeftModel.from_pretrained(base, "
            "DIR/<task>) and apply its head as its loramix_export.json says"
        )
    return manifest


def export_tasks(
    run: RunConfig,
    model: MultiTaskModel,
    tasks: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    out: str | Path,
    *,
    load_data: Callable[[], tuple[MultiTaskData, Any, str]],
    method: str,
    several: bool | None = None,
    merged: bool = False,
    gate_note: Callable[[MultiTaskModel, int], str] | None = None,
) -> RunExport:
    """Write the tasks `names` of a finished run into `out`, whole or not at all: one folder per task and a serving
    manifest when `several` (default: when more than one task is named), else the one task into `out` itself.
    `merged` adds each task's merged model. `load_data` and `gate_note` are as for :func:`export_task`.

    Example:
        >>> export_tasks(run, model, tasks, ["sql", "chat"], "exported", load_data=load_data, method="mola-grad")
    """
    if not names:
        raise ConfigError("no task to export: name one with --task, or pass --all-tasks")
    out = Path(out)
    final = out.resolve()
    several = len(names) > 1 if several is None else several
    folders = task_folders(names) if several else {names[0]: ""}
    order = [str(meta["name"]) for meta in tasks]
    load_once = functools.cache(load_data)  # read once, for every task whose router decides per input
    trained_base = get_info(model.backbone).config.train_backbone
    tokenizer = None
    if merged or trained_base:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(run.model))
    exports, merged_dirs = [], []
    with atomic_folder(out, replace=is_earlier_export(out)) as tmp:
        base = None
        if trained_base:
            write_trained_base(model, tmp / BASE_FOLDER, tokenizer)
            base = str(final / BASE_FOLDER)
        for name in names:
            task, where = order.index(name), tmp / folders[name]
            written = export_task(
                run,
                model,
                tasks,
                task,
                where,
                load_data=load_once,
                method=method,
                base_model=base,
                gate_note=gate_note,
            )
            if merged:
                write_merged(model, task, _gate_of(written.note), where / MERGED_FOLDER, tokenizer)
                merged_dirs.append(final / folders[name] / MERGED_FOLDER)
            exports.append(TaskExport(final / folders[name], written.note))
        manifest = None
        if several:
            manifest = build_manifest(run, model, exports, folders, final, merged=merged)
            text = (
                json.dumps(manifest, indent=2) + "\n"
            )  # keys in the order written: tasks in the run's order
            atomic_write_bytes(tmp / MANIFEST_FILE, text.encode("utf-8"))
    directory = final if several else exports[0].directory
    return RunExport(directory, exports, manifest, merged_dirs, final / BASE_FOLDER if trained_base else None)
