"""Task specifications: where one task's data lives and how to read it.

A :class:`TaskSpec` is a flat, validated record (like :class:`~loramix.config.AdapterConfig`). A bad field fails
with the field's name and what is allowed (a :class:`~loramix.errors.ConfigError`); problems inside the data
files themselves are found later, when they are read, and raise :class:`~loramix.errors.DataError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loramix.config import format_validation_error, read_yaml
from loramix.errors import ConfigError, DataError, did_you_mean

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SPLITS = ("train", "validation", "test")


class HFSource(BaseModel):
    """A split of a Hugging Face dataset, read with the optional ``datasets`` package only when used.

    Example:
        >>> HFSource(hf_dataset="glue", config="sst2", split="validation")
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hf_dataset: str = Field(
        ..., min_length=1, description="Dataset name or local path for datasets.load_dataset."
    )
    config: str | None = Field(None, description="The dataset's configuration name (e.g. 'sst2' for 'glue').")
    split: str | None = Field(None, description="Split to read; default: the spec field it sits in.")


Source = str | HFSource


class TaskSpec(BaseModel):
    """One task: its data sources, which fields hold the text and the label, and its label names.

    Sources are a path (``.jsonl`` / ``.json`` with one JSON object per line, ``.csv``, ``.tsv`` with a header
    row, ``.parquet`` with the optional ``pyarrow``; chosen by suffix) or an :class:`HFSource` (a dict ``{"hf_dataset": ..., "config": ..., "split": ...}``).

    Example:
        >>> spec = TaskSpec(name="mrpc", train="mrpc/train.jsonl", test="mrpc/test.jsonl",
        ...                 text_field="text_a", text_pair_field="text_b", labels=["no", "yes"])
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        ..., min_length=1, description="Unique task name; task ids follow the order of the specs."
    )
    train: Source = Field(..., description="The training split (required).")
    validation: Source | None = Field(None, description="The validation split, if any.")
    test: Source | None = Field(None, description="The test split, if any.")
    text_field: str = Field("text", min_length=1, description="Field holding the (first) input text.")
    text_pair_field: str | None = Field(
        None, min_length=1, description="Field holding the second text of a pair task (encoded jointly)."
    )
    label_field: str = Field("label", min_length=1, description="Field holding the label.")
    labels: list[str] | None = Field(
        None,
        description="Label names; an integer label indexes this list, a string label must be one of them. "
        "Default: read from the train split (integers 0..K-1 give names '0'..'K-1'; strings give their sorted set).",
    )
    label_prompts: list[str] | None = Field(
        None,
        description="One text per label, in label order, that a label-prompt head encodes as the class; default: "
        "each label name through the run's label_template.",
    )
    task_type: Literal["classification", "regression", "generation"] = Field(
        "classification",
        description="'regression': one float output per example; labels are numbers. 'generation': a prompt and "
        "its response (or a chat in `messages_field`), trained on a causal LM with the loss on the response.",
    )
    prompt_field: str = Field("prompt", min_length=1, description="generation: the field holding the prompt.")
    response_field: str = Field(
        "response", min_length=1, description="generation: the field holding the reference response."
    )
    messages_field: str = Field(
        "messages",
        min_length=1,
        description="generation: a row with this field is a chat, a list of {role, content} ending with the "
        "assistant's turn (the response), rendered with the tokenizer's chat template.",
    )
    scorer: Literal["exact", "number", "label"] = Field(
        "exact",
        description="generation: what makes a generated answer right: 'exact' (equal after normalising case, "
        "punctuation and spaces), 'number' (the first number in it equals the reference's), 'label' (the first "
        "of `labels` it names is the reference's).",
    )
    max_train_examples: int | None = Field(
        None,
        ge=1,
        description="Keep at most this many training examples (a seeded, order-keeping subsample).",
    )
    seed: int = Field(0, description="Seed of the max_train_examples subsample.")

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("train", "validation", "test")
    @classmethod
    def _known_suffix(cls, value: Source | None) -> Source | None:
        if isinstance(value, str) and Path(value).suffix.lower() not in FILE_SUFFIXES:
            raise ValueError(f"file must end in one of {', '.join(FILE_SUFFIXES)} (or be an hf_dataset dict)")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _integer_names(cls, value: Any) -> Any:
        """`labels: [0, 1, 2]` names classes as integer labels do by default ('0', '1', '2'); YAML reads a bare
        yes/no/on/off as a boolean, which is no label name."""
        if isinstance(value, list) and any(isinstance(v, bool) for v in value):
            raise ValueError(
                f"{value} holds true/false: YAML reads yes, no, on and off as booleans; quote them ('yes', 'no')"
            )
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if len(value) < 2:
            raise ValueError("a classification task needs at least two label names")
        if any(not name for name in value):
            raise ValueError("label names must be non-empty strings")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"label names repeat: {repeated}")
        return value

    @field_validator("label_prompts")
    @classmethod
    def _prompts_non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not text.strip() for text in value)):
            raise ValueError("label_prompts must be a list of non-empty strings, one per label")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.task_type == "generation":
            return self._generation_consistent()
        if self.task_type == "regression" and self.labels is not None:
            raise ValueError("a regression task has no label names; remove `labels`")
        if self.task_type == "regression" and self.label_prompts is not None:
            raise ValueError(
                f"task {self.name!r}: a regression task has no classes to describe; remove `label_prompts`"
            )
        if (
            self.label_prompts is not None
            and self.labels is not None
            and len(self.label_prompts) != len(self.labels)
        ):
            raise ValueError(
                f"task {self.name!r}: label_prompts has {len(self.label_prompts)} texts but labels has "
                f"{len(self.labels)}; give one text per label, in label order"
            )
        fields = [self.text_field, self.text_pair_field, self.label_field]
        named = [f for f in fields if f is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"text_field, text_pair_field and label_field must differ (got {named})")
        return self

    def _generation_consistent(self) -> TaskSpec:
        defaults = type(self).model_fields
        unread = [key for key in ("text_field", "label_field") if getattr(self, key) != defaults[key].default]
        if self.text_pair_field is not None or self.label_prompts is not None or unread:
            given = ", ".join(unread + [k for k in ("text_pair_field", "label_prompts") if getattr(self, k)])
            raise ValueError(
                f"task {self.name!r}: a generation task reads prompt_field and response_field (or "
                f"messages_field); remove {given}"
            )
        if self.scorer == "label" and self.labels is None:
            raise ValueError(
                f"task {self.name!r}: scorer 'label' needs `labels`, the label words to look for"
            )
        if self.scorer != "label" and self.labels is not None:
            raise ValueError(f"task {self.name!r}: `labels` of a generation task are for scorer 'label' only")
        if self.prompt_field == self.response_field:
            raise ValueError(f"prompt_field and response_field must differ (both {self.prompt_field!r})")
        return self

    @property
    def is_generation(self) -> bool:
        return self.task_type == "generation"

    @property
    def is_pair(self) -> bool:
        return self.text_pair_field is not None

    def input_fields(self) -> dict[str, str | None]:
        """The fields a row holds its inputs in (recorded with a run's adapters, for `loramix predict`)."""
        keys = ("text_field", "text_pair_field", "prompt_field", "messages_field")
        return {key: getattr(self, key) for key in keys}

    def source(self, split: str) -> Source | None:
        """The source of ``split`` ('train', 'validation' or 'test'), or None when the task has none."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return getattr(self, split)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "task spec") -> TaskSpec:
        """Validate a plain dict (from JSON or YAML); errors name each bad field and what is allowed."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where, cls.model_fields)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_task_specs(tasks: str | os.PathLike[str] | Sequence[Mapping[str, Any]]) -> list[TaskSpec]:
    """Task specs from a JSON/YAML file (a list of task dicts, or ``{"tasks": [...]}``) or from a list of dicts.

    Relative file paths in a spec file are resolved against the file's folder, so a spec file can sit beside
    its data.

    Example:
        >>> specs = load_task_specs([{"name": "sst2", "train": "sst2/train.jsonl", "labels": ["neg", "pos"]}])
    """
    base: Path | None = None
    if isinstance(tasks, str | os.PathLike):
        path = Path(tasks)
        if not path.is_file():
            raise ConfigError(f"task spec file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            loaded = json.loads(text) if path.suffix.lower() == ".json" else read_yaml(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read task spec file {path}: {exc}") from None
        items = loaded.get("tasks") if isinstance(loaded, dict) else loaded
        base, where = path.parent, str(path)
    else:
        items, where = tasks, "task specs"
    if not isinstance(items, list) or not items or not all(isinstance(item, Mapping) for item in items):
        raise ConfigError(f"{where}: expected a non-empty list of task dicts (or {{'tasks': [...]}})")
    specs = []
    for index, item in enumerate(items):
        item = dict(item)
        if base is not None:
            for split in SPLITS:
                if isinstance(item.get(split), str) and not Path(item[split]).is_absolute():
                    item[split] = str(base / item[split])
        name = item.get("name", "?")
        specs.append(TaskSpec.from_dict(item, where=f"{where}, task {index + 1} of {len(items)} ({name})"))
    return specs


def tasks_from_directory(
    root: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    *,
    max_train_examples: int | None = None,
    seed: int = 0,
) -> list[TaskSpec]:
    """Task specs for a folder laid out like ``shared/data``: ``<task>/train.jsonl``, optional
    ``validation.jsonl`` and ``test.jsonl``, and ``<task>/meta.json`` with ``"labels"`` (and ``"input": "pair"``
    for pair tasks, whose rows hold ``text_a`` and ``text_b``; and optionally ``"label_prompts"``, one text per
    label). A generation task's ``meta.json`` holds ``"task_type": "generation"`` and optionally its
    ``prompt_field``, ``response_field``, ``messages_field``, ``scorer`` and ``labels``.

    Tasks come in the order of ``names``, or of ``tasks.json`` when present, else sorted by folder name.

    Example:
        >>> specs = tasks_from_directory("shared/data", ["sst2", "mrpc"], max_train_examples=1000)
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"task directory {root} does not exist")
    available = _task_names(root)
    chosen = list(available if names is None else names)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        hint = did_you_mean(unknown[0], available) if len(unknown) == 1 else ""
        raise DataError(
            f"{root}: unknown tasks {unknown}; available: {', '.join(available) or '(none)'}{hint}"
        )
    return [_spec_from_folder(root / name, max_train_examples, seed) for name in chosen]


def _task_names(root: Path) -> list[str]:
    index = root / "tasks.json"
    if index.is_file():
        loaded = _read_json(index)
        if not isinstance(loaded, dict):
            raise DataError(f"{index}: expected a JSON object mapping task names to their info")
        return [name for name in loaded if (root / name / "meta.json").is_file()]
    return sorted(p.parent.name for p in root.glob("*/meta.json"))


def _spec_from_folder(folder: Path, max_train_examples: int | None, seed: int) -> TaskSpec:
    meta_path = folder / "meta.json"
    meta = _read_json(meta_path)
    generation = isinstance(meta, dict) and meta.get("task_type") == "generation"
    if not isinstance(meta, dict) or not (generation or isinstance(meta.get("labels"), list)):
        raise DataError(
            f'{meta_path}: expected a JSON object with a \'labels\' list (or "task_type": "generation")'
        )
    if not (folder / "train.jsonl").is_file():
        raise DataError(f"{folder}: no train.jsonl")
    fields: dict[str, Any] = {"name": folder.name, "max_train_examples": max_train_examples, "seed": seed}
    if generation:
        keys = ("task_type", "prompt_field", "response_field", "messages_field", "scorer", "labels")
        fields.update({key: meta[key] for key in keys if key in meta})
    else:
        pair = meta.get("input") == "pair"
        fields["labels"] = meta["labels"]
        fields["text_field"] = "text_a" if pair else "text"
        fields["text_pair_field"] = "text_b" if pair else None
        if meta.get("label_prompts") is not None:
            fields["label_prompts"] = meta["label_prompts"]
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if path.is_file():
            fields[split] = str(path)
    return TaskSpec.from_dict(fields, where=str(meta_path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read JSON: {exc}") from None
