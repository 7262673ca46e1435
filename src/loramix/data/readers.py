"""Read one source (a JSONL/CSV/TSV file or a Hugging Face split) into :class:`Example` records.

Reading happens in two steps so that label names can be inferred from the train split before any split is
converted: :func:`read_rows` gives raw rows, each with its location ("file, line n"); :func:`to_examples` checks
fields and labels against a :class:`~loramix.data.spec.TaskSpec`. Every problem raises a
:class:`~loramix.errors.DataError` that names the file and the 1-based line (the header of a CSV is line 1).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramix.data.spec import HFSource, Source, TaskSpec
from loramix.errors import ConfigError, DataError, did_you_mean

_INTEGER = re.compile(r"[+-]?\d+")
# Classes inferred from integer labels run 0..max: a stray id like 10**12 must be an error, not a task that size.
MAX_INFERRED_LABELS = 100_000
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Example:
    """One input of one task. ``label`` is a class index (classification) or a number (regression)."""

    text: str
    text_pair: str | None
    label: int | float
    task: int = 0


@dataclass(frozen=True, slots=True)
class Row:
    """One raw record. ``all_strings``: it came from CSV/TSV, so numbers arrive as text."""

    location: str
    fields: Mapping[str, Any]
    all_strings: bool = False


@dataclass(frozen=True)
class RawSplit:
    """The rows of one source. ``class_names``: label names a source declares itself (an HF ClassLabel)."""

    name: str
    rows: list[Row]
    class_names: dict[str, list[str]] = field(default_factory=dict)


def read_rows(source: Source, *, split: str = "train") -> RawSplit:
    """Raw rows of a file (by suffix) or of a Hugging Face split (``split`` is used when the source names none).

    Example:
        >>> raw = read_rows("sst2/train.jsonl")
    """
    if isinstance(source, HFSource):
        raw = _read_hf(source, split)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: file not found ({split} split)")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            raw = RawSplit(str(path), _json_lines(path, _decode(path)))
        elif suffix in (".csv", ".tsv"):
            raw = RawSplit(str(path), _table(path, _decode(path), "\t" if suffix == ".tsv" else ","))
        elif suffix == ".parquet":
            raw = _parquet(path)
        else:
            raise DataError(
                f"{path}: unknown file type {suffix!r}; use .jsonl, .json (lines), .csv, .tsv or .parquet"
            )
    if not raw.rows:
        raise DataError(f"{raw.name}: no examples (the {split} split is empty)")
    return raw


def infer_label_names(raw: RawSplit, spec: TaskSpec) -> list[str]:
    """The task's label names: ``spec.labels`` when given, else the source's own names, else read from the rows
    (integers 0..K-1 give '0'..'K-1'; strings give their sorted set).

    Example:
        >>> names = infer_label_names(read_rows(spec.train), spec)
    """
    if spec.labels is not None:
        return list(spec.labels)
    if spec.label_field in raw.class_names:
        return list(raw.class_names[spec.label_field])
    first: tuple[Row, type] | None = None
    integers: list[int] = []
    strings: set[str] = set()
    for row in raw.rows:
        value = field_value(row, spec.label_field, "label_field")
        if row.all_strings and isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise DataError(
                f"{row.location}: label must be an integer index or a label name, got {shown(value)}"
            )
        kind = int if isinstance(value, int) else str
        if first is None:
            first = (row, kind)
        elif kind is not first[1]:
            raise DataError(
                f"{row.location}: label {value!r} is a {kind.__name__} but the label at {first[0].location} is a "
                f"{first[1].__name__}; use one kind, or declare `labels` in the task spec"
            )
        if isinstance(value, int):
            if value < 0:
                raise DataError(f"{row.location}: label {value} is negative; class indices start at 0")
            if value >= MAX_INFERRED_LABELS:
                raise DataError(
                    f"{row.location}: label {value} would make a task of {value + 1} classes (class indices run "
                    f"0..K-1 when `labels` is not declared; at most {MAX_INFERRED_LABELS} are inferred); fix the "
                    "label, or declare the label names with `labels` in the task spec"
                )
            integers.append(value)
        else:
            strings.add(value)
    names = [str(i) for i in range(max(integers) + 1)] if integers else sorted(strings)
    if len(names) < 2:
        raise DataError(
            f"{raw.name}: every example has label {names[0]!r}; a classification task needs at least two labels "
            "(declare them with `labels` in the task spec)"
        )
    return names


def to_examples(
    raw: RawSplit, spec: TaskSpec, *, label_names: Sequence[str] | None = None, task: int = 0
) -> list[Example]:
    """Check every row against ``spec`` and convert it. Classification needs ``label_names`` (see
    :func:`infer_label_names`); a string label must be one of them, an integer label must lie in 0..K-1.

    Example:
        >>> examples = to_examples(raw, spec, label_names=infer_label_names(raw, spec), task=0)
    """
    if spec.task_type == "classification" and not label_names:
        raise DataError(f"{raw.name}: a classification task needs label names (see infer_label_names)")
    index_of = {name: i for i, name in enumerate(label_names or ())}
    by_index = spec.label_field in raw.class_names  # a source with class names (HF ClassLabel) stores indices
    examples = []
    for row in raw.rows:
        text = text_value(row, spec.text_field, "text_field")
        pair = (
            None if spec.text_pair_field is None else text_value(row, spec.text_pair_field, "text_pair_field")
        )
        value = field_value(row, spec.label_field, "label_field")
        if spec.task_type == "regression":
            label: int | float = _regression_label(row, value)
        else:
            label = _class_index(row, value, index_of, by_index=by_index)
        examples.append(Example(text, pair, label, task))
    return examples


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:  # permissions, a folder named like a file, an I/O error
        raise DataError(
            f"{path}: cannot read the file ({exc.strerror or exc}); check that it is a readable file"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
            "re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _json_lines(path: Path, text: str) -> list[Row]:
    rows = []
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may contain.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise DataError(f"{path}, line {number}: JSON nested too deeply to read") from None
        except json.JSONDecodeError as exc:
            hint = (
                " (a JSON array? loramix reads one JSON object per line)" if line.lstrip()[:1] == "[" else ""
            )
            raise DataError(
                f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}){hint}"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected one JSON object per line, got {shown(record)}")
        rows.append(Row(f"{path}, line {number}", record))
    return rows


def _table(path: Path, text: str, delimiter: str) -> list[Row]:
    # TSV files in the wild (GLUE) carry bare quotes inside fields, so quoting is off for them.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows, start = [], 1  # the line a record starts on (a quoted field may span lines)
    try:
        header = next(reader, None)
        if header is None:
            return rows
        empty = [i + 1 for i, name in enumerate(header) if not name.strip()]
        repeated = sorted({name for name in header if header.count(name) > 1})
        if empty or repeated:
            problem = (
                f"empty column names at positions {empty}" if empty else f"repeated column names {repeated}"
            )
            raise DataError(f"{path}, line 1: the header row has {problem}")
        while True:
            start = reader.line_num + 1
            cells = next(reader, None)
            if cells is None:
                break
            if not cells or cells == [""]:
                continue
            if len(cells) != len(header):
                raise DataError(
                    f"{path}, line {start}: {len(cells)} fields but the header has {len(header)} "
                    f"({', '.join(header)})"
                )
            rows.append(Row(f"{path}, line {start}", dict(zip(header, cells)), all_strings=True))
    except csv.Error as exc:
        raise DataError(f"{path}, line {start}: malformed {path.suffix[1:].upper()} ({exc})") from None
    return rows


def _parquet(path: Path) -> RawSplit:
    """A Parquet file's rows (`row N` counts from 1), with the class names a Hugging Face dataset saved in its
    schema (a `ClassLabel` column's names), as a hub split gives them."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{path}: reading Parquet files needs the `pyarrow` package: pip install 'loramix[parquet]' (or write "
            "the data as .jsonl or .csv)"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several kinds for a damaged or foreign file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    rows = [Row(f"{path}, row {i}", record) for i, record in enumerate(table.to_pylist(), start=1)]
    return RawSplit(str(path), rows, _hf_class_names(table.schema.metadata or {}))


def _hf_class_names(metadata: dict[bytes, bytes]) -> dict[str, list[str]]:
    """`{column: class names}` of the `ClassLabel` features a Hugging Face dataset records in a Parquet schema's
    `huggingface` metadata; empty when there is none, or it is not what that library writes."""
    try:
        features = json.loads(metadata.get(b"huggingface", b"{}"))["info"]["features"]
    except (KeyError, TypeError, ValueError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {
        name: [str(n) for n in feature["names"]]
        for name, feature in features.items()
        if isinstance(feature, dict)
        and feature.get("_type") == "ClassLabel"
        and isinstance(feature.get("names"), list)
    }


def _read_hf(source: HFSource, split: str) -> RawSplit:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"reading the Hugging Face dataset {source.hf_dataset!r} needs the `datasets` package: "
            "pip install 'loramix[hub]' (or use a local .jsonl/.csv file)"
        ) from None
    split = source.split or split
    name = f"{source.hf_dataset}" + (f"/{source.config}" if source.config else "") + f" [{split}]"
    try:
        dataset = datasets.load_dataset(source.hf_dataset, source.config, split=split)
    except Exception as exc:  # the library raises many kinds; say which dataset failed and why
        raise DataError(f"{name}: cannot load the Hugging Face dataset: {exc}") from exc
    class_names = {
        key: list(feature.names)
        for key, feature in getattr(dataset, "features", {}).items()
        if isinstance(getattr(feature, "names", None), list)
    }
    rows = [Row(f"{name}, row {i}", dict(record)) for i, record in enumerate(dataset)]
    return RawSplit(name, rows, class_names)


def field_value(row: Row, key: str, spec_field: str) -> Any:
    """The row's `key`; a missing one is an error naming the file, the line and the spec field to set."""
    value = row.fields.get(key, _MISSING)
    if value is _MISSING:
        present = ", ".join(map(str, row.fields)) or "none"
        hint = ""
        if spec_field in ("text_field", "label_field") and {"prompt", "response", "messages"} & set(
            row.fields
        ):
            hint = " (or, for prompts and responses, `task_type: generation`)"
        raise DataError(
            f"{row.location}: missing field {key!r} (the row has: {present}); set {spec_field} in the task spec"
            + hint
        )
    return value


def text_value(row: Row, key: str, spec_field: str) -> str:
    """`field_value`, which must be a string."""
    value = field_value(row, key, spec_field)
    if not isinstance(value, str):
        raise DataError(f"{row.location}: field {key!r} must be a string, got {shown(value)}")
    return value


def integer_names(names: Iterable[str]) -> bool:
    """Whether some label names are given and every one is an integer ('1', '2', '-1')."""
    names = list(names)
    return bool(names) and all(_INTEGER.fullmatch(name.strip()) for name in names)


def _class_index(row: Row, value: Any, index_of: Mapping[str, int], *, by_index: bool = False) -> int:
    """A label's class index. A label is its name wherever it is one, whatever the file stores it as (`1` in a
    JSON line and "1" in a CSV cell both name the label "1"); an integer that names no label is an index, unless
    the labels' names are all integers (then it is an unknown label). `by_index`: the source stores class indices
    beside its own class names (a Hugging Face `ClassLabel`, whose names may be "1" and "2"): integers are
    indices."""
    count = len(index_of)
    known = ", ".join(list(index_of)[:20]) + (", ..." if count > 20 else "")
    if isinstance(value, str) and value in index_of:
        return index_of[value]
    if isinstance(value, str) and row.all_strings and _INTEGER.fullmatch(value.strip()):
        value = int(value)  # a cell of a table
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        raise DataError(
            f"{row.location}: unknown label {value!r}; the task's labels are: {known}{did_you_mean(value, index_of)}"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{row.location}: label must be an integer index or a label name, got {shown(value)}")
    if not by_index and str(value) in index_of:
        return index_of[str(value)]
    if not by_index and integer_names(index_of):
        raise DataError(
            f"{row.location}: unknown label {value}; the task's labels are: {known} (its label names are integers, "
            "so integers in the data are read as names, not as indices)"
        )
    if not 0 <= value < count:
        raise DataError(
            f"{row.location}: label {value} is outside 0..{count - 1} (the task has {count} labels); "
            "declare all label names with `labels` in the task spec"
        )
    return value


def _regression_label(row: Row, value: Any) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and row.all_strings:
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise DataError(f"{row.location}: a regression label must be a finite number, got {shown(value)}")
    return number


def shown(value: Any) -> str:
    """A value as an error message shows it: its type and a repr cut at 60 characters."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
