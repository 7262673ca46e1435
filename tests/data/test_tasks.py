from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramix.data import MultiTaskData, TaskSpec, load_task_specs, tasks_from_directory
from loramix.errors import ConfigError, DataError, DataWarning

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def rows(count: int, labels: tuple[object, ...] = (0, 1)) -> list[dict[str, object]]:
    return [{"text": f"text {i}", "label": labels[i % len(labels)]} for i in range(count)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"train": "a.txt"}, "train: file must end in one of"),
        ({"train": "a.jsonl", "labels": ["x"]}, "at least two label names"),
        ({"train": "a.jsonl", "labels": ["x", "y", "x"]}, "label names repeat: ['x']"),
        (
            {"train": "a.jsonl", "task_type": "regression", "labels": ["x", "y"]},
            "regression task has no label names",
        ),
        ({"train": "a.jsonl", "task_type": "ranking"}, "task_type"),
        ({"train": "a.jsonl", "text_field": "label"}, "must differ"),
        ({"train": "a.jsonl", "max_train_examples": 0}, "max_train_examples"),
        (
            {"train": "a.jsonl", "textfield": "x"},
            "textfield: not a key of this config (got 'x'). Did you mean 'text_field' or 'text_pair_field'?",
        ),
        ({"train": {"hf_dataset": "glue", "subset": "sst2"}}, "subset"),
        ({}, "train: Field required"),
    ],
)
def test_bad_specs_name_the_field(fields: dict[str, object], message: str):
    with pytest.raises(ConfigError) as info:
        TaskSpec.from_dict({"name": "t", **fields})
    assert message in str(info.value)


def test_an_unknown_key_like_no_known_one_gets_no_suggestion():
    with pytest.raises(ConfigError) as info:
        TaskSpec.from_dict({"name": "t", "train": "a.jsonl", "zzz": 1})
    assert str(info.value).endswith("zzz: not a key of this config (got 1)")


def test_integer_label_names_are_the_names_integer_labels_get():
    assert TaskSpec.from_dict({"name": "t", "train": "a.jsonl", "labels": [0, 1, 2]}).labels == [
        "0",
        "1",
        "2",
    ]


def test_spec_accepts_paths_and_round_trips(tmp_path: Path):
    spec = TaskSpec(name="t", train=tmp_path / "a.jsonl", test={"hf_dataset": "glue", "config": "sst2"})
    assert spec.train == str(tmp_path / "a.jsonl")
    assert TaskSpec.from_dict(spec.to_dict()) == spec


def test_tasks_get_ids_in_spec_order_and_report_sizes(jsonl):
    specs = [
        TaskSpec(name="big", train=jsonl("big.jsonl", rows(6)), test=jsonl("big_test.jsonl", rows(2))),
        TaskSpec(
            name="words",
            train=jsonl("w.jsonl", rows(3, ("b", "a", "c"))),
            validation=jsonl("wv.jsonl", rows(1, ("c",))),
        ),
        TaskSpec(name="score", train=jsonl("s.jsonl", rows(2, (0.5, 1.5))), task_type="regression"),
    ]
    data = MultiTaskData(specs)
    assert data.task_names == ["big", "words", "score"]
    assert data.num_tasks == 3
    assert data.label_names == [["0", "1"], ["a", "b", "c"], []]
    assert data.num_labels == [2, 3, 1]
    assert data.sizes("train") == [6, 3, 2]
    assert data.sizes("validation") == [0, 1, 0]
    assert data.sizes("test") == [2, 0, 0]
    assert data.tasks[1].sizes == {"train": 3, "validation": 1, "test": 0}
    train = data.split("train")
    assert [e.task for e in train] == data.task_ids("train") == [0] * 6 + [1] * 3 + [2] * 2
    assert [e.label for e in data.examples("train", "words")] == [1, 0, 2]
    assert data.examples("validation", 1)[0].label == 2
    assert data.task_id("score") == 2
    assert data.has_split("validation") and data.has_split("test")


def test_duplicate_task_names_name_both(jsonl):
    path = jsonl("a.jsonl", rows(2))
    specs = [TaskSpec(name="a", train=path), TaskSpec(name="b", train=path), TaskSpec(name="a", train=path)]
    with pytest.raises(ConfigError, match="task 1 and task 3 are both named 'a'"):
        MultiTaskData(specs)


def test_unknown_task_and_unloaded_split_are_data_errors(jsonl):
    data = MultiTaskData([TaskSpec(name="a", train=jsonl("a.jsonl", rows(2)))], splits=["train"])
    with pytest.raises(DataError, match="unknown task 'b'"):
        data.task_id("b")
    with pytest.raises(DataError, match="split 'test' was not loaded"):
        data.split("test")


def test_max_train_examples_is_a_seeded_order_keeping_subsample(jsonl):
    path = jsonl("a.jsonl", rows(50))

    def texts(seed: int) -> list[str]:
        data = MultiTaskData([TaskSpec(name="a", train=path, max_train_examples=10, seed=seed)])
        return [e.text for e in data.split("train")]

    first = texts(0)
    assert len(first) == 10
    assert first == texts(0)
    assert first == sorted(first, key=lambda text: int(text.split()[1]))
    assert first != texts(1)


def test_eval_examples_are_a_fixed_sample_across_labels(jsonl):
    """A test file sorted by label must not give "the first N" of one label: the sample spans the file."""
    sorted_rows = sorted(rows(60, labels=(0, 1, 2)), key=lambda row: row["label"])
    path = jsonl("a.jsonl", sorted_rows)
    data = MultiTaskData([TaskSpec(name="a", train=path, test=path)])
    chosen = data.eval_examples("test", "a", 15)
    assert len(chosen) == 15 and len({e.label for e in chosen}) == 3
    positions = [int(e.text.split()[1]) for e in chosen]
    order = [int(r["text"].split()[1]) for r in sorted_rows]
    assert [order.index(p) for p in positions] == sorted(order.index(p) for p in positions)  # file order kept
    other = MultiTaskData([TaskSpec(name="a", train=path, test=path, seed=5)])
    assert [e.text for e in other.eval_examples("test", "a", 15)] == [
        e.text for e in chosen
    ]  # not the run seed
    assert data.eval_examples("test", "a", 100) == data.examples("test", "a")
    assert data.eval_examples("test", "a") == data.examples("test", "a")


def test_load_task_specs_resolves_paths_against_the_spec_file(tmp_path: Path, jsonl):
    jsonl("a.jsonl", rows(4))
    spec_file = tmp_path / "tasks.yaml"
    spec_file.write_text(
        "tasks:\n  - name: a\n    train: a.jsonl\n    labels: [neg, pos]\n", encoding="utf-8"
    )
    (spec,) = load_task_specs(spec_file)
    assert spec.train == str(tmp_path / "a.jsonl")
    assert MultiTaskData([spec]).sizes("train") == [4]
    json_file = tmp_path / "tasks.json"
    json_file.write_text(json.dumps([{"name": "a", "train": "a.jsonl", "colour": "red"}]), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"task 1 of 1 \(a\)(.|\n)*colour: not a key"):
        load_task_specs(json_file)
    assert load_task_specs([{"name": "b", "train": "b.csv"}])[0].train == "b.csv"
    spec_file.write_text("tasks:\n  - name: a\n    train: a.jsonl\n    train: b.jsonl\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="tasks.yaml.*key 'train' is given twice"):
        load_task_specs(spec_file)


def write_task(root: Path, name: str, labels: list[str], pair: bool, splits: dict[str, int]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    meta = {"name": name, "labels": labels, "input": "pair" if pair else "single"}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    for split, count in splits.items():
        text = {"text_a": "a", "text_b": "b"} if pair else {"text": "a"}
        lines = [json.dumps({**text, "label": i % len(labels)}) for i in range(count)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_tasks_from_directory_reads_meta_and_splits(tmp_path: Path):
    write_task(tmp_path, "zeta", ["neg", "pos"], pair=False, splits={"train": 4, "validation": 2, "test": 3})
    write_task(tmp_path, "alpha", ["no", "yes", "maybe"], pair=True, splits={"train": 5, "test": 1})
    (tmp_path / "tasks.json").write_text(json.dumps({"zeta": {}, "alpha": {}}), encoding="utf-8")
    specs = tasks_from_directory(tmp_path)
    assert [s.name for s in specs] == ["zeta", "alpha"]
    assert specs[1].text_field == "text_a" and specs[1].text_pair_field == "text_b"
    assert specs[1].validation is None and specs[1].labels == ["no", "yes", "maybe"]
    data = MultiTaskData(tasks_from_directory(tmp_path, ["alpha", "zeta"], max_train_examples=4))
    assert data.sizes("train") == [4, 4]
    assert data.split("test")[0].text_pair == "b"
    with pytest.raises(DataError, match=r"unknown tasks \['nope'\]; available: zeta, alpha$"):
        tasks_from_directory(tmp_path, ["nope"])
    with pytest.raises(DataError, match=r"unknown tasks \['zeda'\]; .*\. Did you mean 'zeta'\?$"):
        tasks_from_directory(tmp_path, ["zeda"])


def test_real_shared_data_counts_match_the_index():
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA}: the ten tasks belong in ../shared/data beside the checkout"
    index = json.loads((SHARED_DATA / "tasks.json").read_text(encoding="utf-8"))
    data = MultiTaskData(tasks_from_directory(SHARED_DATA, ["sst2", "mrpc"]))
    assert data.task_names == ["sst2", "mrpc"]
    for task_id, name in enumerate(data.task_names):
        expected = index[name]["counts"]
        assert data.num_labels[task_id] == index[name]["num_labels"]
        for split in ("train", "validation", "test"):
            assert data.sizes(split)[task_id] == expected.get(split, 0), (name, split)
    assert data.label_names[1] == ["not_equivalent", "equivalent"]
    assert all(e.text_pair for e in data.examples("train", "mrpc"))
    assert all(e.text_pair is None for e in data.examples("test", "sst2"))


def test_integer_labels_that_skip_classes_warn_naming_the_file_and_the_empty_classes(jsonl):
    path = jsonl("t.jsonl", rows(6) + [{"text": "stray", "label": 7}])
    with pytest.warns(DataWarning) as caught:
        data = MultiTaskData([TaskSpec(name="t", train=path)])
    assert data.num_labels == [8]  # what the file says, kept; the warning says why it may be wrong
    message = str(caught[0].message)
    assert path in message and "2, 3, 4, 5, 6" in message and "labels" in message


def test_declared_labels_missing_from_the_train_file_warn_naming_them(jsonl):
    path = jsonl("t.jsonl", rows(4, labels=("pos",)))
    with pytest.warns(DataWarning) as caught:
        MultiTaskData([TaskSpec(name="t", train=path, labels=["neg", "pos", "mixed"])])
    message = str(caught[0].message)
    assert path in message and "'neg', 'mixed'" in message and "'pos'" not in message


def test_train_files_that_cover_their_labels_load_without_a_warning(jsonl, recwarn):
    MultiTaskData([TaskSpec(name="t", train=jsonl("t.jsonl", rows(4)), labels=["neg", "pos"])])
    MultiTaskData([TaskSpec(name="u", train=jsonl("u.jsonl", rows(6, labels=(0, 1, 2))))])
    assert not [w for w in recwarn if issubclass(w.category, DataWarning)]
