"""Scoring generated answers: normalised exact match, token F1, and the task scorers (number, label word)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramix.train.generation_eval import first_label, first_number, fit_positions, normalize, score, token_f1


def test_normalize_drops_case_punctuation_and_extra_spaces():
    assert normalize("  The  Answer, is: 42!\n") == "the answer is 42"


@pytest.mark.parametrize(
    ("prediction", "reference", "f1"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("cat the", "the cat sat", 0.8),  # precision 1, recall 2/3
        ("dog", "the cat", 0.0),
        ("", "", 1.0),
        ("", "cat", 0.0),
        ("a a b", "a b b", 2 / 3),  # repeated tokens count once each time they match
    ],
)
def test_token_f1(prediction: str, reference: str, f1: float):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_first_number_reads_signs_decimals_and_thousands():
    assert first_number("so the total is -1,234.5 apples, not 7") == -1234.5
    assert first_number("no digits here") is None


def test_first_label_is_the_earliest_whole_word():
    labels = ["positive", "negative", "neutral"]
    assert first_label("I'd say Negative, maybe neutral.", labels) == "negative"
    assert first_label("nonpositive", labels) is None  # whole words only
    assert first_label("", labels) is None


@pytest.mark.parametrize(
    ("prediction", "reference", "scorer", "right"),
    [
        ("Paris.", "paris", "exact", True),
        ("Paris, France", "paris", "exact", False),
        ("The answer is 12.", "#### 12", "number", True),
        ("The answer is 12.5", "12", "number", False),
        ("no idea", "12", "number", False),
        ("Sentiment: positive", "positive", "label", True),
        ("positive or negative", "negative", "label", False),
        ("unsure", "negative", "label", False),
    ],
)
def test_score_by_the_tasks_scorer(prediction: str, reference: str, scorer: str, right: bool):
    assert score(prediction, reference, scorer, ["positive", "negative"]) is right


def test_prompts_and_answers_fit_the_position_table():
    """Within the table nothing changes; past it the answer keeps its length up to half the table and the prompts
    lose their oldest (leftmost: they are left-padded) tokens."""
    prompts = {
        "input_ids": torch.arange(20).repeat(2, 1),
        "attention_mask": torch.ones(2, 20),
        "task_ids": torch.zeros(2),
    }
    same, room = fit_positions(prompts, 10, 64)
    assert same is prompts and room == 10
    assert fit_positions(prompts, 10, None)[1] == 10
    cut, room = fit_positions(prompts, 10, 24)
    assert room == 10 and cut["input_ids"].shape == (2, 14) and cut["input_ids"][0, 0] == 6
    assert cut["attention_mask"].shape == (2, 14) and cut["task_ids"].shape == (2,)
    cut, room = fit_positions(prompts, 40, 24)  # a long answer keeps half the table
    assert room == 12 and cut["input_ids"].shape == (2, 12)


def test_references_that_the_scorer_cannot_read_are_warned_of():
    from loramix.errors import DataWarning
    from loramix.train.generation_eval import warn_unscorable

    with pytest.warns(DataWarning, match=r"task 'math': 1 of 2 references hold no number \(e.g. 'none'\)"):
        warn_unscorable("math", "number", (), ["4", "none"])
    with pytest.warns(DataWarning, match="1 of 2 references name none of the labels yes, no"):
        warn_unscorable("qa", "label", ("yes", "no"), ["yes", "maybe"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unscorable("qa", "label", ("yes", "no"), ["yes", "No."])
        warn_unscorable("free", "exact", (), ["anything"])


def test_generation_evaluation_routes_each_batch_by_its_ids_as_collated(
    gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Teacher-forced logits and generation alike route each evaluation batch (one task's examples) by its ids as
    collated on the host: the batch is known as one task, and decoding runs that task's expert as one LoRA."""
    from loramix.cli import main
    from loramix.train import generation_eval
    from tests.test_cli import write_config
    from tests.train import toys

    settings = toys.gen_settings(gpt2_dir, gen_tasks_dir, method="mola-grad", steps=1, max_new_tokens=3)
    assert (
        main(["train", write_config(tmp_path / "run.yaml", settings), "--output-dir", str(tmp_path / "run")])
        == 0
    )
    states = toys.host_routed_states(monkeypatch, generation_eval)
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert states and all(s.one_task is not None for s in states)
    assert all(s.model_gate.single_expert() == s.one_task for s in states)
    assert {s.one_task for s in states} == set(range(len(toys.GEN_TASKS)))
