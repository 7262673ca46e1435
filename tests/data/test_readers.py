from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from loramix.data import Example, HFSource, MultiTaskData, TaskSpec, infer_label_names, read_rows, to_examples
from loramix.errors import ConfigError, DataError


def read(spec: TaskSpec) -> list[Example]:
    raw = read_rows(spec.train)
    names = infer_label_names(raw, spec) if spec.task_type == "classification" else None
    return to_examples(raw, spec, label_names=names, task=3)


def test_jsonl_single_texts(jsonl):
    path = jsonl("t.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    examples = read(TaskSpec(name="t", train=path, labels=["neg", "pos"]))
    assert examples == [Example("good", None, 1, 3), Example("bad", None, 0, 3)]


def test_jsonl_pairs_blank_lines_bom_and_json_suffix(tmp_path: Path):
    path = tmp_path / "pairs.json"
    path.write_bytes(
        b'\xef\xbb\xbf{"a": "x", "b": "y", "y": "yes"}\n\n  \n{"a": "p", "b": "q", "y": "no"}\r\n'
    )
    spec = TaskSpec(name="p", train=str(path), text_field="a", text_pair_field="b", label_field="y")
    examples = read(spec)
    assert [(e.text, e.text_pair, e.label) for e in examples] == [("x", "y", 1), ("p", "q", 0)]


def test_integer_labels_infer_names_up_to_the_largest(jsonl):
    path = jsonl("t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 3}])
    spec = TaskSpec(name="t", train=path)
    assert infer_label_names(read_rows(path), spec) == ["0", "1", "2", "3"]


def test_string_labels_infer_their_sorted_set(jsonl):
    path = jsonl(
        "t.jsonl",
        [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "pos"}],
    )
    spec = TaskSpec(name="t", train=path)
    assert infer_label_names(read_rows(path), spec) == ["neg", "pos"]
    assert [e.label for e in read(spec)] == [1, 0, 1]


def test_csv_with_header_quotes_and_integer_labels(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_text('sentence,label\n"hello, world",1\nbye,0\n', encoding="utf-8")
    spec = TaskSpec(name="t", train=str(path), text_field="sentence", labels=["neg", "pos"])
    assert [(e.text, e.label) for e in read(spec)] == [("hello, world", 1), ("bye", 0)]


def test_csv_labels_may_be_names(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhi,pos\nho,neg\n", encoding="utf-8")
    assert [e.label for e in read(TaskSpec(name="t", train=str(path), labels=["neg", "pos"]))] == [1, 0]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_integer_label_names_are_read_as_names_in_every_file_kind(tmp_path: Path, kind: str):
    """Labels declared as 1, 2, 3: a 1 in the data is the label "1" (index 0), whether a JSON line stores the
    number or a CSV cell the text, and a 0 is no label of the task, not the index of "1"."""
    rows = [("a", 1), ("b", 2), ("c", 3)]
    path = tmp_path / f"t.{kind}"
    if kind == "jsonl":
        path.write_text("".join(f'{{"text": "{t}", "label": {y}}}\n' for t, y in rows), encoding="utf-8")
    else:
        path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    spec = TaskSpec(name="t", train=str(path), labels=[1, 2, 3])
    assert [e.label for e in read(spec)] == [0, 1, 2]
    path.write_text(path.read_text().replace("3", "0"), encoding="utf-8")
    with pytest.raises(DataError, match="unknown label 0; the task's labels are: 1, 2, 3"):
        read(spec)
    names = TaskSpec(name="t", train=str(path), labels=["no", "yes", "maybe"])
    assert [e.label for e in read(names)] == [1, 2, 0]  # names that are not integers: integers are indices


def test_a_source_with_its_own_class_names_stores_indices_even_when_the_names_are_numbers():
    """A Hugging Face ClassLabel (yelp_polarity's names are "1" and "2") stores each row's class index."""
    from loramix.data.readers import RawSplit, Row

    raw = RawSplit(
        "yelp",
        [Row(f"r{i}", {"text": "x", "label": y}) for i, y in enumerate([0, 1, 1])],
        {"label": ["1", "2"]},
    )
    spec = TaskSpec(name="yelp", train="unused.jsonl")
    names = infer_label_names(raw, spec)
    assert names == ["1", "2"] and [e.label for e in to_examples(raw, spec, label_names=names)] == [0, 1, 1]


def test_yaml_booleans_as_labels_and_prompt_rows_in_a_classification_task_say_what_to_write(jsonl):
    from loramix.data import load_task_specs

    with pytest.raises(ConfigError, match="labels: .*YAML reads yes, no, on and off as booleans; quote them"):
        load_task_specs([{"name": "t", "train": "t.jsonl", "labels": [True, False]}])
    path = jsonl("g.jsonl", [{"prompt": "2+2=", "response": "4"}])
    with pytest.raises(DataError, match="missing field 'text'.*`task_type: generation`"):
        read(TaskSpec(name="g", train=path, labels=["a", "b"]))


def test_tsv_keeps_bare_quotes(tmp_path: Path):
    path = tmp_path / "t.tsv"
    path.write_text('text\tlabel\nsay "hi\t0\nok\t1\n', encoding="utf-8")
    assert [e.text for e in read(TaskSpec(name="t", train=str(path)))] == ['say "hi', "ok"]


def test_regression_labels_are_floats(tmp_path: Path, jsonl):
    path = jsonl("r.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": 4}])
    assert [e.label for e in read(TaskSpec(name="r", train=path, task_type="regression"))] == [0.5, 4.0]
    csv_path = tmp_path / "r.csv"
    csv_path.write_text("text,label\na,2.25\n", encoding="utf-8")
    assert read(TaskSpec(name="r", train=str(csv_path), task_type="regression"))[0].label == 2.25


# (case, file name, file bytes, extra spec fields, substrings the message must contain besides the file name)
BAD_DATA: list[tuple[str, str, bytes, dict[str, Any], list[str]]] = [
    (
        "invalid json",
        "a.jsonl",
        b'{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c",\n',
        {},
        ["line 3", "not valid JSON"],
    ),
    (
        "not utf-8",
        "b.jsonl",
        b'{"text": "a", "label": 0}\n{"text": "caf\xe9", "label": 1}\n',
        {},
        ["line 2", "UTF-8"],
    ),
    (
        "missing text",
        "c.jsonl",
        b'{"text": "a", "label": 0}\n{"sentence": "b", "label": 1}\n',
        {},
        ["line 2", "'text'", "text_field"],
    ),
    (
        "missing label",
        "d.jsonl",
        b'{"text": "a", "label": 0}\n{"text": "b"}\n',
        {"labels": ["n", "p"]},
        ["line 2", "'label'"],
    ),
    (
        "unknown label",
        "e.jsonl",
        b'{"text": "a", "label": "pos"}\n{"text": "b", "label": "maybe"}\n',
        {"labels": ["neg", "pos"]},
        ["line 2", "unknown label 'maybe'", "neg, pos"],
    ),
    (
        "label out of range",
        "f.jsonl",
        b'{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n',
        {"labels": ["n", "p"]},
        ["line 2", "outside 0..1"],
    ),
    (
        "non-string text",
        "g.jsonl",
        b'{"text": 5, "label": 0}\n',
        {"labels": ["n", "p"]},
        ["line 1", "'text'", "must be a string", "int 5"],
    ),
    (
        "null text",
        "h.jsonl",
        b'{"text": "a", "label": 0}\n{"text": null, "label": 1}\n',
        {},
        ["line 2", "null"],
    ),
    (
        "array instead of object",
        "i.jsonl",
        b'{"text": "a", "label": 0}\n["b", 1]\n',
        {},
        ["line 2", "JSON object"],
    ),
    (
        "boolean label",
        "j.jsonl",
        b'{"text": "a", "label": true}\n',
        {"labels": ["n", "p"]},
        ["line 1", "label must be"],
    ),
    (
        "mixed label kinds",
        "k.jsonl",
        b'{"text": "a", "label": 0}\n{"text": "b", "label": "pos"}\n',
        {},
        ["line 2", "line 1"],
    ),
    (
        "negative label",
        "l.jsonl",
        b'{"text": "a", "label": 1}\n{"text": "b", "label": -1}\n',
        {},
        ["line 2", "negative"],
    ),
    (
        "one label only",
        "m.jsonl",
        b'{"text": "a", "label": 0}\n{"text": "b", "label": 0}\n',
        {},
        ["at least two labels"],
    ),
    ("empty file", "n.jsonl", b"\n\n", {}, ["no examples"]),
    (
        "missing pair text",
        "o.jsonl",
        b'{"text_a": "a", "text_b": "b", "label": 0}\n{"text_a": "c", "label": 1}\n',
        {"text_field": "text_a", "text_pair_field": "text_b"},
        ["line 2", "'text_b'"],
    ),
    (
        "regression text label",
        "p.jsonl",
        b'{"text": "a", "label": 0.5}\n{"text": "b", "label": "high"}\n',
        {"task_type": "regression"},
        ["line 2", "finite number"],
    ),
    ("csv short row", "q.csv", b"text,label\na,0\nb\n", {}, ["line 3", "1 fields", "header has 2"]),
    ("csv quote left open", "q2.csv", b'text,label\na,0\n"b,1\nc,0\n', {}, ["line 3", "1 fields"]),
    ("csv row after a two-line field", "q3.csv", b'text,label\n"a\nb",0\nc\n', {}, ["line 4", "1 fields"]),
    (
        "csv unknown label",
        "r.csv",
        b"text,label\na,pos\nb,meh\n",
        {"labels": ["neg", "pos"]},
        ["line 3", "unknown label 'meh'"],
    ),
    ("csv repeated header", "s.csv", b"text,text,label\na,b,0\n", {}, ["line 1", "repeated column names"]),
    (
        "csv index out of range",
        "t.csv",
        b"text,label\na,0\nb,7\n",
        {"labels": ["n", "p"]},
        ["line 3", "outside 0..1"],
    ),
    ("tsv missing column", "u.tsv", b"sentence\tlabel\na\t0\n", {"labels": ["n", "p"]}, ["line 2", "'text'"]),
    ("csv not utf-8", "v.csv", b"text,label\na,0\nb,1\n\xff\xfe,0\n", {}, ["line 4", "UTF-8"]),
]


@pytest.mark.parametrize(
    ("file_name", "content", "fields", "expected"),
    [case[1:] for case in BAD_DATA],
    ids=[case[0] for case in BAD_DATA],
)
def test_bad_data_names_file_and_line(
    tmp_path: Path, file_name: str, content: bytes, fields: dict[str, Any], expected: list[str]
):
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        MultiTaskData([TaskSpec(name="bad", train=str(path), **fields)])
    message = str(info.value)
    assert file_name in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_test_split_labels_are_checked_against_the_train_names(jsonl):
    train = jsonl("train.jsonl", [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}])
    test = jsonl("test.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "neutral"}])
    with pytest.raises(DataError, match=r"test\.jsonl, line 2: unknown label 'neutral'"):
        MultiTaskData([TaskSpec(name="t", train=train, test=test)])


def test_missing_file_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))


class _Labels:
    def __init__(self, names: list[str]) -> None:
        self.names = names


class _FakeDataset(list):
    features = {"label": _Labels(["neg", "pos"]), "sentence": object()}


def test_hugging_face_source_reads_rows_and_class_names(monkeypatch: pytest.MonkeyPatch):
    calls = []

    def load_dataset(name: str, config: str | None, split: str) -> _FakeDataset:
        calls.append((name, config, split))
        return _FakeDataset([{"sentence": "fine", "label": 1}, {"sentence": "awful", "label": 0}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    spec = TaskSpec(name="sst2", train={"hf_dataset": "glue", "config": "sst2"}, text_field="sentence")
    assert isinstance(spec.train, HFSource)
    data = MultiTaskData([spec])
    assert calls == [("glue", "sst2", "train")]
    assert data.label_names == [["neg", "pos"]]
    assert [e.label for e in data.split("train")] == [1, 0]


def test_hugging_face_row_errors_name_the_dataset_and_row(monkeypatch: pytest.MonkeyPatch):
    def load_dataset(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
        return [{"text": "a", "label": 0}, {"text": 7, "label": 1}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"imdb \[test\], row 1: field 'text' must be a string"):
        read(TaskSpec(name="imdb", train={"hf_dataset": "imdb", "split": "test"}))


def test_hugging_face_source_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ConfigError, match=r"pip install 'loramix\[hub\]'"):  # one line, no traceback
        read_rows(HFSource(hf_dataset="glue", config="sst2"))


def write_parquet(
    path: Path, columns: dict[str, list], class_names: dict[str, list[str]] | None = None
) -> Path:
    """A Parquet file of `columns`; `class_names` go into the schema as a Hugging Face dataset saves its
    `ClassLabel` features."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(columns)
    if class_names is not None:
        features = {name: {"_type": "ClassLabel", "names": names} for name, names in class_names.items()}
        features.update(
            {name: {"_type": "Value", "dtype": "string"} for name in columns if name not in features}
        )
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path)
    return path


def test_parquet_rows_and_the_class_names_a_hugging_face_dataset_saved(tmp_path: Path):
    saved = write_parquet(
        tmp_path / "train.parquet",
        {"sentence": ["fine", "awful", "ok"], "label": [1, 0, 1]},
        {"label": ["neg", "pos"]},
    )
    data = MultiTaskData([TaskSpec(name="sst2", train=str(saved), text_field="sentence")])
    assert data.label_names == [["neg", "pos"]]
    assert [(e.text, e.label) for e in data.split("train")] == [("fine", 1), ("awful", 0), ("ok", 1)]
    plain = write_parquet(tmp_path / "plain.parquet", {"text": ["a", "b"], "label": ["yes", "no"]})
    assert MultiTaskData([TaskSpec(name="t", train=str(plain))]).label_names == [
        ["no", "yes"]
    ]  # from the rows
    bad = write_parquet(tmp_path / "bad.parquet", {"text": ["a", None], "label": [0, 1]})
    with pytest.raises(DataError, match=r"bad.parquet, row 2: field 'text'"):
        read(TaskSpec(name="t", train=str(bad)))


def test_a_damaged_parquet_file_or_no_pyarrow_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    damaged = tmp_path / "train.parquet"
    damaged.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"train.parquet: not a readable Parquet file"):
        read_rows(str(damaged))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"pip install 'loramix\[parquet\]'"):
        read_rows(str(damaged))
