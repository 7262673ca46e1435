"""A finished run in Python (`loramix.open_run`): rows answered as `loramix predict` answers a file's, from a
folder or a Hub repository, a task given for every row, rows without a task where an auto-selector chooses it, and
bad rows and options refused naming the row or the option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import loramix
from loramix.errors import ConfigError, DataError
from tests.hub import FakeHub
from tests.methods.test_continual import specs
from tests.train import toys
from tests.train.test_predict import TASKS, predicted, rows_of, trained, write_rows


def without_lines(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in answer.items() if k != "line"} for answer in answers]


@pytest.fixture(scope="module")
def mola_run(model_dir: Path, tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = {**toys.settings(model_dir, tasks_dir, method="mola-grad", steps=20, lr=2e-2), "tasks": TASKS}
    return trained(tmp_path_factory.mktemp("mola"), settings)


def test_rows_are_answered_as_loramix_predict_answers_a_file(
    mola_run: Path, tasks_dir: Path, tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
):
    rows = rows_of(tasks_dir, TASKS)
    from_file = predicted(
        mola_run, write_rows(tmp_path / "rows.jsonl", rows), tmp_path / "out.jsonl", "--scores"
    )
    run = loramix.open_run(mola_run)
    assert run.task_names == TASKS
    answers = run.predict(rows, scores=True)
    assert [a["line"] for a in answers] == [f"row {i}" for i in range(1, len(rows) + 1)]
    assert without_lines(answers) == without_lines(from_file)
    small = run.predict(
        rows, scores=True, batch_size=3
    )  # other batches: the same answers, scores to rounding
    assert [a["prediction"] for a in small] == [a["prediction"] for a in answers]
    assert [a["score"] for a in small] == pytest.approx([a["score"] for a in answers], abs=1e-5)

    one = [{"text": row["text"]} for row in rows if row["task"] == TASKS[1]]
    given = run.predict(one, task=TASKS[1], scores=True)  # one task's batches: that expert alone, as one LoRA
    theirs = [a for a in from_file if a["task"] == TASKS[1]]
    assert [(a["task"], a["prediction"]) for a in given] == [(a["task"], a["prediction"]) for a in theirs]
    assert [a["score"] for a in given] == pytest.approx([a["score"] for a in theirs], abs=1e-5)
    assert "score" not in run.predict(one, task=TASKS[1])[0]

    monkeypatch.chdir(tmp_path)
    assert main_push(mola_run) == 0
    assert without_lines(loramix.open_run("me/run").predict(rows, scores=True)) == without_lines(from_file)


def main_push(run_dir: Path) -> int:
    from loramix.cli import main

    return main(["push", str(run_dir), "me/run"])


def test_bad_rows_and_options_are_named(mola_run: Path):
    run = loramix.open_run(mola_run)
    text = {"text": "a"}
    with pytest.raises(DataError, match="row 2: no 'task' field"):
        run.predict([{"task": TASKS[0], **text}, text])
    with pytest.raises(DataError, match=rf"row 1: task 'sentimant' is not a task.*Did you mean '{TASKS[0]}'"):
        run.predict([{"task": "sentimant", **text}])
    with pytest.raises(DataError, match="row 1: .*missing field 'text'"):
        run.predict([{"task": TASKS[0], "sentence": "a"}])
    with pytest.raises(ConfigError, match="task 'weather' is not a task of this run"):
        run.predict([text], task="weather")
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        run.predict([text], task=TASKS[0], batch_size=0)
    with pytest.raises(ConfigError, match="max_new_tokens and sampling apply to generation tasks"):
        run.predict([text], task=TASKS[0], max_new_tokens=4)
    with pytest.raises(ConfigError, match="nowhere: no such run folder"):
        loramix.open_run(mola_run.parent / "nowhere")


def test_an_auto_selector_chooses_the_task_of_a_row_that_names_none(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    settings = toys.settings(model_dir, tasks_dir, method="continual-mola-grad", head="label-prompt")
    settings.update(tasks=specs(tasks_dir)[:2], tasks_dir=None, steps_per_task=10, ddas_examples=16)
    settings.pop("steps", None)
    run_dir = trained(tmp_path, settings)
    rows = [{"text": row["text"]} for row in rows_of(tasks_dir, TASKS)]
    from_file = predicted(run_dir, write_rows(tmp_path / "rows.jsonl", rows), tmp_path / "out.jsonl")
    answers = loramix.open_run(run_dir).predict(rows)
    assert without_lines(answers) == without_lines(from_file)
    assert all(a["task_given"] is False and a["task"] in TASKS and "route" in a for a in answers)


def test_a_generation_run_answers_greedily_as_the_command_and_samples_by_its_seed(
    gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    settings = toys.gen_settings(gpt2_dir, gen_tasks_dir, method="mola-grad", steps=10, max_new_tokens=6)
    run_dir = trained(tmp_path, settings)
    prompts = [
        {"prompt": json.loads(line)["prompt"]}
        for line in (gen_tasks_dir / "sort" / "test.jsonl").read_text().splitlines()
    ]
    inputs = write_rows(tmp_path / "prompts.jsonl", prompts)
    from_file = predicted(run_dir, inputs, tmp_path / "out.jsonl", "--task", "sort")
    run = loramix.open_run(run_dir)
    greedy = run.predict(prompts, task="sort")
    assert without_lines(greedy) == without_lines(from_file)
    assert all(len(a["prediction"]) <= 2 for a in run.predict(prompts, task="sort", max_new_tokens=2))
    sampling = {"do_sample": True, "temperature": 5.0}
    first, again = (run.predict(prompts, task="sort", sampling=sampling, seed=3) for _ in range(2))
    assert first == again and [a["prediction"] for a in first] != [a["prediction"] for a in greedy]
    assert run.predict(prompts, task="sort") == greedy  # a sampled call leaves the next one greedy
    with pytest.raises(ConfigError, match="scores: a score is a class's probability"):
        run.predict(prompts, task="sort", scores=True)
