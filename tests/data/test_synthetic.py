"""The synthetic suite: deterministic per seed, documented sizes and labels, disjoint splits, files that read back."""

from __future__ import annotations

import json

import pytest

from loramix.data import synthetic
from loramix.data.synthetic import LABEL_NOISE, TASK_RULES, TEST_SIZE, make_suite, write_suite
from loramix.errors import ConfigError

SCALE = 0.02  # 6..60 train rows and 8 test rows per task: fast, yet every label appears


@pytest.fixture(scope="module")
def suite():
    return make_suite(seed=0, scale=SCALE)


def test_same_seed_gives_the_same_suite(suite):
    assert make_suite(seed=0, scale=SCALE) == suite


def test_another_seed_gives_other_rows(suite):
    other = make_suite(seed=1, scale=SCALE)
    assert [task.name for task in other] == [task.name for task in suite]
    for mine, theirs in zip(suite, other):
        assert mine.train != theirs.train


def test_tasks_sizes_and_label_counts_are_as_documented(suite):
    assert [task.name for task in suite] == [rule.name for rule in TASK_RULES]
    for task, rule in zip(suite, TASK_RULES):
        assert task.labels == list(rule.labels)
        assert len(task.train) == max(len(rule.labels), round(rule.train_size * SCALE))
        assert len(task.test) == max(len(rule.labels), round(TEST_SIZE * SCALE))
    assert {len(task.labels) for task in suite} == {2, 3, 4, 5, 6}
    assert min(rule.train_size for rule in TASK_RULES) == 300
    assert max(rule.train_size for rule in TASK_RULES) == 3000


def test_every_label_is_used_in_every_split_and_in_range(suite):
    for task in suite:
        for rows in (task.train, task.test):
            assert {label for _, label in rows} == set(range(len(task.labels))), task.name


def test_train_and_test_share_no_text(suite):
    for task in suite:
        train_texts = [text for text, _ in task.train]
        assert len(set(train_texts)) == len(train_texts), task.name
        assert not set(train_texts) & {text for text, _ in task.test}, task.name


def test_tasks_read_the_same_kind_of_sentence(suite):
    for task in suite:
        for text, _ in task.train + task.test:
            assert text.startswith("the ") and " near the " in text, text
            assert len(text.split()) <= 16, text


def _rule_labels(task):
    """Labels of two rules that can be read off the text: the first adjective's polarity, the time phrase."""
    if task.name == "first_mood":
        return [int(text.split()[1] in synthetic._NEGATIVE) for text, _ in task.train + task.test]
    day, night = synthetic._TIMES["day"], synthetic._TIMES["night"]
    return [
        1 if text.endswith(day) else 2 if text.endswith(night) else 0 for text, _ in task.train + task.test
    ]


def test_labels_follow_the_rules_without_noise_and_a_tenth_differ_with_it():
    by_name = {task.name: task for task in make_suite(seed=2, scale=0.05, label_noise=0.0)}
    for name in ("first_mood", "time_of_day"):
        task = by_name[name]
        assert _rule_labels(task) == [label for _, label in task.train + task.test]
    by_name = {task.name: task for task in make_suite(seed=2, scale=1.0)}
    rows = wrong = 0
    for name in ("first_mood", "time_of_day"):
        task = by_name[name]
        labels = [label for _, label in task.train + task.test]
        wrong += sum(rule != label for rule, label in zip(_rule_labels(task), labels))
        rows += len(labels)
    assert abs(wrong / rows - LABEL_NOISE) < 0.03


def test_scale_must_be_positive():
    with pytest.raises(ConfigError, match="scale"):
        make_suite(scale=0)
    with pytest.raises(ConfigError, match="label_noise"):
        make_suite(label_noise=1.0)


def test_write_suite_round_trips(tmp_path, suite):
    folders = write_suite(tmp_path, seed=0, scale=SCALE)
    assert [folder.name for folder in folders] == [task.name for task in suite]
    assert list(json.loads((tmp_path / "tasks.json").read_text())) == [task.name for task in suite]
    for folder, task in zip(folders, suite):
        assert json.loads((folder / "meta.json").read_text()) == {"labels": task.labels}
        for split, rows in (("train", task.train), ("test", task.test)):
            lines = (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            read = [json.loads(line) for line in lines]
            assert all(set(row) == {"text", "label"} for row in read)
            assert all(0 <= row["label"] < len(task.labels) for row in read)
            assert [(row["text"], row["label"]) for row in read] == rows


def test_written_suite_loads_as_task_specs(tmp_path):
    from loramix.data import tasks_from_directory

    write_suite(tmp_path, seed=3, scale=SCALE)
    specs = tasks_from_directory(tmp_path)
    assert [spec.name for spec in specs] == [rule.name for rule in TASK_RULES]
