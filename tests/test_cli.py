"""The `loramix` command end to end on a tiny offline model: train, eval, inspect, export (checked against PEFT),
and a table of bad configs and bad data files, each with its documented message and exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModel

import loramix
from loramix.cli import build_parser, main
from loramix.train.run import load_trained
from tests.train import toys


def write_config(path: Path, settings: dict[str, Any]) -> str:
    return str(toys.write_yaml(path, settings))


@pytest.fixture(scope="module")
def trained_run(model_dir: Path, tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step mola-grad run, to evaluate, inspect, export and break."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "run.yaml", toys.settings(model_dir, tasks_dir, method="mola-grad", steps=2))
    assert main(["train", config, "--output-dir", str(root / "run")]) == 0
    return root / "run"


def test_train_eval_inspect_export_end_to_end(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # tasks_dir relative to the config file, as a config kept beside its data would say it
    settings = toys.settings(model_dir, tasks_dir, method="mola-grad", steps=50, lr=2e-2)
    settings["tasks_dir"] = os.path.relpath(tasks_dir, tmp_path)
    config = write_config(tmp_path / "run.yaml", settings)
    run_dir, peft_dir = tmp_path / "run", tmp_path / "peft"

    from transformers.utils import logging as hub_logging

    hub_logging.enable_progress_bar()
    assert main(["train", config, "--output-dir", str(run_dir), "--set", "steps=4", "log_every=2"]) == 0
    assert not hub_logging.is_progress_bar_enabled()  # `progress: false` silences transformers' bars too
    out = capsys.readouterr().out
    assert "mola-grad" in out and "animals" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [2, 4]  # --set won over the file's 50, twice in one
    assert (run_dir / "report.md").is_file()
    assert (run_dir / "adapter" / "adapters.safetensors").is_file()

    assert main(["eval", str(run_dir)]) == 0
    evaluated = json.loads((run_dir / "eval-test.json").read_text())
    assert evaluated["split"] == "test"
    assert evaluated["tasks"] == metrics["tasks"]  # the saved model scores what the trained one scored
    assert list(evaluated["tasks"]) == ["sentiment", "animals", "colors"]  # in the config's order
    capsys.readouterr()

    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "method: mola-grad" in out
    assert "tasks: sentiment (2 labels), animals (2 labels), colors (3 labels)" in out

    assert main(["export", str(run_dir), "--task", "animals", "--out", str(peft_dir)]) == 0
    assert "'animals'" in capsys.readouterr().out
    _, model, tokenizer, _ = load_trained(run_dir)
    backbone = model.backbone.eval()
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), str(peft_dir)).eval()
    plain = AutoModel.from_pretrained(model_dir).eval()
    texts = ["the good film with music", "a cat near the river", "some blue car and a hat", "dog"]
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    animals = toys.TASK_NAMES.index("animals")
    with torch.no_grad():
        exported = peft_model(**inputs).last_hidden_state
        base = plain(**inputs).last_hidden_state
        routed = {}
        for task in range(len(toys.TASK_NAMES)):
            with loramix.routing(backbone, task_ids=torch.full((len(texts),), task)):
                routed[task] = backbone(**inputs).last_hidden_state
    torch.testing.assert_close(exported, routed[animals], atol=1e-5, rtol=0)
    assert (routed[animals] - base).abs().max() > 1e-3  # the adapter does something...
    assert (routed[animals] - routed[0]).abs().max() > 1e-4  # ...and it is the animals expert's


def test_set_with_an_unknown_key_exits_with_code_2(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = write_config(tmp_path / "run.yaml", toys.settings(model_dir, tasks_dir, steps=1))
    assert main(["train", config, "--output-dir", str(tmp_path / "run"), "--set", "stepz=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loramix: error:") and "stepz" in err
    assert not (tmp_path / "run").exists()


def test_the_module_runs_as_a_command():
    done = subprocess.run(
        [sys.executable, "-m", "loramix.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for command in ("train", "eval", "export", "inspect", "demo"):
        assert command in done.stdout


# ----------------------------------------------------------------------------------------- bad inputs


@dataclass
class Scene:
    """What a bad case builds on: the tiny model and tasks, a finished run and a fresh folder."""

    model_dir: Path
    tasks_dir: Path
    trained_run: Path
    root: Path

    def config(self, **overrides: Any) -> str:
        return write_config(
            self.root / "run.yaml", toys.settings(self.model_dir, self.tasks_dir, **overrides)
        )

    def train(self, config: str, *extra: str) -> list[str]:
        return ["train", config, "--output-dir", str(self.root / "out"), *extra]

    def broken_task(
        self, train: bytes | str, *, test: bytes | str | None = None, meta: dict | None = None
    ) -> list[str]:
        """A task folder `data/broken` with these files, and the argv that trains on it."""
        folder = self.root / "data" / "broken"
        folder.mkdir(parents=True)
        good = '{"text": "a good film", "label": 1}\n{"text": "a bad film", "label": 0}\n'
        for name, content in (("train.jsonl", train), ("test.jsonl", good if test is None else test)):
            data = content.encode() if isinstance(content, str) else content
            (folder / name).write_bytes(data)
        (folder / "meta.json").write_text(json.dumps(meta or {"labels": ["no", "yes"]}))
        return self.train(self.config(tasks_dir=str(self.root / "data"), tasks=["broken"]))

    def copy_of_run(self) -> Path:
        return Path(shutil.copytree(self.trained_run, self.root / "copy"))


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    path.write_bytes(bytes(data))


def corrupted_adapter(scene: Scene) -> list[str]:
    run = scene.copy_of_run()
    _flip_bytes(run / "adapter" / "adapters.safetensors")
    return ["eval", str(run)]


def adapter_without_its_config(scene: Scene) -> list[str]:
    run = scene.copy_of_run()
    (run / "adapter" / "loramix_config.json").unlink()
    return ["inspect", str(run)]


def run_without_adapter(command: str) -> Callable[[Scene], list[str]]:
    def build(scene: Scene) -> list[str]:
        run = scene.copy_of_run()
        shutil.rmtree(run / "adapter")
        return [command, str(run)]

    return build


def resume_from_a_missing_checkpoint(scene: Scene) -> list[str]:
    checkpoints = scene.root / "out" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest").write_text("step-000099")
    return scene.train(scene.config(steps=1), "--resume")


def file_config(content: bytes) -> Callable[[Scene], list[str]]:
    def build(scene: Scene) -> list[str]:
        path = scene.root / "run.yaml"
        path.write_bytes(content)
        return scene.train(str(path))

    return build


def spec(name: str, scene: Scene) -> dict[str, str]:
    folder = scene.tasks_dir / "sentiment"
    return {"name": name, "train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}


def output_dir_is_a_file(scene: Scene) -> list[str]:
    (scene.root / "out").write_text("not a folder")
    return scene.train(scene.config(steps=1))


def output_dir_under_a_file(scene: Scene) -> list[str]:
    (scene.root / "blocker").write_text("not a folder")
    return ["train", scene.config(steps=1), "--output-dir", str(scene.root / "blocker" / "run")]


def model_dir_with(*names: str) -> Callable[[Scene], list[str]]:
    """A model folder holding only these files of the tiny model (none: an empty folder)."""

    def build(scene: Scene) -> list[str]:
        folder = scene.root / "half-model"
        folder.mkdir()
        for name in names:
            shutil.copy(scene.model_dir / name, folder / name)
        return scene.train(scene.config(model=str(folder), steps=1))

    return build


def model_of_unknown_type(scene: Scene) -> list[str]:
    folder = Path(shutil.copytree(scene.model_dir, scene.root / "half-model"))
    (folder / "config.json").write_text(json.dumps({"model_type": "nonsense"}))
    return scene.train(scene.config(model=str(folder), steps=1))


def model_without_tokenizer(scene: Scene) -> list[str]:
    """A causal LM saved without its tokenizer's files: transformers then gives GPT-2 an empty tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = scene.root / "half-model"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(folder)
    return scene.train(scene.config(model=str(folder), steps=1))


@dataclass
class Bad:
    id: str
    build: Callable[[Scene], list[str]]
    code: int
    says: list[str]  # each must appear in the message


ROW = '{"text": "a good film", "label": 1}\n'
ROW_NO = '{"text": "a bad film", "label": 0}\n'
BAD = [
    # 2: config and usage
    Bad(
        "unknown-key",
        lambda s: s.train(s.config(stepz=3)),
        2,
        ["run.yaml", "stepz: not a key of this config (got 3). Did you mean 'steps'?"],
    ),
    Bad("wrong-type", lambda s: s.train(s.config(steps="many")), 2, ["steps", "valid integer", "'many'"]),
    Bad("negative-steps", lambda s: s.train(s.config(steps=-1)), 2, ["steps", "greater than or equal to 1"]),
    Bad("unknown-method", lambda s: s.train(s.config(method="magic")), 2, ["method", "'mola-grad'", "magic"]),
    Bad("bad-dropout", lambda s: s.train(s.config(dropout=1.0)), 2, ["dropout", "less than 1"]),
    Bad("one-elrea-cluster", lambda s: s.train(s.config(elrea_clusters=1)), 2, ["elrea_clusters"]),
    Bad("empty-tasks", lambda s: s.train(s.config(tasks=[])), 2, ["tasks is empty"]),
    Bad("names-without-dir", lambda s: s.train(s.config(tasks_dir=None)), 2, ["tasks_dir is not set"]),
    Bad(
        "per-task-lora-trains-backbone",
        lambda s: s.train(s.config(method="per-task-lora", train_backbone=True)),
        2,
        ["per-task-lora", "train_backbone must be false"],
    ),
    Bad(
        "task-to-expert-without-mola-grad",
        lambda s: s.train(s.config(method="mola-router", task_to_expert=[0, 0, 1])),
        2,
        ["task_to_expert is only used by method mola-grad"],
    ),
    Bad(
        "elrea-top-labels-signed",
        lambda s: s.train(s.config(method="elrea", elrea_top_labels=3, elrea_sign_invariant=False)),
        2,
        ["elrea_top_labels > 1 needs elrea_sign_invariant"],
    ),
    Bad(
        "mola-grad-ignored-num-experts",
        lambda s: s.train(s.config(method="mola-grad", num_experts=5)),
        2,
        ["num_experts", "task_to_expert"],
    ),
    Bad(
        "top-k-above-experts",
        lambda s: s.train(s.config(method="mola-router", num_experts=2, top_k=3)),
        2,
        ["adapter settings of method mola-router", "top_k: top_k=3 exceeds num_experts=2"],
    ),
    Bad(
        "task-to-expert-out-of-range",
        lambda s: s.train(s.config(method="mola-grad", num_experts=2, task_to_expert=[0, 1, 5])),
        2,
        ["task_to_expert", "[5]"],
    ),
    Bad("missing-config", lambda s: s.train(str(s.root / "nowhere.yaml")), 2, ["nowhere.yaml", "not found"]),
    Bad("not-yaml", file_config(b"steps: [1, 2\n"), 2, ["run.yaml", "not valid YAML"]),
    Bad(
        "key-twice",
        file_config(b"steps: 3\nlr: 0.1\nsteps: 1\n"),
        2,
        ["run.yaml", "key 'steps' is given twice (first on line 1)", "line 3"],
    ),
    Bad("yaml-list", file_config(b"- steps\n- 3\n"), 2, ["run.yaml", "top level must be a mapping"]),
    Bad("config-not-utf8", file_config(b"steps: 3 # caf\xe9\n"), 2, ["run.yaml", "not UTF-8"]),
    Bad(
        "set-without-equals", lambda s: s.train(s.config(), "--set", "steps"), 2, ["--set expects key=value"]
    ),
    Bad(
        "set-bad-yaml",
        lambda s: s.train(s.config(), "--set", "steps=[1"),
        2,
        ["--set steps", "not valid YAML"],
    ),
    Bad(
        "duplicate-task-specs",
        lambda s: s.train(s.config(tasks_dir=None, tasks=[spec("twice", s), spec("twice", s)])),
        2,
        ["both named 'twice'", "unique"],
    ),
    Bad(
        "spec-with-unknown-suffix",
        lambda s: s.train(s.config(tasks_dir=None, tasks=[{"name": "x", "train": "x.txt"}])),
        2,
        ["train", ".jsonl"],
    ),
    Bad(
        "export-unknown-task",
        lambda s: ["export", str(s.trained_run), "--task", "nope", "--out", str(s.root / "peft")],
        2,
        ["--task 'nope'", "sentiment, animals, colors"],
    ),
    Bad("eval-without-config", lambda s: ["eval", str(s.root)], 2, ["config.yaml", "not found"]),
    Bad("output-dir-is-a-file", output_dir_is_a_file, 2, ["--output-dir", "out", "is a file"]),
    Bad("output-dir-under-a-file", output_dir_under_a_file, 2, ["--output-dir", "blocker", "is a file"]),
    Bad("model-dir-empty", model_dir_with(), 2, ["model", "half-model", "config.json"]),
    Bad(
        "model-dir-without-tokenizer-or-weights",
        model_dir_with("config.json"),
        2,
        ["model", "half-model", "could not be loaded"],
    ),
    Bad("model-dir-unknown-architecture", model_of_unknown_type, 2, ["model", "half-model", "nonsense"]),
    Bad("model-dir-without-tokenizer-files", model_without_tokenizer, 2, ["half-model", "no tokens"]),
    Bad(
        "model-path-missing", lambda s: s.train(s.config(model=str(s.root / "gone"))), 2, ["gone", "no such"]
    ),
    Bad("unknown-target", lambda s: s.train(s.config(targets=["no_such_module"])), 2, ["no_such_module"]),
    Bad("infinite-lr", lambda s: s.train(s.config(lr=float("inf"))), 2, ["lr", "finite number"]),
    Bad("nan-alpha", lambda s: s.train(s.config(alpha=float("nan"))), 2, ["alpha", "finite number"]),
    Bad("infinite-lr-set", lambda s: s.train(s.config(), "--set", "lr=.inf"), 2, ["lr", "finite number"]),
    Bad(
        "export-expert-of-a-task-run",
        lambda s: ["export", str(s.trained_run), "--expert", "1", "--out", str(s.root / "peft")],
        2,
        ["--expert", "experts are its tasks", "--task", "sentiment, animals, colors"],
    ),
    Bad(
        "export-without-task",
        lambda s: ["export", str(s.trained_run), "--out", str(s.root / "peft")],
        2,
        ["pass --task", "sentiment, animals, colors"],
    ),
    # 3: data
    Bad(
        "unknown-task-name",
        lambda s: s.train(s.config(tasks=["sentiment", "nope"])),
        3,
        ["unknown tasks ['nope']", "animals"],
    ),
    Bad("missing-tasks-dir", lambda s: s.train(s.config(tasks_dir="/no/such/dir")), 3, ["/no/such/dir"]),
    Bad(
        "meta-without-labels",
        lambda s: s.broken_task(ROW, meta={"name": "broken"}),
        3,
        ["broken/meta.json", "'labels' list"],
    ),
    Bad(
        "line-not-json",
        lambda s: s.broken_task(ROW + '{"text": "x", "label": 0\n'),
        3,
        ["train.jsonl, line 2", "not valid JSON"],
    ),
    Bad(
        "line-not-an-object",
        lambda s: s.broken_task(ROW + "[1, 2]\n"),
        3,
        ["train.jsonl, line 2", "one JSON object per line"],
    ),
    Bad(
        "not-utf8",
        lambda s: s.broken_task(ROW.encode() * 2 + b'{"text": "caf\xe9", "label": 0}\n'),
        3,
        ["train.jsonl, line 3", "not valid UTF-8"],
    ),
    Bad(
        "missing-text-field",
        lambda s: s.broken_task('{"sentence": "a good film", "label": 1}\n'),
        3,
        ["train.jsonl, line 1", "missing field 'text'"],
    ),
    Bad(
        "text-not-a-string",
        lambda s: s.broken_task(ROW + '{"text": 42, "label": 0}\n'),
        3,
        ["train.jsonl, line 2", "must be a string"],
    ),
    Bad(
        "label-out-of-range",
        lambda s: s.broken_task(ROW + '{"text": "x", "label": 5}\n'),
        3,
        ["train.jsonl, line 2", "label 5 is outside 0..1"],
    ),
    Bad(
        "unknown-string-label",
        lambda s: s.broken_task(ROW + '{"text": "x", "label": "maybe"}\n'),
        3,
        ["train.jsonl, line 2", "unknown label 'maybe'", "no, yes"],
    ),
    Bad("empty-train-file", lambda s: s.broken_task(""), 3, ["train.jsonl", "no examples"]),
    Bad(
        "bad-test-file",
        lambda s: s.broken_task(ROW + ROW_NO, test=ROW + ROW + "oops\n"),  # a train file with both labels
        3,
        ["test.jsonl, line 3", "not valid JSON"],
    ),
    Bad("eval-of-no-run", lambda s: ["eval", str(s.root / "nope")], 2, ["nope: no such run folder"]),
    Bad("inspect-of-no-run", lambda s: ["inspect", str(s.root / "nope")], 2, ["nope: no such run folder"]),
    # 4: adapters and checkpoints
    Bad(
        "eval-without-adapter",
        run_without_adapter("eval"),
        4,
        ["has not finished (no adapter/ yet)", "--resume"],
    ),
    Bad("inspect-without-adapter", run_without_adapter("inspect"), 4, ["has not finished (no adapter/ yet)"]),
    Bad("corrupted-adapter", corrupted_adapter, 4, ["adapters.safetensors"]),
    Bad("adapter-without-config", adapter_without_its_config, 4, ["loramix_config.json"]),
    Bad("resume-missing-checkpoint", resume_from_a_missing_checkpoint, 4, ["step-000099", "does not exist"]),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_input_gives_one_message_and_its_exit_code(
    bad: Bad,
    model_dir: Path,
    tasks_dir: Path,
    trained_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    argv = bad.build(Scene(model_dir, tasks_dir, trained_run, tmp_path))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == bad.code, err
    assert err.startswith("loramix: error:"), err
    assert "Traceback" not in err
    for needle in bad.says:
        assert needle in err, f"{needle!r} not in {err!r}"


# ------------------------------------------------------------------------ unreadable and unwritable paths
# Tests run as root, where file permissions do not block reads or writes, so these make the file system refuse
# by patching the one call that touches the path.


def refuse(monkeypatch: pytest.MonkeyPatch, method: str, path: Path) -> None:
    """Make `Path.<method>` raise PermissionError for `path` (as a chmod 000 file would for a normal user)."""
    real = getattr(Path, method)

    def patched(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.resolve() == path.resolve():
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, patched)


def test_an_unreadable_config_exits_2_naming_it(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    config = write_config(tmp_path / "run.yaml", toys.settings(model_dir, tasks_dir, steps=1))
    refuse(monkeypatch, "read_text", Path(config))
    assert main(["train", config, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loramix: error:") and "run.yaml" in err and "ermission denied" in err
    assert not (tmp_path / "out").exists()


def test_an_unreadable_data_file_exits_3_naming_it(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    data = Path(shutil.copytree(tasks_dir, tmp_path / "data"))
    config = write_config(tmp_path / "run.yaml", toys.settings(model_dir, data, steps=1))
    refuse(monkeypatch, "read_bytes", data / "animals" / "train.jsonl")
    assert main(["train", config, "--output-dir", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("loramix: error:") and "animals/train.jsonl" in err and "ermission denied" in err


def test_an_unwritable_output_dir_exits_2_before_any_work(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw)
    )
    config = write_config(tmp_path / "run.yaml", toys.settings(model_dir, tasks_dir, steps=1))
    assert main(["train", config, "--output-dir", str(locked / "run")]) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "locked" in err and "not writable" in err
    assert not (locked / "run").exists()


# ----------------------------------------------------------------------------------- fast answers, display


CHECK = """
import sys
from loramix.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
print("torch loaded" if "torch" in sys.modules else "torch not loaded", file=sys.stderr)
sys.exit(code)
"""


def run_light(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHECK, *argv], capture_output=True, text=True, timeout=120)


def test_help_and_config_errors_answer_without_loading_torch(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    done = run_light("--help")
    assert done.returncode == 0 and "torch not loaded" in done.stderr, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "loramix.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "train" in done.stdout
    bad = {
        "unknown-key": toys.settings(model_dir, tasks_dir, stepz=3),
        "infinite-lr": toys.settings(model_dir, tasks_dir, lr=float("inf")),
        "missing-model": toys.settings(model_dir, tasks_dir, model=str(tmp_path / "gone")),
        "unknown-method": toys.settings(model_dir, tasks_dir, method="magic"),
    }
    for name, settings in bad.items():
        config = write_config(tmp_path / f"{name}.yaml", settings)
        done = run_light("train", config, "--output-dir", str(tmp_path / name))
        assert done.returncode == 2, (name, done.stderr)
        assert "loramix: error:" in done.stderr and "torch not loaded" in done.stderr, (name, done.stderr)
    file_in_the_way = tmp_path / "file"
    file_in_the_way.write_text("")
    config = write_config(tmp_path / "good.yaml", toys.settings(model_dir, tasks_dir))
    done = run_light("train", config, "--output-dir", str(file_in_the_way))
    assert done.returncode == 2 and "torch not loaded" in done.stderr, done.stderr


def test_export_without_task_answers_before_loading_the_model(trained_run: Path, tmp_path: Path):
    done = run_light("export", str(trained_run), "--out", str(tmp_path / "peft"))
    assert done.returncode == 2, done.stderr
    assert "pass --task" in done.stderr and "sentiment, animals, colors" in done.stderr
    assert "torch not loaded" in done.stderr
    done = run_light("export", str(trained_run), "--task", "nope", "--out", str(tmp_path / "peft"))
    assert done.returncode == 2 and "torch not loaded" in done.stderr, done.stderr
    done = run_light("export", str(trained_run), "--expert", "7", "--out", str(tmp_path / "peft"))
    assert done.returncode == 2 and "torch not loaded" in done.stderr, done.stderr
    assert "--expert 7 is not an expert of this run: 0..2" in done.stderr
    assert not (tmp_path / "peft").exists()


def test_eval_with_a_config_of_other_tasks_or_another_order_is_refused_by_name(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """The experts and heads are the learned tasks' by position: a config for `loramix eval` must list the same
    tasks in the same order (scored by position they would get another task's expert, silently)."""
    settings = yaml.safe_load((trained_run / "config.yaml").read_text())
    settings["tasks_dir"] = str((trained_run / settings["tasks_dir"]).resolve())
    for tasks, says in (
        (["animals", "sentiment", "colors"], "in another order"),
        (["sentiment", "animals"], "colors missing"),
    ):
        config = write_config(tmp_path / "eval.yaml", {**settings, "tasks": tasks})
        capsys.readouterr()
        assert main(["eval", str(trained_run), "--config", config]) == 2
        err = capsys.readouterr().err
        assert "learned sentiment, animals, colors in this order" in err and says in err, err
    config = write_config(tmp_path / "eval.yaml", {**settings, "tasks": ["sentiment", "animals", "colors"]})
    assert main(["eval", str(trained_run), "--config", config]) == 0
    # another method than the run's: its table would carry the other method's name, or it would fail half-way
    config = write_config(tmp_path / "eval.yaml", {**settings, "method": "lora"})
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--config", config]) == 2
    assert "was trained with method mola-grad" in capsys.readouterr().err
    # the same tasks, with one task's labels swapped: scored by position, every answer would flip
    swapped = Path(shutil.copytree(settings["tasks_dir"], tmp_path / "swapped"))
    meta = json.loads((swapped / "sentiment" / "meta.json").read_text())
    learned = list(meta["labels"])
    meta["labels"] = learned[::-1]
    (swapped / "sentiment" / "meta.json").write_text(json.dumps(meta))
    config = write_config(tmp_path / "eval.yaml", {**settings, "tasks_dir": str(swapped)})
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--config", config]) == 2
    err = capsys.readouterr().err
    assert f"learned task 'sentiment' with the labels [{', '.join(learned)}]" in err, err


def test_eval_refuses_a_task_of_another_kind_than_the_run_learned(tasks_dir: Path, tmp_path: Path):
    """A generation task's name given to a classification task: said as such, not as missing labels."""
    from loramix.data import MultiTaskData, TaskSpec
    from loramix.errors import ConfigError
    from loramix.methods.base import check_eval_tasks

    (tmp_path / "adapter").mkdir()
    record = {"metadata": {"tasks": [{"name": "up", "task_type": "generation", "labels": []}]}}
    (tmp_path / "adapter" / "loramix_config.json").write_text(json.dumps(record))
    files = {split: str(tasks_dir / "colors" / f"{split}.jsonl") for split in ("train", "test")}
    data = MultiTaskData([TaskSpec(name="up", **files)])
    with pytest.raises(
        ConfigError, match="learned task 'up' as a generation task; .* as a classification task"
    ):
        check_eval_tasks(tmp_path, data)


def test_a_run_stopped_before_it_finished_says_how_to_finish_it(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    shutil.rmtree(run / "adapter")
    for command in (["eval", str(run)], ["inspect", str(run)], ["export", str(run), "--task", "animals"]):
        capsys.readouterr()
        assert main([*command, *(["--out", str(tmp_path / "x")] if command[0] == "export" else [])]) == 4
        assert f"{run}: the run has not finished (no adapter/ yet)" in capsys.readouterr().err


def test_an_interrupted_train_says_how_to_continue(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    import loramix.methods

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loramix.methods, "run_training", interrupted)
    config = write_config(tmp_path / "run.yaml", toys.settings(model_dir, tasks_dir, steps=2))
    assert main(["train", config, "--output-dir", str(tmp_path / "run")]) == 130
    assert (
        f"interrupted; add --resume to the same command to continue {tmp_path / 'run'}"
        in capsys.readouterr().err
    )


def test_inspect_rounds_numbers_for_display(trained_run: Path, tmp_path: Path, capsys):
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["mean_accuracy"] = 0.5700000000000001
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "mean accuracy: 0.57\n" in out
    assert "0000000" not in out


def test_every_option_of_every_command_has_help_and_demo_says_where_it_writes():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"loramix {name}: {action.dest} has no help text"
    demo_help = commands.choices["demo"].format_help()
    for fragment in ("report.md", "summary.json", "data"):
        assert fragment in demo_help, demo_help


def test_config_yaml_keeps_a_relative_tasks_dir_relative(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys
):
    project = tmp_path / "project"
    data = Path(shutil.copytree(tasks_dir, project / "data"))
    (project / "configs").mkdir()
    shutil.copytree(model_dir, project / "models" / "tiny")
    settings = toys.settings(model_dir, data, steps=1, tasks=["animals"])
    settings["tasks_dir"], settings["model"] = "../data", "../models/tiny"  # a model written as a path is one
    config = write_config(project / "configs" / "run.yaml", settings)
    assert main(["train", config, "--output-dir", str(project / "runs" / "x")]) == 0
    saved = yaml.safe_load((project / "runs" / "x" / "config.yaml").read_text())
    assert saved["tasks_dir"] == "../../data"  # the same folder, seen from the run directory
    assert saved["model"] == "../../models/tiny"
    moved = Path(shutil.move(project, tmp_path / "moved"))  # the project moves as a whole
    capsys.readouterr()
    assert main(["eval", str(moved / "runs" / "x")]) == 0
    assert "animals" in capsys.readouterr().out


def test_task_spec_files_are_read_against_the_config_and_set_paths_against_the_working_folder(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    project = tmp_path / "project"
    shutil.copytree(tasks_dir / "animals", project / "data" / "animals")
    spec = {"name": "animals", "train": "data/animals/train.jsonl", "test": "data/animals/test.jsonl"}
    settings = {**toys.settings(model_dir, tasks_dir, steps=1), "tasks_dir": None, "tasks": [spec]}
    config = write_config(project / "run.yaml", settings)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the config's paths are relative to its own folder, not to this one
    assert main(["train", config, "--output-dir", "runs/x"]) == 0
    saved = yaml.safe_load((elsewhere / "runs" / "x" / "config.yaml").read_text())
    assert saved["tasks"][0]["train"] == "../../../project/data/animals/train.jsonl"  # seen from the run
    assert main(["train", config, "--output-dir", "runs/x", "--resume"]) == 0  # the same files: no change
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "elsewhere/runs/x"]) == 0 and "animals" in capsys.readouterr().out
    # a path given with --set is relative to the folder the command runs in
    runs_from_project = ["train", config, "--output-dir", "runs/y", "--set", "tasks_dir=project/data"]
    assert main([*runs_from_project, "--set", "tasks=[animals]"]) == 0
    saved = yaml.safe_load((tmp_path / "runs" / "y" / "config.yaml").read_text())
    assert saved["tasks_dir"] == "../../project/data" and saved["tasks"] == ["animals"]
    capsys.readouterr()
    # a run there already: said, then replaced, its outputs first (none passes for the new run's)
    assert main(["eval", "runs/y"]) == 0 and (tmp_path / "runs" / "y" / "eval-test.json").is_file()
    (tmp_path / "runs" / "y" / "config-changes.jsonl").write_text("{}\n")
    assert main([*runs_from_project, "--set", "tasks=[animals]"]) == 0
    assert "runs/y holds a run already; this one replaces it" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "y" / "eval-test.json").exists()
    assert not (tmp_path / "runs" / "y" / "config-changes.jsonl").exists()
    # a replacing run whose data fails (a task name mistyped) leaves the earlier run whole
    before = {p: p.read_bytes() for p in (tmp_path / "runs" / "y").rglob("*") if p.is_file()}
    assert main([*runs_from_project, "--set", "tasks=[aminals]"]) == 3
    assert {p: p.read_bytes() for p in (tmp_path / "runs" / "y").rglob("*") if p.is_file()} == before
    # a replacing run that stops after its config is written leaves no earlier adapter to evaluate as its own
    assert main([*runs_from_project, "--set", "tasks=[animals]", "--set", "targets=[nothing]"]) == 2
    assert not (tmp_path / "runs" / "y" / "adapter").exists() and main(["eval", "runs/y"]) == 4
    # a run refused once its config was written (targets matching nothing) leaves nothing that a resume compares
    broken = [
        "train",
        config,
        "--output-dir",
        "runs/z",
        "--set",
        "tasks_dir=project/data",
        "--set",
        "tasks=[animals]",
    ]
    assert main([*broken, "--set", "targets=[nothing]"]) == 2
    assert main([*broken, "--resume"]) == 0


def test_data_warnings_print_as_one_line_and_the_run_goes_on(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    argv = Scene(model_dir, tasks_dir, tmp_path, tmp_path).broken_task(ROW * 3)  # labels no, yes; only yes
    argv[1] = write_config(tmp_path / "run.yaml", {**yaml.safe_load(Path(argv[1]).read_text()), "steps": 1})
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "loramix: warning: " in err and "broken/train.jsonl" in err and "no example of 'no'" in err
    assert "warnings.warn" not in err  # not Python's two-line form with the source line


def test_the_light_list_of_method_names_is_the_registry():
    """The CLI checks a method's name before torch loads, against a list that must name every registered method."""
    from loramix.methods import METHODS
    from loramix.preflight import METHOD_NAMES

    assert sorted(METHOD_NAMES) == sorted(METHODS)


def test_bitsandbytes_note_about_an_optional_kernel_is_dropped_and_its_other_messages_kept(caplog):
    assert main(["settings", "steps"]) == 0
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline"
        )
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
    assert main(["settings", "steps"]) == 0
    assert len(logger.filters) == 1  # added once, however many commands run
