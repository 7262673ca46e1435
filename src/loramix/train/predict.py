"""A finished run's answers to new inputs (`loramix predict`).

Each row of a JSONL, CSV or TSV file names its task in a `task` field (or one task is given for every row) and holds
that task's input fields, as its training files did (`text`, or `text_a` and `text_b`, or a generation task's
`prompt` or `messages`; a label, if present, is not read). A run whose method chooses each input's task itself (a
continual run's auto-selector) also answers rows without a task: they hold the input fields of any of its tasks.
The rows are answered in batches that may mix tasks, each routed as the run's method routes at inference
(:meth:`loramix.methods.base.Method.predictor`), and written one JSON line per row, in the file's order: the row's
line, its task and the answer (a class name, a number, or generated text), with what the method adds (the
continual methods: where the auto-selector sent the input).
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramix.data.generation import GenerationExample, chat_turns
from loramix.data.readers import Example, Row, read_rows, text_value
from loramix.errors import CheckpointError, ConfigError, DataError, did_you_mean
from loramix.io.files import atomic_write_bytes
from loramix.models import position_limit
from loramix.train.generation_eval import RoutedAnswers, fit_positions
from loramix.train.model import MultiTaskModel, route_of
from loramix.train.run import task_specs
from loramix.train.shards import EvalBatches
from loramix.train.step import routed

TASK_FIELD = "task"
UNKNOWN_TASK = -1  # the task id of a row that names no task: the method chooses it (its answer says which)
DEFAULT_NEW_TOKENS = 64  # a generation task's answer, unless the run sets max_new_tokens


@dataclass(frozen=True)
class Request:
    """One input row: where it came from, its task's name and the example the collator takes."""

    location: str
    task: str | None  # None: the row names none, and the method chooses it
    example: Example | GenerationExample


def with_input_fields(run: Any, tasks: list[dict]) -> list[dict]:
    """The tasks' metadata, with the input fields of a run saved before they were recorded taken from its config's
    task specs (where they can be read)."""
    if all("input_fields" in meta for meta in tasks):
        return tasks
    try:
        specs = {spec.name: spec for spec in task_specs(run)}
    except (DataError, OSError):
        specs = {}
    return [
        meta
        if "input_fields" in meta or meta["name"] not in specs
        else {**meta, "input_fields": specs[meta["name"]].input_fields()}
        for meta in tasks
    ]


def read_requests(
    path: str | Path, tasks: list[dict], task: str | None = None, *, any_task: bool = False
) -> list[Request]:
    """Every row of `path` as a request of its task (`task`, else the row's `task` field), with file-and-line
    errors: a missing or unknown task, a missing or non-string input field. With `any_task` (a method that chooses
    each input's task) a row may name no task, and holds the input fields of one of `tasks`."""
    check_task(task, tasks, "--task")
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found (the rows to answer)")
    return requests_of(read_rows(str(path), split="input").rows, tasks, task, any_task=any_task)


def check_task(task: str | None, tasks: list[dict], option: str = "task") -> None:
    """Refuse a task given for every row (`option`, as the caller spells it) that is not one of the run's."""
    names = [meta["name"] for meta in tasks]
    if task is not None and task not in names:
        raise ConfigError(
            f"{option} {task!r} is not a task of this run; its tasks are: {', '.join(names)}"
            f"{did_you_mean(task, names)}"
        )


def requests_of(
    rows: Iterable[Row], tasks: list[dict], task: str | None = None, *, any_task: bool = False
) -> list[Request]:
    """Rows as requests of their tasks (`task`, else each row's `task` field), checked as :func:`read_requests`
    checks a file's, each error naming the row's location."""
    ids = {meta["name"]: i for i, meta in enumerate(tasks)}
    names = ", ".join(ids)
    requests = []
    for row in rows:
        name = task if task is not None else row.fields.get(TASK_FIELD)
        if name is None and any_task:
            requests.append(Request(row.location, None, _any_task_example(row, tasks)))
            continue
        if name is None:
            raise DataError(
                f"{row.location}: no {TASK_FIELD!r} field naming the row's task (or give --task for every row); "
                f"this run's tasks are: {names}"
            )
        if name not in ids:
            raise DataError(
                f"{row.location}: task {name!r} is not a task of this run; its tasks are: {names}"
                f"{did_you_mean(str(name), ids)}"
            )
        requests.append(Request(row.location, name, _example(row, tasks[ids[name]], ids[name])))
    return requests


def _any_task_example(row: Row, tasks: list[dict]) -> Example:
    """A row without a task, read with the input fields of the first of `tasks` whose fields it holds (sentence
    pairs first, so that a pair is never read as its first sentence alone)."""
    layouts = list(
        dict.fromkeys(
            (meta["input_fields"]["text_field"], meta["input_fields"]["text_pair_field"])
            for meta in tasks
            if meta["task_type"] != "generation" and meta.get("input_fields") is not None
        )
    )
    for text, pair in sorted(layouts, key=lambda layout: layout[1] is None):
        if text in row.fields and (pair is None or pair in row.fields):
            second = None if pair is None else text_value(row, pair, "text_pair_field")
            return Example(text_value(row, text, "text_field"), second, 0, UNKNOWN_TASK)
    expected = " or ".join(text if pair is None else f"{text} and {pair}" for text, pair in layouts)
    raise DataError(
        f"{row.location}: no {TASK_FIELD!r} field, and not the input fields of any task of this run ({expected}); "
        "name the row's task, or give the fields of one"
    )


def _example(row: Row, meta: dict, task: int) -> Example | GenerationExample:
    fields = meta.get("input_fields")
    if fields is None:
        raise CheckpointError(
            f"task {meta['name']!r}: the run recorded no input fields for it (saved by an earlier loramix), and "
            "its config's task specs cannot be read; give `loramix predict` a --config whose tasks can"
        )
    if meta["task_type"] == "generation":
        if fields["messages_field"] in row.fields and fields["prompt_field"] not in row.fields:
            turns = chat_turns(row, fields["messages_field"], answered=False)
            return GenerationExample("", "", task, row.location, tuple(turns))
        prompt = text_value(row, fields["prompt_field"], "prompt_field")
        if not prompt.strip():
            raise DataError(f"{row.location}: field {fields['prompt_field']!r} is empty; a prompt needs text")
        return GenerationExample(prompt, "", task, row.location)
    text = text_value(row, fields["text_field"], "text_field")
    pair = fields["text_pair_field"]
    return Example(text, None if pair is None else text_value(row, pair, "text_pair_field"), 0, task)


def check_options(
    tasks: list[dict],
    *,
    scores: bool,
    generation: bool,
    names: tuple[str, str] = ("scores", "max_new_tokens and sampling"),
) -> None:
    """Refuse answering options the run's tasks cannot take: `scores` (a class's probability) without a
    classification task, and generation options (`generation`: any given) for tasks that answer with a class or a
    number; `names` are the options as the caller spells them."""
    if scores and all(meta["task_type"] != "classification" for meta in tasks):
        raise ConfigError(
            f"{names[0]}: a score is a class's probability, and this run has no classification task"
        )
    classifiers = [meta["name"] for meta in tasks if meta["task_type"] != "generation"]
    if generation and classifiers:
        raise ConfigError(
            f"{names[1]} apply to generation tasks; this run's tasks {classifiers} answer with a class or a number"
        )


def answer_values(values: torch.Tensor, task_ids: Sequence[int], tasks: list[dict]) -> list[dict[str, Any]]:
    """A head's decisions `(n,)` for samples of tasks `task_ids` as answers: the class name (and its index), or the
    regression value."""
    answers: list[dict[str, Any]] = []
    for value, task in zip(values.tolist(), task_ids):
        meta = tasks[task]
        if meta["task_type"] == "regression":
            answers.append({"prediction": float(value)})
        else:
            answers.append({"prediction": meta["labels"][int(value)], "label_index": int(value)})
    return answers


def class_scores(logits: torch.Tensor) -> list[float]:
    """Each row's highest probability `(n,)`, the softmax of logits that are -inf outside the row's task: the
    probability of the class the head decides on, among its task's classes."""
    return logits.float().softmax(-1).amax(-1).tolist()


def batch_seed(seed: int, location: str) -> int:
    """The seed of a sampled batch: `seed` and the batch's first row (its file and line), mixed by CRC-32, so that
    a batch's answers are the same however many processes share the batches."""
    return zlib.crc32(f"{seed}:{location}".encode())


class RoutedPredictor:
    """Answers of a model routed by its own routers (task ids or learned routers), as `loramix eval` scores it:
    the head's decision for classification and regression, greedy generation for a causal LM's tasks (or sampled,
    with `sampling`: `{"do_sample": True, "temperature": ..., "top_p": ...}`, and `max_new_tokens` tokens at most).
    `values(batch) -> (decisions, extra columns)` replaces the head's routed decision (a continual method's
    selector and routes, ELREA's gradient routing); an extra column `task_ids` gives the task of each decision,
    which a row without one (UNKNOWN_TASK) takes as its `task`."""

    def __init__(
        self,
        model: MultiTaskModel,
        collator: Any,
        tasks: list[dict],
        *,
        max_new_tokens: int | None = None,
        values: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, list]]] | None = None,
        answers: Any = None,
    ) -> None:
        self.model, self.collator, self.tasks = model, collator, tasks
        model.eval()  # no dropout: the same answer for a row every time, as in evaluation
        self.max_new_tokens = max_new_tokens or DEFAULT_NEW_TOKENS
        self.sampling: dict[str, Any] = {}  # generate options that sample instead of decoding greedily
        self.seed = 0  # with `sampling`: each batch draws from a generator seeded by this and its first row
        self.scores = False  # a classification answer's `score`: its class's probability among its task's
        self.values = values or self.routed_values
        # while a batch is answered: its route ids as collated, on the CPU
        self.host_ids: torch.Tensor | None = None
        self.answers = answers or RoutedAnswers(model, collator)

    def routed_values(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, list]]:
        with routed(self.model, batch, self.host_ids):
            if not self.scores:
                return self.model.heads.predict(self.model, batch), {}
            logits = self.model(batch)  # what the head's decision reads (-inf outside each sample's task)
        return self.model.heads.decide(logits, batch["task_ids"]), {"score": class_scores(logits)}

    @torch.no_grad()
    def __call__(self, examples: Sequence[Any]) -> list[dict[str, Any]]:
        device = next(self.model.parameters()).device
        if isinstance(examples[0], GenerationExample):
            return self.generate(examples, device)
        collated = self.collator(examples)
        batch = {k: v.to(device) for k, v in collated.items()}
        self.host_ids = route_of(collated)  # for `routed_values`: a one-task batch known without the device
        try:
            values, extra = self.values(batch)
        finally:
            self.host_ids = None
        task_ids = extra.pop("task_ids", [example.task for example in examples])
        answers = answer_values(values.cpu(), task_ids, self.tasks)
        for answer, example, task in zip(answers, examples, task_ids):
            if example.task == UNKNOWN_TASK:
                answer["task"] = self.tasks[task]["name"]
        for key, column in extra.items():
            for answer, value, task in zip(answers, column, task_ids):
                if key != "score" or self.tasks[task]["task_type"] != "regression":  # a number has no class
                    answer[key] = value
        return answers

    def generate(self, examples: Sequence[GenerationExample], device: torch.device) -> list[dict[str, Any]]:
        batch: dict[str, torch.Tensor] = {}
        if getattr(self.answers, "routes_in_logits", False):
            # ELREA weighs its experts by the gradient of the prompt's loss, taken on the collated batch
            batch = {k: v.to(device) for k, v in self.collator(examples).items()}
            self.answers.logits(batch)
        collated = self.collator.prompts(examples)
        prompts = {k: v.to(device) for k, v in collated.items()}
        prompts, room = fit_positions(prompts, self.max_new_tokens, position_limit(self.model.backbone))
        if self.sampling:  # the batch's draws, whichever process answers it and whatever came before
            torch.manual_seed(batch_seed(self.seed, examples[0].location))
        generated = self.answers.generate(
            batch, prompts, room, self.sampling or None, host_ids=route_of(collated)
        )
        texts = self.collator.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [{"prediction": text.strip()} for text in texts]


def predict(
    requests: Sequence[Request], predictor: RoutedPredictor, *, batch_size: int, progress: bool = True
) -> list[dict[str, Any]]:
    """Every request's answer, in order, `batch_size` rows a batch (rows of different tasks share one), each as
    `{"line", "task", "prediction", ...}`, where a row without a task has the one the method chose and
    `"task_given": false`. (A run's tasks are all classifiers or all generation tasks.) Under several processes
    each answers its share of the batches and all get every answer (:mod:`loramix.train.shards`)."""
    from tqdm.auto import tqdm

    batches = EvalBatches([requests], batch_size)

    def respond(_: int, chunk: Sequence[Request]) -> list[dict[str, Any]]:
        answers = predictor([request.example for request in chunk])
        return [
            {
                "line": request.location,
                "task": request.task,
                **answer,
                **({} if request.task is not None else {"task_given": False}),
            }
            for request, answer in zip(chunk, answers)
        ]

    with (
        predictor.model.heads.inference_cache(),
        tqdm(
            total=len(batches), desc="predict", unit="batch", leave=False, disable=None if progress else True
        ) as bar,
    ):
        return [row for part in batches.map(respond, bar)[0] for row in part]


def write_predictions(results: Sequence[dict[str, Any]], out: str | Path | None) -> None:
    """One JSON line per result: to `out` (written whole, then renamed into place) or to standard output."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if out is None:
        sys.stdout.write(text)
        return
    atomic_write_bytes(Path(out), text.encode())
