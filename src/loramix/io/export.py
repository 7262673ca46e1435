"""Exchange with PEFT: export one task's expert (or a fixed mixture) as a standard PEFT LoRA directory, and
import PEFT LoRA directories as experts.

A fixed mixture `s * sum_e g_e B_e A_e` is written as one LoRA of rank up to E*r (the experts' A rows stacked,
their gated and scaled B columns stacked). Every layer is padded to the same rank with zero rows and the scale is
folded into B, so the PEFT config needs no per-module patterns: `r = lora_alpha`, scaling 1. The mixture may differ
per layer (`gate={layer name: mixture}`), as the mean gate of routers that live in each layer does.

A router that chooses per input (per sample or per token) has no fixed mixture; :func:`mean_gate` gives the one
that its gates average to over some inputs, which is what such a model can be exported as: an approximation of
per-input routing, exact only when the router gives every input the same gate.

Several exported adapters on one base are what multi-LoRA servers load; :func:`serving_commands` writes the vLLM
command line and the LoRAX request parameters for a set of them.
"""

from __future__ import annotations

import importlib
import re
import shlex
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loramix.context import routing
from loramix.errors import CheckpointError, InjectionError
from loramix.experts import AdaptedLayer, Conv1DExperts, Conv2dExperts
from loramix.inject import InjectionReport, _matches, get_info, inject
from loramix.io.files import atomic_save_tensors, atomic_write_json, read_json, read_tensors
from loramix.merge import check_task_or_gate, fixed_gate
from loramix.models import ALIASES, resolve_model_path, written_as_path
from loramix.routers import router_class

PEFT_PREFIX = "base_model.model."
# The hub name of each built-in model alias: what an exported adapter records as its base, so that it loads on
# another machine (the alias's offline copy lives in a folder inside this installation).
HUB_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# The values vLLM's `--max-lora-rank` accepts (its LoRA config refuses any other).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def hub_name(name: str) -> str:
    """The base model name a PEFT adapter should record for `name`: the hub name of a built-in alias, or of a path
    that is an alias's offline copy; the local folder of an alias that has no hub name (the tiny random causal LMs:
    only that folder holds their weights); any other name or path as it is (a local model has no hub name)."""
    if name in HUB_NAMES:
        return HUB_NAMES[name]
    if name in ALIASES:
        return resolve_model_path(name)
    path = Path(name).expanduser()
    if not path.is_dir():
        return name
    for alias, package in ALIASES.items():
        if alias not in HUB_NAMES:
            continue
        try:
            copy = Path(importlib.import_module(package).get_model_path())
        except (ImportError, AttributeError):
            continue
        if copy.resolve() == path.resolve():
            return HUB_NAMES[alias]
    return name


def hub_model(name: str, folder: Path | None = None) -> str | None:
    """The Hugging Face Hub name a model `name` loads from on another machine: a built-in alias's (or its offline
    copy's) hub name, or `name` itself where it is written as a hub name and is no folder (read against `folder`);
    None for a local model or an alias that has no hub name."""
    if not name or (name in ALIASES and name not in HUB_NAMES):
        return None
    name = hub_name(name)
    if written_as_path(name) or ((folder or Path()) / name).exists():
        return None
    return name


def _low_rank_factors(layer: AdaptedLayer, gate: Tensor) -> tuple[Tensor, Tensor]:
    """`(A, B)` with `B @ A == s * sum_e g_e B_e A_e`, keeping only experts with a non-zero gate."""
    layer._check_mergeable()
    A, B = (w.detach().float() for w in layer.experts.weights())
    gate = gate.to(A.device)
    s = layer.scaling
    if A.shape[0] == 1 and B.shape[0] == 1:  # one expert
        return A[0], s * gate.sum() * B[0]
    if A.shape[0] == 1:  # shared A: sum the B's
        return A[0], s * torch.einsum("e,eor->or", gate, B)
    if B.shape[0] == 1:  # shared B: sum the A's
        return torch.einsum("e,eri->ri", gate, A), s * B[0]
    used = [e for e in range(gate.numel()) if float(gate[e]) != 0.0] or [0]  # all-zero gate: one zero LoRA
    A_stack = torch.cat([A[e] for e in used], dim=0)  # (k*r, i)
    B_stack = torch.cat([s * float(gate[e]) * B[e] for e in used], dim=1)  # (o, k*r)
    return A_stack, B_stack


def export_peft(
    model: nn.Module,
    directory: str | Path,
    *,
    task: int | None = None,
    gate: Tensor | list[float] | Mapping[str, Tensor | list[float]] | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write one task's expert (or the fixed mixture `gate`) as a PEFT LoRA adapter directory.

    `gate` is one mixture `(e,)` for every layer or `{layer name: mixture}`, e.g. what :func:`mean_gate` returns.
    The recorded base model is `base_model_name_or_path`, else the model's own `_name_or_path`; a built-in alias or
    its offline copy is recorded by its hub name (:func:`hub_name`).

    Example:
        >>> loramix.export_peft(model, "exported/task2", task=2)
        >>> peft_model = PeftModel.from_pretrained(base_model, "exported/task2")
    """
    from peft import LoraConfig

    info = get_info(model)
    check_task_or_gate(task, gate)
    dilated = [
        name
        for name, layer in zip(info.names, info.layers)
        if isinstance(layer, Conv2dExperts) and tuple(layer.base_layer.dilation) != (1, 1)
    ]
    if dilated:  # PEFT's LoRA conv has no dilation: its lora_A would not see what loramix's A sees
        raise CheckpointError(
            f"cannot export dilated Conv2d layers as a PEFT LoRA (PEFT ignores dilation): {', '.join(dilated[:5])}"
        )
    factors = {}
    for name, layer in zip(info.names, info.layers):
        g = fixed_gate(model, layer, task=task, gate=gate)  # type: ignore[arg-type]
        factors[name] = _low_rank_factors(layer, g)
    rank = max(A.shape[0] for A, _ in factors.values())
    tensors = {}
    for name, (A, B) in factors.items():
        layer = info.layers[info.names.index(name)]
        pad = rank - A.shape[0]
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        if isinstance(layer, Conv2dExperts):
            conv = layer.base_layer
            A = A.reshape(rank, conv.in_channels, *conv.kernel_size)
            B = B[..., None, None]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    saved_modules = list(info.config.modules_to_save)  # trained whole: PEFT keeps them as modules_to_save
    for module_name, module in model.named_modules():
        if any(_matches(module_name, target) for target in saved_modules):
            for param_name, param in module.named_parameters():
                tensors.setdefault(f"{PEFT_PREFIX}{module_name}.{param_name}", param.detach().contiguous())
    if info.config.train_backbone and base_model_name_or_path is None:
        warnings.warn(
            "export_peft: the backbone was trained with the adapters, so the adapter holds only their part; save "
            "the trained model (`save_pretrained`) and pass that folder as base_model_name_or_path, the base that "
            "PEFT must load it on (`loramix export` writes it as base/)",
            UserWarning,
            stacklevel=2,
        )
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules="^(?:" + "|".join(re.escape(n) for n in info.names) + ")$",
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=any(isinstance(layer, Conv1DExperts) for layer in info.layers),
        base_model_name_or_path=hub_name(base) if base else base,
        modules_to_save=saved_modules or None,
        inference_mode=True,
        # a causal LM's adapter loads as PEFT's causal-LM model (`generate` as on the base)
        task_type="CAUSAL_LM"
        if callable(getattr(model, "can_generate", None)) and model.can_generate()
        else None,
    )
    directory = Path(directory)
    atomic_save_tensors(directory / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(directory / "adapter_config.json", config.to_dict())
    return directory


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that holds adapters of rank `rank`; None above its largest."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


def serving_commands(
    base_model: str, adapters: Mapping[str, str | Path], rank: int, quantize: str | None = None
) -> dict[str, Any]:
    """How vLLM and LoRAX serve these PEFT LoRA adapters (`{served name: adapter folder}`, of rank up to `rank`) on
    `base_model`: vLLM's command line (every adapter registered at start, requests name one as their `model`) and
    LoRAX's launch line and per-request parameters (a local adapter is loaded by its folder on first use).
    `quantize` ("4bit", "8bit"): the adapters were trained on that bitsandbytes quantization of the base, and the
    servers quantize it as they can (vLLM in flight to 4 bits only), with a note that the numbers come close to
    the run's rather than equal them.

    Example:
        >>> serving_commands("meta-llama/Llama-3.2-1B", {"sql": "/srv/out/sql"}, 8)["vllm"]["command"]
        'vllm serve meta-llama/Llama-3.2-1B --enable-lora --lora-modules sql=/srv/out/sql --max-lora-rank 8 --max-loras 1'
    """
    lora_modules = " ".join(shlex.quote(f"{name}={path}") for name, path in adapters.items())
    max_rank = vllm_max_lora_rank(rank)
    vllm: dict[str, Any] = {"max_lora_rank": max_rank, "lora_modules": lora_modules}
    if max_rank is None:
        vllm["command"] = None
        vllm["note"] = (
            f"rank {rank} is above the largest --max-lora-rank vLLM accepts ({VLLM_MAX_LORA_RANKS[-1]})"
        )
    else:
        quantized = " --quantization bitsandbytes" if quantize == "4bit" else ""
        vllm["command"] = (
            f"vllm serve {shlex.quote(base_model)}{quantized} --enable-lora --lora-modules {lora_modules} "
            f"--max-lora-rank {max_rank} --max-loras {len(adapters)}"
        )
    lorax_quantize = {"4bit": " --quantize bitsandbytes-nf4", "8bit": " --quantize bitsandbytes"}
    lorax = {
        "command": f"lorax-launcher --model-id {shlex.quote(base_model)}{lorax_quantize.get(quantize or '', '')}",
        "requests": {
            name: {"adapter_id": str(path), "adapter_source": "local"} for name, path in adapters.items()
        },
    }
    commands: dict[str, Any] = {"vllm": vllm, "lorax": lorax}
    if quantize:
        commands["quantization_note"] = (
            f"the adapters were trained on a {quantize} bitsandbytes quantization of the base; the servers' "
            "quantization (vLLM's in flight is 4-bit only: an 8-bit run is served on the full-precision base) "
            "need not round as loramix's did, so their outputs come close to the run's rather than equal them"
        )
    return commands


@torch.no_grad()
def mean_gate(
    model: nn.Module, inputs: Iterable[Mapping[str, Any]], *, task: int | None = None
) -> Tensor | dict[str, Tensor]:
    """The gates the model's learned routers give these inputs, averaged: the fixed mixture that stands in for
    per-input routing when one LoRA must do (export, merge).

    Each element of `inputs` is one batch of keyword arguments to `model` (e.g. `input_ids`, `attention_mask`),
    run in eval mode inside `loramix.routing` with `task_ids` all `task` (routers that read the task id need it).
    A per-token gate is averaged over real tokens (those the batch's `attention_mask` marks), a per-sample gate
    over samples. Returns the model-wide router's mean `(e,)`, or `{layer name: (e,)}` for routers that live in
    each layer (each layer chooses on its own, so each gets its own mixture): either form goes to
    `export_peft(model, directory, gate=...)`.

    Why a mean: the model's output is linear in each layer's gate only layer by layer and input by input, so the
    mean gate is exact when the router gives every input the same gate and an approximation otherwise; measure
    the exported model against the routed one on held-out inputs before relying on it.

    Example:
        >>> gate = mean_gate(model, [tokenizer(texts, padding=True, return_tensors="pt")], task=2)
        >>> loramix.export_peft(model, "exported/task2", gate=gate)
    """
    info = get_info(model)
    device = info.layers[0].experts.device
    sums: dict[str, Tensor] = {}
    counts: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in inputs:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            mask = batch.get("attention_mask")
            size = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))
            task_ids = None if task is None else torch.full((size,), task, dtype=torch.long)
            with routing(model, task_ids=task_ids, attention_mask=mask) as state:
                model(**batch)
            for name, gate in state.records:
                weights = gate.weights.detach().float()
                if gate.per_token and mask is not None and mask.shape == weights.shape[:2]:
                    real = mask.to(weights.dtype)[..., None]  # (n, t, 1)
                    total, count = (weights * real).sum((0, 1)), float(real.sum())
                else:
                    flat = weights.reshape(-1, weights.shape[-1])
                    total, count = flat.sum(0), float(flat.shape[0])
                sums[name] = sums.get(name, 0) + total.cpu()
                counts[name] = counts.get(name, 0.0) + count
    finally:
        model.train(was_training)
    if not sums:
        raise InjectionError(
            f"no router recorded a gate on these inputs (router '{info.config.router}'): pass at least one batch; "
            "a model without a learned router needs no mean gate (export it by task, or without one)"
        )
    means = {name: sums[name] / max(counts[name], 1.0) for name in sums}
    return means["model"] if "model" in means else means


def _read_peft(directory: Path) -> tuple[dict[str, Any], dict[str, tuple[Tensor, Tensor]]]:
    """A PEFT LoRA directory as its config and `{module name: (A, B * scaling)}`."""
    config = read_json(directory / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{directory / 'adapter_config.json'}: peft_type is {config.get('peft_type')!r}, not 'LORA'"
        )
    weights_path = directory / "adapter_model.safetensors"
    if not weights_path.is_file() and (directory / "adapter_model.bin").is_file():
        raise CheckpointError(
            f"{directory}: only adapter_model.bin is there; loramix reads safetensors only (a .bin file is a "
            "pickle that could run code). Convert it with PEFT's save_pretrained(safe_serialization=True)"
        )
    tensors = read_tensors(weights_path)
    whole = [k for k in tensors if ".lora_" not in k]  # modules trained whole (PEFT's modules_to_save)
    if whole:
        raise CheckpointError(
            f"{weights_path}: besides its LoRA it holds whole modules ({', '.join(config.get('modules_to_save') or [])}"
            f"; {len(whole)} tensors), which one expert per adapter cannot carry; load them into the base model "
            "first (copy them from PeftModel.from_pretrained(base, ...)), then import an adapter without them"
        )
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    layers = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")].removeprefix(PEFT_PREFIX)
        B = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if B is None:
            raise CheckpointError(f"{weights_path}: {key} has no matching lora_B weight")
        r = A.shape[0]
        a = next((float(v) for k, v in alpha_pattern.items() if re.fullmatch(rf"(.*\.)?{k}", name)), alpha)
        scale = a / (r**0.5 if rslora else r)
        layers[name] = (A.float(), B.float() * scale)
    if not layers:
        raise CheckpointError(f"{weights_path}: no lora_A / lora_B weights found")
    return config, layers


def import_peft(
    model: nn.Module, directories: str | Path | list[str | Path], **config: Any
) -> InjectionReport:
    """Inject experts into `model`, one per PEFT LoRA directory (one directory: one expert), routed by task id
    (expert d for task d).

    `config` overrides adapter settings (e.g. `router="sample"`); rank and scale are taken from the adapters.

    Example:
        >>> loramix.import_peft(model, ["adapters/sst2", "adapters/trec"])
    """
    if isinstance(directories, (str, Path)):
        directories = [directories]
    if not directories:
        raise InjectionError("import_peft needs at least one PEFT adapter directory")
    read = [(Path(d), *_read_peft(Path(d))) for d in directories]
    names = sorted(read[0][2])
    for path, _, layers in read[1:]:
        if sorted(layers) != names:
            raise CheckpointError(
                f"{path}: adapts other modules than {read[0][0]}; experts must share their layers"
            )
    present = {name for name, _ in model.named_modules()}
    absent = [name for name in names if name not in present]
    if absent:
        shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        raise CheckpointError(
            f"{read[0][0]}: adapts modules this model does not have ({shown} of its {len(names)}); load it into "
            "the base model it was trained on"
        )
    rank = max(A.shape[0] for _, _, layers in read for A, _ in layers.values())
    settings = {
        "num_experts": len(read),
        "rank": rank,
        "alpha": float(rank),
        "router": "task",
        "num_tasks": len(read),
        "target_regex": "^(?:" + "|".join(re.escape(n) for n in names) + ")$",
    }
    settings.update(config)
    if settings.get("share", "none") != "none":
        raise InjectionError("import_peft builds independent experts; share must be 'none'")
    if not router_class(settings["router"]).needs_num_tasks:
        settings.pop("num_tasks")
    report = inject(model, settings)
    info = get_info(model)
    with torch.no_grad():
        for name, layer in zip(info.names, info.layers):
            s = layer.scaling
            for expert, (_, _, layers) in enumerate(read):
                A, B = layers[name]
                r = A.shape[0]
                bank = layer.experts
                bank.A[expert].zero_()
                bank.B[expert].zero_()
                bank.A[expert, :r] = A.reshape(r, -1).to(bank.A.dtype)
                bank.B[expert, :, :r] = (B.reshape(B.shape[0], r) / s).to(bank.B.dtype)
    return report
