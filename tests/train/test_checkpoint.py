"""Exact resumption: a run interrupted after a checkpoint and resumed ends bitwise where an uninterrupted run ends.
Checkpoints are checked file by file before use: a damaged one is skipped (a warning says which and why) for the
newest that verifies, a foreign optimizer file is a checkpoint error, interrupted saves are cleaned up, and a resume
with another config (outside bookkeeping) is refused unless allowed, and then recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loramix.cli import main
from loramix.errors import CheckpointError, ConfigError
from loramix.methods import run_training
from loramix.train import checkpoint as ckpt
from loramix.train.config import RunConfig
from tests.train import toys


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    history = [{k: v for k, v in h.items() if k != "samples_per_s"} for h in metrics["history"]]
    return {**metrics, "history": history}


# (method, steps, checkpoint_every, max_train_examples): the second has 6 batches per epoch, so it stops in epoch 1.
CASES = [("mola-router", 12, 6, None), ("token-router", 12, 8, 16)]


@pytest.mark.parametrize(("method", "steps", "every", "max_train_examples"), CASES)
def test_an_interrupted_run_resumes_exactly(
    method: str,
    steps: int,
    every: int,
    max_train_examples: int | None,
    model_dir: Path,
    tasks_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    # Dropout on the adapters and in BERT itself, so the RNG state must be restored too.
    settings = toys.settings(
        model_dir,
        tasks_dir,
        method=method,
        steps=steps,
        log_every=1,
        dropout=0.2,
        twd_weight=0.5,
        max_train_examples=max_train_examples,
    )
    assert toys.tiny_bert_config().hidden_dropout_prob > 0
    straight = run_training(RunConfig.from_dict(settings), tmp_path / "straight")

    run = RunConfig.from_dict({**settings, "checkpoint_every": every})
    toys.crash_at(monkeypatch, every + 1, run_training, run, tmp_path / "resumed")
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step-{every:06d}"
    assert not (tmp_path / "resumed" / "adapter").exists()

    resumed = run_training(run, tmp_path / "resumed", resume=True)

    a = load_file(tmp_path / "straight" / "adapter" / "adapters.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapters.safetensors")
    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert without_timings(resumed) == without_timings(straight)
    saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [h["step"] for h in saved["history"]] == list(range(1, steps + 1))
    logged = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == list(range(1, steps + 1))
    assert (checkpoints / "latest").read_text() == f"step-{steps:06d}"


def test_resuming_without_a_checkpoint_starts_from_step_zero(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="lora", steps=2))
    metrics = run_training(run, tmp_path, resume=True)
    assert "loramix: no checkpoint" in capsys.readouterr().err
    assert [h["step"] for h in metrics["history"]] == [2]


def test_a_new_run_in_an_old_run_s_folder_leaves_nothing_for_a_resume_to_read(
    model_dir: Path,
    tasks_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    """A run of 8 steps leaves checkpoints; a new run of 4 steps in the same folder dies before its first one: a
    resume starts that run from step 0 instead of at the old run's step 8. Checkpoints past a run's steps that are
    there anyway (copied in by hand) are refused by name."""
    settings = toys.settings(model_dir, tasks_dir, method="lora", checkpoint_every=3)
    run_training(RunConfig.from_dict({**settings, "steps": 8}), tmp_path / "run")
    assert any((tmp_path / "run" / "checkpoints").iterdir())  # the old run's
    short = RunConfig.from_dict({**settings, "steps": 4})
    from loramix.train import callbacks

    def die_at_step_two(self, trainer, logs):
        if trainer.step == 2:  # before its first checkpoint
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(callbacks.Checkpointer, "on_step_end", die_at_step_two)
        run_training(short, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    capsys.readouterr()
    resumed = run_training(short, tmp_path / "run", resume=True)
    assert "loramix: no checkpoint" in capsys.readouterr().err
    straight = run_training(short, tmp_path / "straight")
    assert without_timings(resumed)["history"] == without_timings(straight)["history"]
    run_training(RunConfig.from_dict({**settings, "steps": 8}), tmp_path / "long")
    (tmp_path / "straight" / "checkpoints").rename(tmp_path / "kept")
    (tmp_path / "long" / "checkpoints").rename(tmp_path / "straight" / "checkpoints")
    with pytest.raises(CheckpointError, match="past this run's 4 steps"):
        run_training(short, tmp_path / "straight", resume=True)


# ------------------------------------------------------------------------- damaged and foreign checkpoints


def overwrite_in_place(path: Path, size: int = 4096) -> None:
    """Replace up to `size` bytes of a file's payload with other plausible bytes, keeping its length: what a bad
    disk, a stray write or a half-synced copy leaves, and what no parser notices. A safetensors file keeps its
    header (so it still reads); any other file is overwritten from its middle."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":
        start = 8 + int.from_bytes(data[:8], "little")
    else:
        start = max(0, len(data) // 2 - size // 2)
    end = min(len(data), start + size)
    noise = torch.randn((end - start) // 4 + 1, generator=torch.Generator().manual_seed(7)) * 1e-2
    data[start:end] = noise.numpy().tobytes()[: end - start]
    assert len(data) == path.stat().st_size
    path.write_bytes(bytes(data))


def refresh_manifest(checkpoint: Path) -> None:
    """Record the files' current checksums, as someone who rewrote a file on purpose would."""
    manifest = checkpoint / "manifest.json"
    if manifest.is_file():
        record = json.loads(manifest.read_text())
        for name in record["files"]:
            record["files"][name] = {
                "sha256": hashlib.sha256((checkpoint / name).read_bytes()).hexdigest(),
                "size": (checkpoint / name).stat().st_size,
            }
        manifest.write_text(json.dumps(record))


class _Exploit:
    """Unpickling this would create a file: proof that a reader ran code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_an_optimizer_file_with_a_class_in_it_is_a_checkpoint_error(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(toys.settings(model_dir, tasks_dir, method="lora", steps=2)))
    out = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(out)]) == 0
    checkpoint = out / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    torch.save({"state": {0: _Exploit(marker)}, "param_groups": []}, checkpoint / "optimizer.pt")
    refresh_manifest(checkpoint)  # the checksums vouch for the file: only the reader stands in the way
    capsys.readouterr()

    code = main(["train", str(config), "--output-dir", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert err.startswith("loramix: error:") and "Traceback" not in err
    assert str(checkpoint / "optimizer.pt") in err
    assert not marker.exists()


def test_a_checkpoint_overwritten_in_place_is_refused(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="mola-grad", steps=2))
    run_training(run, tmp_path)
    weights = tmp_path / "checkpoints" / "step-000002" / "weights.safetensors"
    overwrite_in_place(weights)
    with pytest.raises(CheckpointError, match="checksum") as caught:
        run_training(run, tmp_path, resume=True)
    assert str(weights) in str(caught.value)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_and_still_ends_exactly(
    model_dir: Path,
    tasks_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    settings = toys.settings(model_dir, tasks_dir, method="mola-router", steps=6, log_every=1, dropout=0.2)
    straight = run_training(RunConfig.from_dict(settings), tmp_path / "straight")
    run = RunConfig.from_dict({**settings, "checkpoint_every": 2, "keep_checkpoints": 2})
    toys.crash_at(monkeypatch, 5, run_training, run, tmp_path / "resumed")
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000002", "step-000004"]
    overwrite_in_place(checkpoints / "step-000004" / "optimizer.pt")
    capsys.readouterr()

    resumed = run_training(run, tmp_path / "resumed", resume=True)
    err = capsys.readouterr().err
    assert "step-000004" in err and "optimizer.pt" in err and "checksum" in err
    assert "resuming at step 2 of 6 from the newest checkpoint that verifies" in err  # where it went on from
    assert without_timings(resumed) == without_timings(straight)
    a = load_file(tmp_path / "straight" / "adapter" / "adapters.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapters.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    # the newest two are kept; the older one went once a newer one was safely written
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000004", "step-000006"]


def test_no_checkpoint_that_verifies_is_an_error_that_lists_each(tmp_path: Path):
    root = tmp_path / "checkpoints"
    model, optimizer = tiny_model_and_optimizer()
    for step in (1, 2):
        ckpt.save_training_checkpoint(root, step, {"model": model}, optimizer, {})
    (root / "step-000002" / "state.json").unlink()
    overwrite_in_place(root / "step-000001" / "weights.safetensors")
    with pytest.raises(CheckpointError) as caught:
        ckpt.newest_good_checkpoint(root)
    message = str(caught.value)
    assert str(root / "step-000002" / "state.json") in message
    assert str(root / "step-000001" / "weights.safetensors") in message and "checksum" in message


def test_a_pointer_to_a_missing_checkpoint_falls_back(tmp_path: Path):
    root = tmp_path / "checkpoints"
    model, optimizer = tiny_model_and_optimizer()
    ckpt.save_training_checkpoint(root, 3, {"model": model}, optimizer, {})
    (root / "latest").write_text("step-000009")
    path, skipped = ckpt.newest_good_checkpoint(root)
    assert path == root / "step-000003"
    assert len(skipped) == 1 and "step-000009" in skipped[0] and "does not exist" in skipped[0]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_only_the_newest_checkpoints_are_kept(tmp_path: Path, keep: int):
    root = tmp_path / "checkpoints"
    model, optimizer = tiny_model_and_optimizer()
    for step in range(1, 6):
        ckpt.save_training_checkpoint(root, step, {"model": model}, optimizer, {}, keep=keep)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(
        [f"step-{s:06d}" for s in range(6 - keep, 6)] + ["latest"]
    )
    # a run that starts over in the same folder: checkpoints of later steps belong to the run it replaces
    ckpt.save_training_checkpoint(root, 1, {"model": model}, optimizer, {}, keep=keep)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000001"]


def test_resume_removes_the_folders_an_interrupted_save_left(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="lora", steps=2))
    run_training(run, tmp_path)
    root = tmp_path / "checkpoints"
    for leftover in (".step-000003.k2j4x1.tmp", ".step-000003.a8b7c6"):  # the latter: an older loramix's name
        (root / leftover).mkdir()
        (root / leftover / "weights.safetensors").write_bytes(b"half")
    (root / ".latest.q1w2e3.tmp").write_bytes(b"step-")
    run_training(run, tmp_path, resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_run_directory_gets_the_users_usual_modes(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, umask: int
):
    """A team that shares a run directory reads it as it reads any file its members write."""
    old = os.umask(umask)
    try:
        run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="lora", steps=2))
        run_training(run, tmp_path)
    finally:
        os.umask(old)
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o777 & ~umask
    written = [*checkpoint.iterdir(), tmp_path / "checkpoints" / "latest", tmp_path / "config.yaml"]
    written += [*(tmp_path / "adapter").iterdir(), tmp_path / "metrics.json"]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def tiny_model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


# ------------------------------------------------------------------------------- resuming with another config


@pytest.mark.parametrize(
    "change", [{"lr": 1e-2}, {"seed": 3}, {"method": "per-task-lora"}, {"lr": 1e-2, "dropout": 0.0}]
)
def test_a_resume_with_another_config_is_refused_before_anything_is_written(
    change: dict[str, Any], model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    settings = toys.settings(model_dir, tasks_dir, method="mola-grad", steps=2)
    run_training(RunConfig.from_dict(settings), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as caught:
        run_training(RunConfig.from_dict({**settings, **change}), tmp_path, resume=True)
    message = str(caught.value)
    assert str(tmp_path / "config.yaml") in message and "--allow-config-change" in message
    for key in change:
        assert key in message
    assert "log_every (" not in message  # bookkeeping is only listed as what may change
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_bookkeeping_may_change_on_resume(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    settings = toys.settings(model_dir, tasks_dir, method="mola-grad", steps=2)
    run_training(RunConfig.from_dict(settings), tmp_path)
    changed = {
        "log_every": 1,
        "checkpoint_every": 1,
        "progress": True,
        "eval_batch_size": 5,
        "keep_checkpoints": 4,
        "gradient_checkpointing": True,  # e.g. turned on to fit memory on another machine
    }
    metrics = run_training(RunConfig.from_dict({**settings, **changed}), tmp_path, resume=True)
    assert metrics["history"][-1]["step"] == 2
    assert not (tmp_path / "config-changes.jsonl").exists()


def test_allow_config_change_resumes_and_records_what_changed(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(toys.settings(model_dir, tasks_dir, method="mola-grad", steps=2)))
    out = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(out)]) == 0
    capsys.readouterr()

    argv = [
        "train",
        str(config),
        "--output-dir",
        str(out),
        "--resume",
        "--set",
        "lr=0.02",
        "--set",
        "log_every=1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lr (0.005 -> 0.02)" in err and "--allow-config-change" in err and "log_every (" not in err

    assert main([*argv, "--allow-config-change"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.02
    records = [json.loads(line) for line in (out / "config-changes.jsonl").read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["changed"] == {"lr": {"from": 0.005, "to": 0.02}}

    assert main(["train", str(config), "--output-dir", str(out), "--allow-config-change"]) == 2
    assert "--allow-config-change" in capsys.readouterr().err


@pytest.mark.parametrize("trouble", ["no checkpoint verifies", "another number of processes"])
def test_a_resume_refused_for_its_checkpoints_writes_nothing_even_with_a_changed_config(
    trouble: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """What the trainer would refuse once the model is built is refused first: the changed config allowed by
    --allow-config-change is neither recorded nor written over the run's own."""
    settings = toys.settings(model_dir, tasks_dir, method="mola-grad", steps=4, checkpoint_every=2)
    run_training(RunConfig.from_dict(settings), tmp_path)
    for step in sorted((tmp_path / "checkpoints").glob("step-*")):
        if trouble == "no checkpoint verifies":
            (step / "weights.safetensors").write_bytes(b"damaged")
        else:
            state = json.loads((step / "state.json").read_text())
            (step / "state.json").write_text(json.dumps({**state, "processes": 2}))
            manifest = json.loads((step / "manifest.json").read_text())
            data = (step / "state.json").read_bytes()
            manifest["files"]["state.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            (step / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    changed = RunConfig.from_dict({**settings, "lr": 1e-2})
    says = {
        "no checkpoint verifies": "can be resumed from",
        "another number of processes": "a run of 2 process",
    }
    with pytest.raises(CheckpointError, match=says[trouble]):
        run_training(changed, tmp_path, resume=True, allow_config_change=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_resume_whose_task_specs_are_refused_records_no_change(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """Task specs written in the config are checked with the data, after torch loads: still before a changed config
    is recorded."""
    spec = {"name": "colors", "train": str(tasks_dir / "colors" / "train.jsonl")}
    spec["test"] = str(tasks_dir / "colors" / "test.jsonl")
    settings = {**toys.settings(model_dir, tasks_dir, steps=2), "tasks_dir": None, "tasks": [spec]}
    run_training(RunConfig.from_dict(settings), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    broken = {**settings, "lr": 1e-2, "tasks": [{**spec, "colour": "red"}]}
    with pytest.raises(ConfigError, match="colour"):
        run_training(RunConfig.from_dict(broken), tmp_path, resume=True, allow_config_change=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_changed_task_spec_is_named_by_its_field():
    """An edited task spec names the field that changed (`tasks[0].scorer`), not the whole list cut short."""
    from loramix.train.resume import config_changes

    spec = {
        "name": "a",
        "train": "/data/a.jsonl",
        "task_type": "generation",
        "scorer": "label",
        "labels": ["y", "n"],
    }
    saved = RunConfig.from_dict({"tasks": [spec], "lr": 1e-3}).to_dict()
    edited = {k: v for k, v in spec.items() if k != "labels"} | {"scorer": "exact"}
    now = RunConfig.from_dict({"tasks": [edited], "lr": 2e-3, "targets": ["query"]})
    assert config_changes(saved, now, Path("/")) == {
        "lr": (1e-3, 2e-3),
        "targets": ("all-linear", ["query"]),
        "tasks[0].labels": (["y", "n"], None),
        "tasks[0].scorer": ("label", "exact"),
    }


def test_the_evaluations_during_training_may_change_on_resume_unless_they_choose_the_weights():
    """`eval_every` and `eval_split` only watch a run, unless `keep_best` picks its weights among them or
    `eval_patience` its last step."""
    from loramix.train.resume import config_changes

    spec = {"name": "a", "train": "/data/a.jsonl"}
    saved = RunConfig.from_dict({"tasks": [spec], "eval_every": 10}).to_dict()
    assert config_changes(saved, RunConfig.from_dict({"tasks": [spec], "eval_every": 5}), Path("/")) == {}
    saved = RunConfig.from_dict({"tasks": [spec], "eval_every": 10, "keep_best": True}).to_dict()
    now = RunConfig.from_dict({"tasks": [spec], "eval_every": 5, "keep_best": True, "eval_split": "test"})
    assert config_changes(saved, now, Path("/")) == {
        "eval_every": (10, 5),
        "eval_split": ("validation", "test"),
    }
    saved = RunConfig.from_dict({"tasks": [spec], "eval_every": 10, "eval_patience": 3}).to_dict()
    now = RunConfig.from_dict({"tasks": [spec], "eval_every": 5, "eval_patience": 3})
    assert config_changes(saved, now, Path("/")) == {"eval_every": (10, 5)}


def test_a_relative_tasks_dir_is_the_same_config_on_resume(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The saved config.yaml may name the data relative to the run folder, the config file relative to itself:
    the same folder either way, so no change."""
    settings = toys.settings(model_dir, tasks_dir, method="lora", steps=2)
    settings["tasks_dir"] = os.path.relpath(tasks_dir, tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    out = tmp_path / "deeper" / "run"
    assert main(["train", str(config), "--output-dir", str(out)]) == 0
    monkeypatch.chdir(out)
    assert main(["train", str(config), "--output-dir", str(out), "--resume"]) == 0
    assert not (out / "config-changes.jsonl").exists()


def test_a_resume_on_edited_data_is_refused_naming_the_file(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    """A run records its data files' sizes and SHA-256; a resume whose files differ is refused as a changed setting
    is, naming the task and split, and goes on with --allow-config-change, which records the change."""
    data = tmp_path / "tasks"
    shutil.copytree(tasks_dir, data)
    settings = toys.settings(model_dir, data, method="lora", steps=2)
    run_training(RunConfig.from_dict(settings), tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "data-files.json").read_text())
    task = toys.TASK_NAMES[0]
    train = data / task / "train.jsonl"
    assert recorded[f"{task}.train"]["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()

    run_training(RunConfig.from_dict(settings), tmp_path / "run", resume=True)  # the same data: no change
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:-1]) + "\n")  # one example fewer
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    says = rf'data {task}\.train \(.*train\.jsonl\) \("\d+ bytes, sha256 \w+" -> "\d+ bytes'
    with pytest.raises(ConfigError, match=says):
        run_training(RunConfig.from_dict(settings), tmp_path / "run", resume=True)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before

    run_training(RunConfig.from_dict(settings), tmp_path / "run", resume=True, allow_config_change=True)
    records = [
        json.loads(line) for line in (tmp_path / "run" / "config-changes.jsonl").read_text().splitlines()
    ]
    assert list(records[0]["changed"]) == [f"data {task}.train ({train})"]


def test_a_run_without_a_list_of_data_files_resumes_without_comparing(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """Runs written before the data was recorded have no `data-files.json`: they resume as before. A damaged one is
    named, with what to do."""
    settings = toys.settings(model_dir, tasks_dir, method="lora", steps=2)
    run_training(RunConfig.from_dict(settings), tmp_path)
    (tmp_path / "data-files.json").write_text('{"sentiment.train": {"size": 3}}')
    with pytest.raises(CheckpointError, match=r"data-files\.json: not a readable list .* delete it"):
        run_training(RunConfig.from_dict(settings), tmp_path, resume=True)
    (tmp_path / "data-files.json").unlink()
    assert run_training(RunConfig.from_dict(settings), tmp_path, resume=True)["history"][-1]["step"] == 2


def test_each_process_gets_its_own_random_state_back(tmp_path: Path):
    model, optimizer = tiny_model_and_optimizer()
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(ckpt.rng_state())
    path = ckpt.save_training_checkpoint(tmp_path, 4, {"model": model}, optimizer, {}, rng_states=states)
    for rank in (0, 1):
        ckpt.load_training_checkpoint(path, {"model": model}, optimizer, process_index=rank, processes=2)
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"])
    with pytest.raises(CheckpointError, match=r"2 process\(es\), and this one has 1"):
        ckpt.load_training_checkpoint(path, {"model": model}, optimizer)
