"""One task of a finished run, exported: its adapter as a PEFT LoRA, its head's rows, and a note on how the adapter
was made (`loramix export RUN --task NAME --out DIR`).

Why a note: when the run routes by task, the exported LoRA computes exactly what the run computes for that task. A
learned router (per sample, per token, or per task from the input) gives each input its own mixture of experts,
which no single LoRA can; the task is then exported as its *mean* gate over a fixed, seeded sample of its training
inputs, and the note (and the command's output) says so, with how far the exported model's outputs are from the
routed model's on the task's evaluation inputs.

Why the head: a PEFT adapter carries no classifier, so without the task's head rows the exported adapter cannot
answer the task. `head.safetensors` holds `weight` `(k, d)` (and `bias` `(k,)` for a classification head) for the
task's k classes (one row for regression), to apply to the pooled encoder output as the note describes.

A generation task (a causal LM's, `task_type: generation`) has no head and no labels: the language model's own
output layer answers it, so the adapter alone serves the task; the note says so instead of naming a head file. Its
router must give the task a fixed gate: the mean-gate approximation is measured on pooled outputs and head decisions,
which a generation task does not have, so it is refused there (`loramix.train.serve_export` says what can be served
statically).

Files written into the output folder: `adapter_model.safetensors` and `adapter_config.json` (PEFT), `head.safetensors`
(not for a generation task) and `loramix_export.json` (the task, its labels, the pooling, the head's formula and the
gate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from loramix.data import MultiTaskData
from loramix.errors import ConfigError, DataError
from loramix.heads import LabelPromptHead, TaskHeads
from loramix.heads.label_prompt import MAX_LOGIT_SCALE
from loramix.inject import disabled, get_info
from loramix.io.export import export_peft, hub_name, mean_gate
from loramix.io.files import atomic_save_tensors, atomic_write_json, read_json
from loramix.merge import fixed_gate
from loramix.preflight import EXPORT_NOTE_FILE, unfolded_error
from loramix.train.config import RunConfig
from loramix.train.model import MODEL_INPUTS, MultiTaskModel
from loramix.train.step import routed

GATE_EXAMPLES = 256  # training inputs of the task whose gates are averaged (a fixed, seeded sample)
CHECK_EXAMPLES = 256  # evaluation inputs of the task on which the export is compared with the routed model
NOTE_FILE = EXPORT_NOTE_FILE
HEAD_FILE = "head.safetensors"
GENERATION = "generation"  # a causal LM's task: no head, no labels

Gate = Tensor | dict[str, Tensor]


@dataclass
class TaskExport:
    """What `export_task` wrote, and the lines the command prints."""

    directory: Path
    note: dict[str, Any]

    @property
    def approximate(self) -> bool:
        return self.note["gate"]["kind"] == "mean"

    @property
    def rank(self) -> int:
        """The exported LoRA's rank (every layer padded to it)."""
        return int(self.note["rank"])

    def summary(self) -> str:
        task = self.note["task"]
        first = f"a PEFT LoRA adapter for task {task!r} to {self.directory}, with "
        if self.note.get("head"):
            first += f"its head rows ({HEAD_FILE}) and a note ({NOTE_FILE})"
        else:
            first += f"a note ({NOTE_FILE}); no head file: {self.note['head_missing']}"
        lines = [first]
        if self.approximate:
            lines += [f"note: {self.note['gate']['note']}", self.check_line()]
        return "\n".join(lines)

    def check_line(self) -> str:
        """How far a mean-gate export is from the routed model, as measured on the task's evaluation inputs."""
        task, check = self.note["task"], self.note["gate"]["check"]
        line = (
            f"check on {check['examples']} {check['split']} inputs of {task!r}: pooled outputs differ from the "
            f"routed model's by {100 * check['relative_l2']:.2g}% (relative L2"
        )
        if check.get("of_adapter_change") is not None:
            line += f"; {100 * check['of_adapter_change']:.2g}% of what the adapters change"
        line += ")"
        if check.get("agreement") is not None:
            line += (
                f"; the head's predictions agree on {100 * check['agreement']:.1f}% (accuracy routed "
                f"{check['accuracy_routed']:.3f}, exported {check['accuracy_exported']:.3f})"
            )
        return line


def needs_mean_gate(model: MultiTaskModel, task: int) -> bool:
    """Whether the model's router decides per input for this task (no fixed gate to export exactly)."""
    info = get_info(model.backbone)
    if info.router_class.scope is None:
        return False
    router = info.model_router or info.layers[0].router
    return router is not None and router.task_gate(task) is None


def _model_inputs(batches: Sequence[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    for batch in batches:
        yield {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _batches(examples: Sequence[Any], collator: Any, batch_size: int, task: int) -> list[dict[str, Tensor]]:
    """Collated batches whose task ids are the model's id of the task (the data may number its tasks otherwise,
    e.g. a continued run's model knows earlier tasks that its config does not list)."""
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size])
        batch["task_ids"] = torch.full_like(batch["task_ids"], task)
        batches.append(batch)
    return batches


def _data_task(data: MultiTaskData, name: str) -> int:
    if name not in data.task_names:
        raise DataError(
            f"task {name!r} is not among the tasks of the run's config ({', '.join(data.task_names)}): its "
            "router decides per input, so exporting it needs its training inputs to average the gate; export "
            "it from the run whose config lists it"
        )
    return data.task_id(name)


@contextmanager
def merged(model: MultiTaskModel, task: int, gate: Gate | None) -> Iterator[None]:
    """The model with every adapted layer's fixed gate (the task's, or `gate`) folded into its base weight, as the
    exported adapter computes; unmerged again on exit."""
    info = get_info(model.backbone)
    done = []
    try:
        for layer in info.layers:
            layer.merge(fixed_gate(model.backbone, layer, task=task, gate=gate))
            done.append(layer)
        yield
    finally:
        for layer in done:
            layer.unmerge()


@torch.no_grad()
def _outputs(model: MultiTaskModel, batches: Sequence[dict[str, Tensor]]) -> tuple[Tensor, Tensor | None]:
    """Pooled outputs `(n, d)` and the head's decisions `(n,)` (None for a head that cannot decide alone)."""
    device = next(model.parameters()).device
    pooled, decided = [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with routed(model, batch):
            vectors = model.pooled(batch)
            decide = getattr(model.heads, "decide", None)
            if decide is not None:
                decided.append(decide(model.heads(vectors, batch, model), batch["task_ids"]).cpu())
        pooled.append(vectors.float().cpu())
    return torch.cat(pooled), torch.cat(decided) if decided else None


def compare(
    model: MultiTaskModel, task: int, gate: Gate, batches: Sequence[dict[str, Tensor]], task_type: str
) -> dict[str, Any]:
    """How far the model with `gate` merged is from the routed model on these batches: the L2 distance of the pooled
    outputs (over all of them) relative to the routed outputs and relative to what the adapters change (routed
    against the base model: a small share of a large output can still be all of the adaptation), and for
    classification the share of equal head decisions and both accuracies."""
    model.eval()
    routed_pooled, routed_decided = _outputs(model, batches)
    with merged(model, task, gate):
        exported_pooled, exported_decided = _outputs(model, batches)
    with disabled(model.backbone):
        base_pooled, _ = _outputs(model, batches)
    error = (exported_pooled - routed_pooled).norm()
    change = (routed_pooled - base_pooled).norm()
    check: dict[str, Any] = {
        "examples": int(routed_pooled.shape[0]),
        "relative_l2": float(error / routed_pooled.norm().clamp_min(1e-12)),
        "of_adapter_change": float(error / change) if change > 0 else None,
    }
    if task_type == "classification" and routed_decided is not None and exported_decided is not None:
        labels = torch.cat([batch["labels"] for batch in batches]).float()
        check["agreement"] = float((routed_decided == exported_decided).float().mean())
        check["accuracy_routed"] = float((routed_decided == labels).float().mean())
        check["accuracy_exported"] = float((exported_decided == labels).float().mean())
    return check


@torch.no_grad()
def head_rows(
    model: MultiTaskModel, task: int, gate: Gate | None
) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
    """The task's head as tensors to apply to the pooled output, and its description; None and the reason for a
    head kind that has no such form."""
    heads = model.heads
    if isinstance(heads, TaskHeads):
        start, size = int(heads.offsets[task]), int(heads.sizes[task])
        tensors = {
            "weight": heads.proj.weight[start : start + size].detach().float().cpu(),
            "bias": heads.proj.bias[start : start + size].detach().float().cpu(),
        }
        if heads.is_regression[task]:
            return tensors, {
                "kind": "regression",
                "formula": "value = pooled @ weight.T + bias (weight: 1 row)",
            }
        return tensors, {
            "kind": "classification",
            "formula": "logits = pooled @ weight.T + bias (one row a label)",
        }
    if isinstance(heads, LabelPromptHead):
        model.eval()
        rows = heads.own[task].nonzero().squeeze(1)
        inputs = {
            "input_ids": heads.label_input_ids[rows],
            "attention_mask": heads.label_attention_mask[rows],
        }
        with merged(model, task, gate):
            classes = model.encode(inputs, route_ids=torch.full((len(rows),), task, device=rows.device))
        scale = heads.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp()
        weight = scale * F.normalize(classes.float(), dim=-1)
        return {"weight": weight.cpu()}, {
            "kind": "label-prompt",
            "formula": "logits = normalize(pooled) @ weight.T (each row: a label text encoded by this adapter, "
            "L2-normalised, times the learned scale)",
        }
    return None, {"missing": f"head kind {type(heads).__name__} has no per-task rows to save"}


def export_task(
    run: RunConfig,
    model: MultiTaskModel,
    tasks: Sequence[Mapping[str, Any]],
    task: int,
    out: str | Path,
    *,
    load_data: Callable[[], tuple[MultiTaskData, Any, str]],
    method: str,
    base_model: str | None = None,
    gate_note: Callable[[MultiTaskModel, int], str] | None = None,
) -> TaskExport:
    """Write task `task` of a finished run into `out` (see the module docstring). `load_data()` gives the run's
    data, a collator and the evaluation split; it is called only when the router decides per input. `base_model`:
    what the adapter names as its base (default: the run's model; a run that trained its backbone names the trained
    base written beside it). `gate_note(model, task)`: what a fixed gate's export is, in words (default
    :func:`fixed_gate_note`; a method that predicts otherwise than through that gate says how). The files are
    written one by one: callers that want the folder whole or not at all write into `io.files.atomic_folder`."""
    out = Path(out)
    info = get_info(model.backbone)
    unfolded = sorted({layer.experts.kind for layer in info.layers if not layer.experts.mergeable})
    if unfolded:  # refused before any data is read
        raise unfolded_error(method, unfolded)
    meta = tasks[task]
    name = str(meta["name"])
    task_type = str(meta.get("task_type", "classification"))
    generation = task_type == GENERATION
    gate: Gate | None = None
    note: dict[str, Any] = {
        "task": name,
        "task_id": task,
        "method": method,
        "router": info.config.router,
        "base_model": base_model or hub_name(run.model),
        "task_type": task_type,
        "labels": list(meta.get("labels") or []),
        "pooling": None if generation else model.pooling,
    }
    if needs_mean_gate(model, task):
        if generation:
            raise ConfigError(
                f"task {name!r} is a generation task and router '{info.config.router}' chooses experts per input: "
                "no fixed LoRA computes that routing, so no static server (vLLM, LoRAX, one PEFT adapter) can serve "
                "it, and the mean-gate approximation that classification tasks get (the gate averaged over the "
                "task's inputs, its gap measured on pooled outputs) is not available for generation tasks; serve "
                "this run with loramix itself, or train it with a router that routes by task (mola-grad, "
                "per-task-lora) or a Poly table, which export exactly"
            )
        data, collator, split = load_data()
        own, size = _data_task(data, name), run.eval_batch_size
        train = _batches(data.eval_examples("train", own, GATE_EXAMPLES), collator, size, task)
        gate = mean_gate(model.backbone, _model_inputs(train), task=task)
        split = split if data.examples(split, own) else "train"  # a task may come with a train split alone
        check_batches = _batches(data.eval_examples(split, own, CHECK_EXAMPLES), collator, size, task)
        check = compare(model, task, gate, check_batches, task_type)
        check["split"] = split
        values = gate.tolist() if isinstance(gate, Tensor) else {k: v.tolist() for k, v in gate.items()}
        note["gate"] = {
            "kind": "mean",
            "note": (
                f"router '{info.config.router}' chooses experts per input, which one LoRA cannot; this adapter is "
                f"the task's mean gate over {sum(len(b['task_ids']) for b in train)} of its training inputs, "
                "an approximation of per-input routing"
            ),
            "examples": sum(len(b["task_ids"]) for b in train),
            "per_layer": isinstance(gate, dict),
            "values": values,
            "check": check,
        }
    else:
        note["gate"] = {"kind": "task", "note": (gate_note or fixed_gate_note)(model, task)}
    export_peft(
        model.backbone,
        out,
        task=None if gate is not None else task,
        gate=gate,
        base_model_name_or_path=note["base_model"],
    )
    note["rank"] = int(read_json(out / "adapter_config.json")["r"])
    if generation:
        note["head"] = None
        note["head_missing"] = (
            "a generation task: the causal LM's own output layer gives its tokens, so there are no head rows to "
            "save; the adapter alone serves the task"
        )
    else:
        tensors, head = head_rows(model, task, gate)
        if tensors is not None:
            atomic_save_tensors(out / HEAD_FILE, tensors, metadata={"format": "pt"})
            note["head"] = {"file": HEAD_FILE, **head}
        else:
            note["head"] = None
            note["head_missing"] = head["missing"]
    atomic_write_json(out / NOTE_FILE, note)
    return TaskExport(out, note)


def fixed_gate_note(model: MultiTaskModel, task: int) -> str:
    """What a task's fixed gate is, in words: why its export is exact."""
    info = get_info(model.backbone)
    if info.router_class.scope is None:
        return "one adapter shared by every task (no router): exact"
    gates = [fixed_gate(model.backbone, layer, task=task, gate=None) for layer in info.layers]
    used = max(int((g != 0).sum()) for g in gates)
    if used == 1:
        return "the task's own expert, chosen by task id: exact"
    return (
        f"router '{info.config.router}' gives the task a fixed mixture of {used} experts (the same for every input "
        "of the task), folded into one LoRA: exact"
    )
