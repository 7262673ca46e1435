"""save -> load into a fresh base gives the same model; every broken or foreign directory fails with a
CheckpointError that names the file and the problem; a crash in the middle of a save never corrupts the
previous one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loramix
import loramix.io.checkpoint as checkpoint
import loramix.io.files as files
from loramix import CheckpointError
from loramix.inject import is_injected
from loramix.io import read_checkpoint
from loramix.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from tests.io.toys import bert_pair, randomize_adapters, routed, task_settings, tiny_bert, token_ids

TASK_IDS = torch.tensor([0, 2])


def outputs(model: nn.Module, task_ids: torch.Tensor = TASK_IDS) -> torch.Tensor:
    with routed(model, task_ids):
        out = model(input_ids=token_ids())
    return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], dim=1)


def adapted_bert(router: str = "task", share: str = "none", **settings: Any):
    """(adapted model with random adapters, untouched copy of its base)."""
    model, fresh = bert_pair()
    config = {"rank": 4, "targets": ["query", "value"], "share": share, **task_settings(router), **settings}
    loramix.inject(model, config)
    randomize_adapters(model)
    return model.eval(), fresh


# ---- round trip ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", ["none", "A", "B"])
@pytest.mark.parametrize("router", ["none", "task", "poly", "token", "sample"])
def test_save_load_gives_identical_outputs(tmp_path: Path, router: str, share: str) -> None:
    model, fresh = adapted_bert(router, share)
    expected = outputs(model)
    base_out = fresh(input_ids=token_ids()).last_hidden_state
    assert not torch.allclose(expected[:, : base_out[0].numel()], base_out.flatten(1), atol=1e-3)

    loramix.save(model, tmp_path / "adapters")
    loaded = loramix.load(fresh, tmp_path / "adapters").eval()

    assert loramix.get_info(loaded).config == loramix.get_info(model).config
    assert torch.equal(outputs(loaded), expected)


def test_frozen_experts_stay_frozen_after_load(tmp_path: Path) -> None:
    model, fresh = adapted_bert("task")
    for layer in loramix.get_info(model).layers:
        layer.experts.freeze_experts([1])
        with torch.no_grad():  # what an optimizer's weight decay does to the parameter behind a frozen expert
            layer.experts.A[1].mul_(0.5)
            layer.experts.B[1].add_(1.0)
    expected = outputs(model, torch.tensor([1, 0]))

    loramix.save(model, tmp_path)
    loramix.load(fresh, tmp_path)

    assert torch.equal(outputs(fresh, torch.tensor([1, 0])), expected)
    layers = loramix.get_info(fresh).layers
    assert all(layer.experts.frozen_experts == [1] for layer in layers)
    with loramix.routing(fresh, task_ids=torch.tensor([0, 1, 2])):
        fresh(input_ids=token_ids(batch=3)).last_hidden_state.square().sum().backward()
    grad_A = layers[0].experts.A.grad
    assert grad_A is not None
    assert torch.count_nonzero(grad_A[1]) == 0
    assert torch.count_nonzero(grad_A[0]) > 0 and torch.count_nonzero(grad_A[2]) > 0


def test_load_into_restores_a_model_that_carries_the_same_adapters(tmp_path: Path) -> None:
    """A resumed trainer's path: the adapters are already injected; a save of other settings is refused."""
    model, fresh = adapted_bert("task")
    for layer in loramix.get_info(model).layers:
        layer.experts.freeze_experts([1])
    expected = outputs(model)
    loramix.save(model, tmp_path / "a")
    loramix.inject(fresh, loramix.get_info(model).config)
    randomize_adapters(fresh)  # other values, which the load replaces
    assert checkpoint.load_into(fresh, tmp_path / "a") is fresh
    assert torch.equal(outputs(fresh), expected)
    assert all(layer.experts.frozen_experts == [1] for layer in loramix.get_info(fresh).layers)
    other, _ = adapted_bert("task", rank=2)
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE}: saved with other adapter settings"):
        checkpoint.load_into(other, tmp_path / "a")


def test_modules_to_save_round_trip(tmp_path: Path) -> None:
    model, fresh = adapted_bert("sample", modules_to_save=["pooler"])
    with torch.no_grad():
        model.pooler.dense.weight.normal_()
    expected = outputs(model)

    loramix.save(model, tmp_path)
    _, tensors = read_checkpoint(tmp_path)
    assert "pooler.dense.weight" in tensors
    assert "embeddings.word_embeddings.weight" not in tensors  # the frozen backbone is not written
    loramix.load(fresh, tmp_path)

    assert torch.equal(fresh.pooler.dense.weight, model.pooler.dense.weight)
    assert fresh.pooler.dense.weight.requires_grad
    assert torch.equal(outputs(fresh), expected)


def test_trained_backbone_round_trips(tmp_path: Path) -> None:
    model, fresh = adapted_bert("token", train_backbone=True)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(0.5)
        model.encoder.layer[0].attention.self.query.base_layer.weight.mul_(-1)
        model.encoder.layer[1].output.dense.weight.normal_()
    expected = outputs(model)

    loramix.save(model, tmp_path)
    loramix.load(fresh, tmp_path)

    assert torch.equal(outputs(fresh), expected)
    assert all(p.requires_grad for p in fresh.parameters())


def test_extra_tensors_and_metadata_round_trip(tmp_path: Path) -> None:
    model, _ = adapted_bert("task")
    heads = {"head.0": torch.randn(3, 32), "head.1": torch.arange(6, dtype=torch.int64)}
    metadata = {"step": 120, "tasks": ["sst2", "trec", "qnli"], "nested": {"lr": 1e-3}}

    loramix.save(model, tmp_path, metadata=metadata, extra_tensors=heads)
    record, tensors = read_checkpoint(tmp_path)

    assert record["metadata"] == metadata
    assert record["library"] == "loramix"
    assert record["layers"] == loramix.get_info(model).names
    for key, value in heads.items():
        assert torch.equal(tensors[f"extra.{key}"], value) and tensors[f"extra.{key}"].dtype == value.dtype
    loramix.load(tiny_bert(), tmp_path)  # extra tensors are not taken for model parameters


def test_loading_a_run_folder_points_at_its_adapter_folder(tmp_path: Path) -> None:
    model, _ = adapted_bert("task")
    loramix.save(model, tmp_path / "run" / "adapter")
    with pytest.raises(CheckpointError, match=r"run: a run folder; its adapters are in .*run/adapter"):
        loramix.load(tiny_bert(), tmp_path / "run")


def test_saving_into_a_file_is_refused_by_name(tmp_path: Path) -> None:
    model, _ = adapted_bert("task")
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(CheckpointError, match="afile is a file; adapters are saved into a folder"):
        loramix.save(model, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "mine"


def test_saving_a_merged_model_is_refused(tmp_path: Path) -> None:
    model, _ = adapted_bert("task")
    loramix.get_info(model).layers[0].merge(torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(CheckpointError, match="merged"):
        loramix.save(model, tmp_path)
    assert not (tmp_path / CONFIG_FILE).exists()


# ---- broken and foreign directories ------------------------------------------------------------------------


def edit_json(path: Path, **changes: Any) -> None:
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def rewrite_tensors(directory: Path, edit: Callable[[dict], None], *, list_them: bool = True) -> None:
    """Rewrite the weights file and vouch for it in the config, as a consistent but foreign save would."""
    tensors = load_file(directory / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_FILE)
    changes: dict[str, Any] = {"weights_sha256": files.sha256_of(directory / WEIGHTS_FILE)}
    if list_them:
        changes["tensors"] = sorted(tensors)
    edit_json(directory / CONFIG_FILE, **changes)


def _no_directory(d: Path, other: Path) -> Path:
    return d / "never-saved"


def _no_config(d: Path, other: Path) -> Path:
    (d / CONFIG_FILE).unlink()
    return d


def _config_not_json(d: Path, other: Path) -> Path:
    (d / CONFIG_FILE).write_text('{"library": "loramix", "format_version": 1,')
    return d


def _config_not_object(d: Path, other: Path) -> Path:
    (d / CONFIG_FILE).write_text("[1, 2]")
    return d


def _peft_config(d: Path, other: Path) -> Path:
    (d / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["query"]}))
    return d


def _other_library(d: Path, other: Path) -> Path:
    edit_json(d / CONFIG_FILE, library="adapters")
    return d


def _newer_format(d: Path, other: Path) -> Path:
    edit_json(d / CONFIG_FILE, format_version=checkpoint.FORMAT_VERSION + 1)
    return d


def _invalid_adapter_config(d: Path, other: Path) -> Path:
    record = json.loads((d / CONFIG_FILE).read_text())
    record["config"]["rank"] = 0
    (d / CONFIG_FILE).write_text(json.dumps(record))
    return d


def _no_weights(d: Path, other: Path) -> Path:
    (d / WEIGHTS_FILE).unlink()
    return d


def _truncated(d: Path, other: Path) -> Path:
    data = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    return d


def _truncated_without_checksum(d: Path, other: Path) -> Path:
    _truncated(d, other)
    record = json.loads((d / CONFIG_FILE).read_text())
    del record["weights_sha256"]
    (d / CONFIG_FILE).write_text(json.dumps(record))
    return d


def _weights_from_another_save(d: Path, other: Path) -> Path:
    (d / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    return d


def _unlisted_tensor(d: Path, other: Path) -> Path:
    rewrite_tensors(d, lambda t: t.update(stowaway=torch.zeros(2)), list_them=False)
    return d


def _unknown_tensor(d: Path, other: Path) -> Path:
    rewrite_tensors(d, lambda t: t.update({"encoder.layer.9.attention.self.query.experts.A": torch.zeros(2)}))
    return d


def _missing_tensor(d: Path, other: Path) -> Path:
    rewrite_tensors(d, lambda t: t.pop("encoder.layer.1.attention.self.value.experts.B"))
    return d


def _wrong_rank(d: Path, other: Path) -> Path:
    record = json.loads((d / CONFIG_FILE).read_text())
    record["config"]["rank"] = 8
    (d / CONFIG_FILE).write_text(json.dumps(record))
    return d


def _unknown_router(d: Path, other: Path) -> Path:
    record = json.loads((d / CONFIG_FILE).read_text())
    record["config"]["router"] = "magic"  # a kind this loramix does not have (a plugin not imported, say)
    (d / CONFIG_FILE).write_text(json.dumps(record))
    return d


BROKEN = {
    # case: (break the directory, model to load into, what the message must say, file it must name)
    "missing directory": (_no_directory, tiny_bert, "no such adapter directory", "never-saved"),
    "missing config": (_no_config, tiny_bert, "file not found", CONFIG_FILE),
    "config not JSON": (_config_not_json, tiny_bert, "not valid JSON", CONFIG_FILE),
    "config not an object": (_config_not_object, tiny_bert, "JSON object", CONFIG_FILE),
    "config of PEFT": (_peft_config, tiny_bert, "not a loramix adapter config", CONFIG_FILE),
    "config of another library": (_other_library, tiny_bert, "not a loramix adapter config", CONFIG_FILE),
    "newer format_version": (_newer_format, tiny_bert, "newer than this loramix reads", CONFIG_FILE),
    "invalid adapter config": (_invalid_adapter_config, tiny_bert, "rank", CONFIG_FILE),
    "unknown router kind": (_unknown_router, tiny_bert, "router: router 'magic' is not one of", CONFIG_FILE),
    "missing weights": (_no_weights, tiny_bert, "file not found", WEIGHTS_FILE),
    "truncated weights": (_truncated, tiny_bert, "checksum does not match", WEIGHTS_FILE),
    "truncated, no checksum": (
        _truncated_without_checksum,
        tiny_bert,
        "not a readable safetensors",
        WEIGHTS_FILE,
    ),
    "weights of another save": (
        _weights_from_another_save,
        tiny_bert,
        "checksum does not match",
        WEIGHTS_FILE,
    ),
    "unlisted tensor": (_unlisted_tensor, tiny_bert, "other tensors than", WEIGHTS_FILE),
    "unknown tensor": (_unknown_tensor, tiny_bert, "no parameter for: encoder.layer.9", WEIGHTS_FILE),
    "missing tensor": (_missing_tensor, tiny_bert, "missing from the file: encoder.layer.1", WEIGHTS_FILE),
    "other hidden size": (lambda d, o: d, lambda: tiny_bert(hidden_size=48), "has shape", WEIGHTS_FILE),
    "other rank": (_wrong_rank, tiny_bert, "has shape", WEIGHTS_FILE),
    "other layers": (
        lambda d, o: d,
        lambda: tiny_bert(num_hidden_layers=1),
        "saved for other layers than this model has (not found here: encoder.layer.1.",
        CONFIG_FILE,
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_directory_fails_clearly(tmp_path: Path, case: str) -> None:
    break_it, make_target, problem, file_name = BROKEN[case]
    model, _ = adapted_bert("task", modules_to_save=["pooler"])
    loramix.save(model, tmp_path / "good")
    randomize_adapters(model)
    loramix.save(model, tmp_path / "other")
    directory = break_it(tmp_path / "good", tmp_path / "other")
    target = make_target()
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(CheckpointError) as caught:
        loramix.load(target, directory)

    message = str(caught.value)
    assert problem in message
    assert str(tmp_path / "good") in message and file_name in message
    # a failed load leaves the model untouched
    assert not is_injected(target)
    assert target.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_failed_load_can_be_retried(tmp_path: Path) -> None:
    model, fresh = adapted_bert("task")
    loramix.save(model, tmp_path)
    good = (tmp_path / WEIGHTS_FILE).read_bytes()
    _truncated(tmp_path, tmp_path)
    _wrong_rank(tmp_path, tmp_path)
    with pytest.raises(CheckpointError):
        loramix.load(fresh, tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(good)
    edit_json(tmp_path / CONFIG_FILE, config=loramix.get_info(model).config.to_dict())
    assert torch.equal(outputs(loramix.load(fresh, tmp_path)), outputs(model))


# ---- atomic writes ----------------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))


def half_written_save_file(tensors: dict, filename: str, metadata: Any = None) -> None:
    Path(filename).write_bytes(b"\x00" * 100)
    raise OSError("No space left on device")


def failing_replace(src: Any, dst: Any) -> None:
    raise OSError("simulated crash during rename")


@pytest.mark.parametrize(
    "crash",
    [
        pytest.param((files, "save_file", half_written_save_file), id="save_file"),
        pytest.param((os, "replace", failing_replace), id="os.replace"),
        pytest.param((files, "sha256_of", lambda path: 1 / 0), id="checksum"),
    ],
)
def test_crash_during_save_keeps_previous_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: tuple
) -> None:
    model, fresh = adapted_bert("task")
    expected = outputs(model)
    loramix.save(model, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    randomize_adapters(model)

    with monkeypatch.context() as patch:
        patch.setattr(*crash)
        with pytest.raises((OSError, ZeroDivisionError)):
            loramix.save(model, tmp_path)

    assert leftovers(tmp_path) == []
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert torch.equal(outputs(loramix.load(fresh, tmp_path)), expected)


def test_crash_writing_the_config_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = adapted_bert("task")
    loramix.save(model, tmp_path)
    old_config = (tmp_path / CONFIG_FILE).read_bytes()
    randomize_adapters(model)
    calls = []

    def fsync_fails_for_the_config(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the first flushes the weights, the second the config
            raise OSError("I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "fsync", fsync_fails_for_the_config)
        with pytest.raises(OSError, match="I/O error"):
            loramix.save(model, tmp_path)

    assert len(calls) == 2
    assert leftovers(tmp_path) == []
    assert (tmp_path / CONFIG_FILE).read_bytes() == old_config


def test_crash_between_weights_and_config_refuses_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, fresh = adapted_bert("task")
    loramix.save(model, tmp_path)
    randomize_adapters(model)

    def crash(path: Path, obj: Any) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "atomic_write_json", crash)
        with pytest.raises(OSError, match="power cut"):
            loramix.save(model, tmp_path)

    assert leftovers(tmp_path) == []
    with pytest.raises(CheckpointError, match="checksum does not match") as caught:
        loramix.load(fresh, tmp_path)
    assert WEIGHTS_FILE in str(caught.value)
    assert not is_injected(fresh)
