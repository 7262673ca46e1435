"""`loramix predict` on tiny runs of each kind of method: rows of several tasks answered in shared batches give
the answers `loramix eval` scores (its accuracy, the auto-selector's confusion matrix, the generated samples), and
the same answers one row at a time; bad rows are named by file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from loramix.cli import main
from loramix.methods import get_method, run_training
from loramix.train.config import RunConfig
from loramix.train.predict import predict, read_requests, with_input_fields
from loramix.train.run import collator_of, load_trained, on_inference_device
from loramix.train.step import routed
from tests.methods.test_continual import continued_after_two, specs
from tests.test_cli import write_config
from tests.train import toys

TASKS = toys.TASK_NAMES[:2]


def rows_of(tasks_dir: Path, names: list[str]) -> list[dict[str, Any]]:
    """The test rows of `names`, alternating between the tasks, each with its task's name."""
    per_task = [
        [
            {"task": name, **json.loads(line)}
            for line in (tasks_dir / name / "test.jsonl").read_text().splitlines()
        ]
        for name in names
    ]
    return [row for group in zip(*per_task) for row in group]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def predicted(run_dir: Path, inputs: Path, out: Path, *extra: str) -> list[dict[str, Any]]:
    assert main(["predict", str(run_dir), str(inputs), "--out", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def one_at_a_time(run_dir: Path, inputs: Path, scores: bool = False) -> list[dict[str, Any]]:
    """The reference: every row alone in its batch, through the method's own predictor (with each class's score,
    `scores`)."""
    run, model, tokenizer, tasks = load_trained(run_dir)
    on_inference_device(run, model)  # where `loramix predict` answers
    tasks = with_input_fields(run, tasks)
    predictor = get_method(run.method).predictor(
        run_dir, run, model, collator_of(run, [meta["task_type"] for meta in tasks], tokenizer), tasks
    )
    predictor.scores = scores  # type: ignore[attr-defined]
    return predict(read_requests(inputs, tasks), predictor, batch_size=1, progress=False)


def accuracy(results: list[dict[str, Any]], rows: list[dict[str, Any]], labels: dict[str, list[str]]) -> dict:
    right: dict[str, list[bool]] = {}
    for result, row in zip(results, rows):
        right.setdefault(row["task"], []).append(result["prediction"] == labels[row["task"]][row["label"]])
    return {task: sum(hits) / len(hits) for task, hits in right.items()}


def trained(root: Path, settings: dict[str, Any]) -> Path:
    config = write_config(root / "run.yaml", settings)
    assert main(["train", config, "--output-dir", str(root / "run")]) == 0
    return root / "run"


def label_names() -> dict[str, list[str]]:
    return {name: toys.TASKS[name][2] for name in TASKS}


@pytest.mark.parametrize(
    "method, extra",
    [
        ("mola-grad", {}),
        ("mola-router", {}),
        (
            "continual-mola-grad",
            {"head": "label-prompt", "steps_per_task": 50, "lr": 1e-2, "ddas_examples": 40},
        ),
        ("elrea", {"elrea_clusters": 2, "elrea_feature_examples": 32, "elrea_feature_dim": 16}),
    ],
)
def test_mixed_batches_answer_as_eval_scores_and_as_one_row_at_a_time(
    method: str, extra: dict[str, Any], model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    settings = {
        **toys.settings(model_dir, tasks_dir, method=method, steps=40, lr=2e-2),
        "tasks": TASKS,
        **extra,
    }
    if "steps_per_task" in extra:  # class texts the tiny vocabulary can tell apart ("negative" is not in it)
        del settings["steps"]
        settings.update(tasks=specs(tasks_dir)[:2], tasks_dir=None)
    run_dir = trained(tmp_path, settings)
    rows = rows_of(tasks_dir, TASKS)
    inputs = write_rows(tmp_path / "inputs.jsonl", rows)
    results = predicted(run_dir, inputs, tmp_path / "out.jsonl", "--batch-size", "7")

    assert [r["line"] for r in results] == [f"{inputs}, line {i + 1}" for i in range(len(rows))]
    assert [r["task"] for r in results] == [row["task"] for row in rows]
    assert main(["eval", str(run_dir)]) == 0
    scored = json.loads((run_dir / "eval-test.json").read_text())
    expected = {name: scored["tasks"][name]["accuracy"] for name in TASKS}
    assert accuracy(results, rows, label_names()) == pytest.approx(expected)
    for name in TASKS:  # the run learned: no task answers with one class alone
        assert len({r["prediction"] for r in results if r["task"] == name}) > 1, (name, expected)
    assert [r["prediction"] for r in one_at_a_time(run_dir, inputs)] == [r["prediction"] for r in results]
    if method == "continual-mola-grad":  # where the auto-selector sent each input, as eval counted it
        names = scored["selector"]["task_names"] + ["base"]
        confusion = [[0] * len(names) for _ in TASKS]
        for result, row in zip(results, rows):
            confusion[TASKS.index(row["task"])][names.index(result["route"])] += 1
        assert confusion == scored["selector"]["confusion"]
    if method == "elrea":
        assert all(0 <= r["expert"] <= 2 for r in results)

    with_scores = predicted(run_dir, inputs, tmp_path / "scores.jsonl", "--batch-size", "7", "--scores")
    assert [r["prediction"] for r in with_scores] == [r["prediction"] for r in results]
    alone = one_at_a_time(run_dir, inputs, scores=True)
    for got, single, row in zip(with_scores, alone, rows):
        assert (
            1 / len(toys.TASKS[row["task"]][2]) <= got["score"] <= 1
        )  # the largest of the task's probabilities
        assert got["score"] == pytest.approx(single["score"], abs=1e-5)
    if method == "mola-grad":  # the softmax over the task's own classes, by hand
        run, model, tokenizer, tasks = load_trained(run_dir)
        collate = collator_of(run, [meta["task_type"] for meta in tasks], tokenizer)
        requests = read_requests(inputs, with_input_fields(run, tasks))
        for request, got in zip(requests[:6], with_scores):
            batch = collate([request.example])
            with torch.no_grad(), routed(model.eval(), batch):
                logits = model(batch)[0]
            own = logits[torch.isfinite(logits)]
            assert got["score"] == pytest.approx(float(own.softmax(-1).max()), abs=1e-5)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("mola-grad", {}),
        ("elrea", {"elrea_clusters": 2, "elrea_feature_dim": 16, "elrea_feature_examples": 24}),
    ],
)
def test_generated_answers_are_the_ones_eval_scores(
    method: str,
    extra: dict[str, Any],
    gpt2_dir: Path,
    gen_tasks_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    settings = toys.gen_settings(gpt2_dir, gen_tasks_dir, method=method, steps=10, max_new_tokens=6, **extra)
    run_dir = trained(tmp_path, settings)
    assert main(["eval", str(run_dir)]) == 0
    samples = json.loads((run_dir / "eval-test.json").read_text())["tasks"]["sort"]["samples"]
    test = (gen_tasks_dir / "sort" / "test.jsonl").read_text().splitlines()
    inputs = tmp_path / "prompts.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n" for line in test))
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(inputs), "--task", "sort", "--batch-size", "8"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # standard output
    assert len(results) == len(test)
    assert [r["prediction"] for r in results[: len(samples)]] == [s["generated"] for s in samples]

    shorter = predicted(run_dir, inputs, tmp_path / "short.jsonl", "--task", "sort", "--max-new-tokens", "2")
    greedy = [r["prediction"] for r in results]
    assert all(len(r["prediction"]) <= 2 for r in shorter) and any(len(text) > 2 for text in greedy)
    # greedy: the shorter answers begin the longer ones (at most 2 characters: a token is one, or none)
    assert all(text.startswith(r["prediction"]) for r, text in zip(shorter, greedy))
    sample = ["--task", "sort", "--sample", "--temperature", "5", "--seed", "3"]
    if method == "elrea":  # the ensemble decodes greedily
        assert main(["predict", str(run_dir), str(inputs), *sample]) == 2
        assert "decodes greedily" in capsys.readouterr().err
    else:
        first, again = (predicted(run_dir, inputs, tmp_path / f"s{i}.jsonl", *sample) for i in range(2))
        assert first == again and [r["prediction"] for r in first] != greedy  # seeded, and not greedy

    chat = {"task": "sort", "messages": [{"role": "user", "content": "cab"}]}
    answered = predicted(run_dir, write_rows(tmp_path / "chat.jsonl", [chat]), tmp_path / "chat-out.jsonl")
    assert len(answered) == 1 and isinstance(answered[0]["prediction"], str)
    bad = write_rows(tmp_path / "bad-chat.jsonl", [chat, {"task": "sort", "messages": [{"role": "user"}]}])
    assert main(["predict", str(run_dir), str(bad)]) == 3
    assert "bad-chat.jsonl, line 2: turn 1 of 'messages'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_run(model_dir: Path, tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("predict-lora")
    return trained(root, {**toys.settings(model_dir, tasks_dir, method="lora", steps=2), "tasks": TASKS})


@pytest.mark.parametrize(
    "rows, argv, words",
    [
        ([{"task": TASKS[0], "text": "a"}, {"text": "b"}], [], ["line 2", "no 'task' field"]),
        ([{"task": "weather", "text": "a"}], [], ["line 1", "'weather' is not a task", TASKS[0]]),
        ([{"task": TASKS[0], "sentence": "a"}], [], ["line 1", "missing field 'text'", "text_field"]),
        ([{"text": "a"}], ["--task", "weather"], ["--task 'weather' is not a task"]),
        ([{"text": "a"}], ["--batch-size", "0"], ["--batch-size must be at least 1"]),
        ([{"text": "a"}], ["--task", TASKS[0], "--top-p", "0.5"], ["--top-p: only with --sample"]),
        (
            [{"text": "a"}],
            ["--task", TASKS[0], "--sample", "--temperature", "0"],
            ["--temperature must be above 0"],
        ),
        (
            [{"text": "a"}],
            ["--task", TASKS[0], "--sample"],
            ["apply to generation tasks", "answer with a class"],
        ),
    ],
)
def test_bad_rows_are_named_by_file_and_line(
    lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: list, argv: list, words: list
):
    inputs = write_rows(tmp_path / "bad.jsonl", rows)
    code = main(["predict", str(lora_run), str(inputs), "--out", str(tmp_path / "out.jsonl"), *argv])
    err = capsys.readouterr().err
    assert code in (2, 3) and all(word in err for word in words), err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_run_saved_without_its_input_fields_takes_them_from_its_config(lora_run: Path):
    run = RunConfig.from_yaml(lora_run / "config.yaml")
    _, _, _, tasks = load_trained(lora_run)
    assert [meta["input_fields"]["text_field"] for meta in tasks] == ["text", "text"]
    older = [{k: v for k, v in meta.items() if k != "input_fields"} for meta in tasks]
    assert with_input_fields(run, older) == tasks


def test_a_continued_run_answers_its_earlier_tasks_as_the_earlier_run_did(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """The earlier tasks of a run that continued another (`continue_from`) keep their ids and, with their experts
    and routers frozen, their answers; the new task is answered too."""
    later = continued_after_two(model_dir, tasks_dir, tmp_path, "moe-adapters-task-id", steps_per_task=20)
    run_training(later, tmp_path / "later")
    inputs = write_rows(tmp_path / "inputs.jsonl", rows_of(tasks_dir, TASKS))
    before = predicted(tmp_path / "first", inputs, tmp_path / "before.jsonl")
    after = predicted(tmp_path / "later", inputs, tmp_path / "after.jsonl")
    assert len({r["prediction"] for r in before}) > 2  # both tasks' answers, not one class each
    assert [r["prediction"] for r in after] == [r["prediction"] for r in before]
    new = write_rows(tmp_path / "new.jsonl", rows_of(tasks_dir, toys.TASK_NAMES[2:]))
    answers = predicted(tmp_path / "later", new, tmp_path / "new-out.jsonl")
    assert {r["prediction"] for r in answers} <= set(toys.TASKS[toys.TASK_NAMES[2]][2])


def test_an_auto_selector_answers_rows_that_name_no_task(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A continual run with an auto-selector answers a row without a task: a row the selector routes to a learned
    task answers as that row naming that task does; a row kept on the base takes the class nearest it among every
    task's classes, all encoded by the base (checked against a loop over the classes one at a time). Rows that
    name their task answer as they did, in the same batches. `loramix eval` scores the same answers."""
    settings = {
        **toys.settings(model_dir, tasks_dir, method="continual-mola-grad", lr=1e-2, ddas_examples=40),
        "head": "label-prompt",
        "steps_per_task": 50,
        "tasks": specs(tasks_dir)[:2],
        "tasks_dir": None,
    }
    run_dir = trained(tmp_path, settings)
    rows = rows_of(tasks_dir, toys.TASK_NAMES)  # the third task was never learned: its inputs go to the base
    free = [{k: v for k, v in row.items() if k != "task"} for row in rows]
    named = [row for row in rows if row["task"] in TASKS][:6]
    results = predicted(run_dir, write_rows(tmp_path / "free.jsonl", named + free), tmp_path / "out.jsonl")
    given, chosen = results[: len(named)], results[len(named) :]
    by_task = predicted(run_dir, write_rows(tmp_path / "named.jsonl", named), tmp_path / "named-out.jsonl")
    assert [{k: v for k, v in r.items() if k != "line"} for r in given] == [
        {k: v for k, v in r.items() if k != "line"} for r in by_task
    ]
    assert all(r["task_given"] is False for r in chosen) and all("task_given" not in r for r in given)

    routed = [(row, r) for row, r in zip(free, chosen) if r["route"] != "base"]
    kept = [(row, r) for row, r in zip(free, chosen) if r["route"] == "base"]
    assert routed and kept, [r["route"] for r in chosen]
    assert all(r["task"] == r["route"] for _, r in routed)
    as_named = [{"task": r["route"], **row} for row, r in routed]
    named_file = write_rows(tmp_path / "as-named.jsonl", as_named)
    reference = predicted(run_dir, named_file, tmp_path / "ref.jsonl", "--scores")
    assert [r["prediction"] for _, r in routed] == [r["prediction"] for r in reference]
    scored_free = predicted(run_dir, tmp_path / "free.jsonl", tmp_path / "scored.jsonl", "--scores")
    assert [r["prediction"] for r in scored_free] == [r["prediction"] for r in results]
    routed_scores = [
        r["score"] for r, free_row in zip(scored_free[len(named) :], chosen) if free_row["route"] != "base"
    ]
    assert routed_scores == pytest.approx([r["score"] for r in reference], abs=1e-5)

    run, model, tokenizer, tasks = load_trained(run_dir)
    head, collator = model.heads, collator_of(run, ["classification"] * len(tasks), tokenizer)
    classes = []
    for row in range(head.label_input_ids.shape[0]):  # every task's class texts, one at a time, on the base
        text = {
            "input_ids": head.label_input_ids[row : row + 1],
            "attention_mask": head.label_attention_mask[row : row + 1],
        }
        classes.append(
            model.encode(text, torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool), noise=False)
        )
    columns = [(meta["name"], label) for meta in tasks for label in meta["labels"]]
    for row, result in kept:
        (request,) = read_requests(write_rows(tmp_path / "one.jsonl", [row]), tasks, any_task=True)
        batch = collator([request.example])
        with torch.no_grad():
            pooled = model.encode(
                batch, torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool), noise=False
            )
        cosines = torch.cat([torch.cosine_similarity(pooled, one) for one in classes])
        nearest = int(cosines.argmax())
        assert (result["task"], result["prediction"]) == columns[nearest]
        # its score: the nearest class's probability among every task's, at the head's logit scale
        scale = head.logit_scale.detach().clamp(max=math.log(100.0)).exp()
        probability = torch.softmax(scale * cosines, -1)[nearest]
        score = scored_free[len(named) + free.index(row)]["score"]
        assert score == pytest.approx(float(probability.detach()), abs=1e-5) and score >= 1 / len(classes)

    assert main(["eval", str(run_dir)]) == 0  # its score with no task given: the share of rows answered right
    scored = json.loads((run_dir / "eval-test.json").read_text())["selector"]
    hits: dict[str, list[bool]] = {name: [] for name in TASKS}
    for row, result in zip(rows, chosen):
        if row["task"] in TASKS:
            label = label_names()[row["task"]][row["label"]]
            hits[row["task"]].append((result["task"], result["prediction"]) == (row["task"], label))
    assert scored["task_free_accuracy"] == pytest.approx({name: sum(h) / len(h) for name, h in hits.items()})
    assert 0 < scored["task_free_mean"] <= 1

    bad = write_rows(tmp_path / "bad.jsonl", [free[0], {"sentence": "no field of any task"}])
    assert main(["predict", str(run_dir), str(bad)]) == 3
    assert (
        "bad.jsonl, line 2: no 'task' field, and not the input fields of any task" in capsys.readouterr().err
    )


def test_rows_of_one_task_reach_the_routing_block_as_one_task_from_the_host(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Each batch's task ids reach the routing block as collated, on the CPU: rows all of one task (`--task`) are
    known as one, and their layers run that task's expert as one LoRA; mixed rows are not."""

    from loramix.train import predict as predict_module

    run_dir = trained(
        tmp_path, {**toys.settings(model_dir, tasks_dir, method="mola-grad", steps=1), "tasks": TASKS}
    )
    rows = rows_of(tasks_dir, TASKS)
    states = toys.host_routed_states(monkeypatch, predict_module)
    one = [{k: v for k, v in row.items() if k != "task"} for row in rows if row["task"] == TASKS[1]]
    predicted(
        run_dir, write_rows(tmp_path / "one.jsonl", one), tmp_path / "one-out.jsonl", "--task", TASKS[1]
    )
    assert states and all(s.one_task == 1 and s.model_gate.single_expert() == 1 for s in states)
    states.clear()
    predicted(run_dir, write_rows(tmp_path / "mixed.jsonl", rows), tmp_path / "mixed-out.jsonl")
    assert states and all(s.one_task is None for s in states)
