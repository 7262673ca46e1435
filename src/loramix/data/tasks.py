"""Many tasks loaded together: task ids 0..T-1 in spec order, label names per task, and each split's examples
concatenated in task order (so one index space serves a sampler and a DataLoader)."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from loramix.data.generation import to_generation_examples
from loramix.data.readers import Example, RawSplit, infer_label_names, read_rows, to_examples
from loramix.data.spec import SPLITS, TaskSpec
from loramix.errors import ConfigError, DataError, DataWarning, did_you_mean

MAX_LABELS_SHOWN = 20  # in a warning about labels without examples


@dataclass(frozen=True)
class TaskInfo:
    """What a head and a sampler need to know about one task. Regression: no label names, ``num_labels`` 1.
    Generation: ``label_names`` are the label words of a 'label' scorer (or none), ``num_labels`` 0."""

    task_id: int
    name: str
    task_type: str
    label_names: tuple[str, ...]
    sizes: dict[str, int]

    @property
    def num_labels(self) -> int:
        if self.task_type == "generation":
            return 0
        return 1 if self.task_type == "regression" else len(self.label_names)


class MultiTaskData:
    """Reads every split of every task once; task ``t`` is ``specs[t]``.

    Label names come from the spec, else from the train split, and the same names check the validation and test
    splits. ``max_train_examples`` subsamples the train split only, after the whole file was checked.

    Example:
        >>> data = MultiTaskData(tasks_from_directory("shared/data", ["sst2", "mrpc"]))
        >>> train = data.split("train")                    # list[Example], a map-style dataset
        >>> data.num_labels, data.sizes("train")           # ([2, 2], [6920, 4076])
    """

    def __init__(self, specs: Sequence[TaskSpec], *, splits: Sequence[str] = SPLITS) -> None:
        if not specs:
            raise ConfigError("MultiTaskData needs at least one TaskSpec")
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or "train" not in splits:
            raise ConfigError(
                f"splits must include 'train' and be among {', '.join(SPLITS)} (got {list(splits)})"
            )
        first_index: dict[str, int] = {}
        for index, spec in enumerate(specs):
            if spec.name in first_index:
                raise ConfigError(
                    f"tasks: task {first_index[spec.name] + 1} and task {index + 1} are both named {spec.name!r}; "
                    "task names must be unique"
                )
            first_index[spec.name] = index
        self.specs = list(specs)
        self.tasks: list[TaskInfo] = []
        self._examples: dict[str, list[list[Example]]] = {split: [] for split in splits}
        for task_id, spec in enumerate(self.specs):
            self._load(task_id, spec, splits)
        self._joined: dict[str, list[Example]] = {}

    def _load(self, task_id: int, spec: TaskSpec, splits: Sequence[str]) -> None:
        train = read_rows(spec.train, split="train")
        names = infer_label_names(train, spec) if spec.task_type == "classification" else None
        sizes = {}
        for split in splits:
            source = spec.source(split)
            raw = train if split == "train" else None if source is None else read_rows(source, split=split)
            if raw is None:
                examples = []
            elif spec.is_generation:
                examples = to_generation_examples(raw, spec, task=task_id)
            else:
                examples = to_examples(raw, spec, label_names=names, task=task_id)
            if split == "train":
                if names:
                    _warn_of_unseen_labels(train, spec, names, examples)
                examples = _subsample(examples, spec.max_train_examples, spec.seed)
            self._examples[split].append(examples)
            sizes[split] = len(examples)
        if spec.is_generation:
            names = spec.labels
        self.tasks.append(TaskInfo(task_id, spec.name, spec.task_type, tuple(names or ()), sizes))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def label_names(self) -> list[list[str]]:
        return [list(task.label_names) for task in self.tasks]

    @property
    def num_labels(self) -> list[int]:
        return [task.num_labels for task in self.tasks]

    def task_id(self, name: str) -> int:
        for task in self.tasks:
            if task.name == name:
                return task.task_id
        raise DataError(
            f"unknown task {name!r}; tasks: {', '.join(self.task_names)}{did_you_mean(name, self.task_names)}"
        )

    def has_split(self, split: str) -> bool:
        """Whether any task has examples in ``split``."""
        return any(self._per_task(split))

    def missing(self, split: str) -> list[str]:
        """The names of the tasks with no example in ``split``."""
        return [task.name for task, size in zip(self.tasks, self.sizes(split)) if not size]

    def scored_tasks(self, split: str) -> list[TaskInfo]:
        """The tasks an evaluation on ``split`` scores: those with examples in it. A warning names the others (a
        task may come with a train split alone); a `DataError` when no task has any."""
        missing = self.missing(split)
        if len(missing) == self.num_tasks:
            raise DataError(
                f"no task has a {split!r} split to evaluate on (tasks: {', '.join(self.task_names)})"
            )
        if missing:
            warnings.warn(
                f"task(s) {', '.join(missing)} have no {split!r} split: left out of the scores",
                DataWarning,
                stacklevel=2,
            )
        return [task for task in self.tasks if task.name not in missing]

    def sizes(self, split: str) -> list[int]:
        """Number of examples of each task in ``split`` (0 where a task has none)."""
        return [len(examples) for examples in self._per_task(split)]

    def examples(self, split: str, task: int | str) -> list[Example]:
        """One task's examples in ``split`` (task by id or name)."""
        task_id = self.task_id(task) if isinstance(task, str) else task
        if not 0 <= task_id < self.num_tasks:
            raise DataError(f"task id {task_id} is outside 0..{self.num_tasks - 1}")
        return self._per_task(split)[task_id]

    def eval_examples(self, split: str, task: int | str, limit: int | None = None) -> list[Example]:
        """At most `limit` of one task's examples in `split`, the same for every run and method: a sample drawn
        with a fixed seed, kept in file order (files sorted by label would make "the first N" one-sided)."""
        examples = self.examples(split, task)
        if limit is None or len(examples) <= limit:
            return examples
        chosen = sorted(random.Random(0).sample(range(len(examples)), limit))
        return [examples[i] for i in chosen]

    def split(self, split: str) -> list[Example]:
        """All tasks' examples in ``split``, task 0's first; index it with a sampler's global indices."""
        if split not in self._joined:
            self._joined[split] = [example for examples in self._per_task(split) for example in examples]
        return self._joined[split]

    def task_ids(self, split: str) -> list[int]:
        """The task id of each example of :meth:`split`, in the same order (what a sampler takes)."""
        return [task_id for task_id, size in enumerate(self.sizes(split)) for _ in range(size)]

    def _per_task(self, split: str) -> list[list[Example]]:
        if split not in self._examples:
            raise DataError(f"split {split!r} was not loaded; loaded: {', '.join(self._examples)}")
        return self._examples[split]


def _warn_of_unseen_labels(
    raw: RawSplit, spec: TaskSpec, names: Sequence[str], examples: list[Example]
) -> None:
    """A :class:`DataWarning` when a class of the task has no train example: its head row never learns. Without
    declared labels this is a stray integer label (7 in a two-class file makes classes 2..6 empty); with them, a
    train file that holds only some of the labels (all one label, say). Loading goes on: a rare class may be
    missing on purpose."""
    seen = {example.label for example in examples}
    unseen = [i for i in range(len(names)) if i not in seen]
    if not unseen:
        return
    declared = spec.labels is not None or spec.label_field in raw.class_names
    shown = [repr(names[i]) if declared else str(i) for i in unseen[:MAX_LABELS_SHOWN]]
    listing = ", ".join(shown) + (f", ... ({len(unseen)} in all)" if len(unseen) > MAX_LABELS_SHOWN else "")
    if declared:
        message = (
            f"{raw.name}: task {spec.name!r} declares {len(names)} labels but its train split has no example of "
            f"{listing}; the model cannot learn to predict them"
        )
    else:
        message = (
            f"{raw.name}: integer labels up to {len(names) - 1} make task {spec.name!r} a {len(names)}-class task, "
            f"but classes {listing} never occur in its train split; fix the stray labels if the task has fewer "
            "classes, else declare the label names with `labels` in the task spec"
        )
    warnings.warn(message, DataWarning, stacklevel=4)


def _subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded subsample of at most ``limit`` examples that keeps file order."""
    if limit is None or len(examples) <= limit:
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]
