"""Random bytes as data files: reading them either succeeds or raises a loramix error that names the file, never
another exception (a crash in a reader would surface as a traceback from `loramix train`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramix.data import MultiTaskData, TaskSpec, infer_label_names, read_rows, to_examples
from loramix.data.spec import tasks_from_directory
from loramix.errors import LoramixError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
FIELDS = st.sampled_from(["text", "label", "text_b", "x"])
# Bytes that look like data often enough to get past the first line: JSON rows of random values, tables built
# from the characters that matter to CSV/TSV, and raw noise.
JSON_ROWS = st.lists(st.dictionaries(FIELDS, JSON_VALUES, max_size=4), max_size=5).map(
    lambda rows: "\n".join(json.dumps(row) for row in rows).encode()
)
TABLES = st.text(alphabet='text,label\t"\n\r 01-2.5x\x00\ufeffé', max_size=60).map(str.encode)
RAW = st.binary(max_size=80)
# integer labels from far below 0 to far above any class count (a label id is a class index when none are declared)
LABEL_IDS = st.lists(st.integers(min_value=-3, max_value=10**15), min_size=1, max_size=4).map(
    lambda labels: "".join(json.dumps({"text": "t", "label": label}) + "\n" for label in labels).encode()
)
CONTENT = st.one_of(
    JSON_ROWS, TABLES, RAW, LABEL_IDS, st.tuples(JSON_ROWS, RAW).map(lambda p: p[0] + b"\n" + p[1])
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def assert_names_the_file(exc: BaseException, path: Path) -> None:
    assert isinstance(exc, LoramixError), f"{type(exc).__name__}: {exc}"
    assert str(path) in str(exc), str(exc)


@FUZZ
@given(
    content=CONTENT,
    suffix=st.sampled_from([".jsonl", ".csv", ".tsv"]),
    kind=st.sampled_from(["inferred", "declared", "regression", "pair"]),
)
def test_random_bytes_in_a_data_file_give_a_loramix_error_naming_it(
    folder: Path, content: bytes, suffix: str, kind: str
):
    path = folder / f"train{suffix}"
    path.write_bytes(content)
    fields = {
        "inferred": {},
        "declared": {"labels": ["0", "1"]},
        "regression": {"task_type": "regression"},
        "pair": {"text_pair_field": "text_b", "labels": ["no", "yes"]},
    }[kind]
    spec = TaskSpec(name="t", train=str(path), **fields)
    try:
        raw = read_rows(spec.train)
        names = infer_label_names(raw, spec) if spec.task_type == "classification" else None
        to_examples(raw, spec, label_names=names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MultiTaskData([spec])
    except Exception as exc:  # the point: which exceptions come out
        assert_names_the_file(exc, path)


@FUZZ
@given(meta=JSON_VALUES, index=st.one_of(st.none(), JSON_VALUES))
def test_random_json_in_a_task_folder_gives_a_loramix_error_naming_the_file(folder: Path, meta, index):
    root = folder / "tasks"
    (root / "t").mkdir(parents=True, exist_ok=True)
    (root / "t" / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    (root / "t" / "meta.json").write_text(json.dumps(meta))
    tasks_json = root / "tasks.json"
    if index is None:
        tasks_json.unlink(missing_ok=True)
    else:
        tasks_json.write_text(json.dumps(index))
    try:
        tasks_from_directory(root)
    except Exception as exc:
        assert isinstance(exc, LoramixError), f"{type(exc).__name__}: {exc}"
        assert str(root) in str(exc), str(exc)
