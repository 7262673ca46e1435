"""Evaluation of generation tasks: greedy generation under each sample's routing, scored against the reference.

Per task: `exact_match` (equal after normalising), `f1` (token overlap, the SQuAD measure), `accuracy` (the task's
own `scorer`: exact match, the first number, or the label word), and, teacher-forced on the reference, `loss` (the
mean next-token loss per response token) and `perplexity` (its exp). A batch mixes whatever rows it holds; each
row is generated with its own expert in the same pass.

Normalising: lower case, punctuation dropped, runs of white space made one space, the ends stripped.
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from loramix.data import MultiTaskData
from loramix.data.generation import GenerationCollator, GenerationExample
from loramix.errors import DataWarning
from loramix.losses.language_model import token_nll
from loramix.models import position_limit
from loramix.train.eval_log import progress_bar, with_unscored
from loramix.train.model import MultiTaskModel, route_of
from loramix.train.shards import EvalBatches
from loramix.train.step import routed

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
EXTRA_TOKENS = (
    8  # generated beyond the task's longest reference, so that a wrong, longer answer shows as wrong
)
SAMPLES_KEPT = (
    3  # per task, in metrics.json: prompt, reference and generated text, to read what the model does
)


def normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    return None if match is None else float(match.group().replace(",", ""))


def first_label(text: str, labels: Sequence[str]) -> str | None:
    """The label word that comes first in `text` (whole words, after normalising), or None."""
    words = normalize(text)
    found = []
    for label in labels:
        match = re.search(rf"\b{re.escape(normalize(label))}\b", words)
        if match:
            found.append((match.start(), label))
    return min(found)[1] if found else None


def score(prediction: str, reference: str, scorer: str, labels: Sequence[str] = ()) -> bool:
    """Whether a generated answer is right by the task's scorer (see the module docstring)."""
    if scorer == "number":
        got = first_number(prediction)
        return got is not None and got == first_number(reference)
    if scorer == "label":
        got = first_label(prediction, labels)
        return got is not None and got == first_label(reference, labels)
    return normalize(prediction) == normalize(reference)


class RoutedAnswers:
    """How a routed multi-task model answers: teacher-forced logits and greedy continuations, each row under its
    own routing (a sample router decides once, on the prompt). `gates` (optional) collects the routing of each
    teacher-forced batch. Other ways to answer (ELREA's gradient-routed experts) give the same two methods.
    `host_ids`: the batch's route ids as collated, on the CPU (see :func:`loramix.train.step.routed`)."""

    def __init__(self, model: MultiTaskModel, collator: GenerationCollator, gates: Any = None) -> None:
        self.model, self.collator, self.gates = model, collator, gates

    def logits(self, batch: dict[str, torch.Tensor], host_ids: torch.Tensor | None = None) -> torch.Tensor:
        with routed(self.model, batch, host_ids) as state:
            logits = self.model(batch)
        if self.gates is not None:
            self.gates.add(state, batch)
        return logits

    def generate(
        self,
        batch: dict[str, torch.Tensor],
        prompts: dict[str, torch.Tensor],
        max_new_tokens: int,
        sampling: dict[str, Any] | None = None,
        host_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with routed(self.model, prompts, host_ids) as state:
            state.keep_model_gate = True
            return self.model.heads.generate(
                self.model,
                prompts,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.collator.pad_id,
                eos_token_id=self.collator.tokenizer.eos_token_id,
                sampling=sampling,
            )


@torch.no_grad()
def evaluate_generation(
    model: MultiTaskModel,
    data: MultiTaskData,
    collator: GenerationCollator,
    *,
    split: str = "test",
    batch_size: int = 32,
    max_examples: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
    answers: Any = None,
) -> dict[str, Any]:
    """`{"tasks": {name: {"exact_match", "f1", "accuracy", "loss", "perplexity", "n", "samples"}},
    "mean_accuracy"}` on `split`. `max_new_tokens`: default, per task, its longest reference plus a few tokens.
    `answers`: what answers each batch (its `logits(batch)` and `generate(batch, prompts, max_new_tokens)`, the
    new tokens); default :class:`RoutedAnswers`."""
    answers = answers or RoutedAnswers(model, collator)
    model.eval()
    device = next(model.parameters()).device
    scored = data.scored_tasks(split)
    chosen: list[list[GenerationExample]] = [
        data.eval_examples(split, task.task_id, max_examples)  # type: ignore[misc]
        for task in scored
    ]
    specs = [data.specs[task.task_id] for task in scored]
    for task, spec, examples in zip(scored, specs, chosen):
        warn_unscorable(task.name, spec.scorer, spec.labels or (), [e.response for e in examples])
    new_tokens = [
        max_new_tokens or max((len(collator.token_ids(e)[1]) for e in examples), default=1) + EXTRA_TOKENS
        for examples in chosen
    ]
    limit = position_limit(model.backbone)
    batches = EvalBatches(chosen, batch_size)
    bar = progress_bar(len(batches), split, progress)

    def answer(task: int, part: Any) -> tuple[float, int, list[str]]:
        """A batch's summed response-token loss, its number of response tokens, and each row's generated text."""
        collated = collator(part)  # one task's examples (EvalBatches): its ids known on the host
        batch = {k: v.to(device) for k, v in collated.items()}
        total, tokens = token_nll(answers.logits(batch, host_ids=route_of(collated)), batch["lm_labels"])
        prompts = {k: v.to(device) for k, v in collator.prompts(part).items()}
        prompts, room = fit_positions(prompts, new_tokens[task], limit)
        generated = answers.generate(batch, prompts, room, host_ids=route_of(collated))
        texts = collator.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return float(total.sum()), int(tokens.sum()), [text.strip() for text in texts]

    results = batches.map(answer, bar, [task.name for task in scored])
    tasks: dict[str, Any] = {}
    for task, spec, examples, parts in zip(scored, specs, chosen, results):
        texts = [text for _, _, batch_texts in parts for text in batch_texts]
        nll, count = sum(part[0] for part in parts), sum(part[1] for part in parts)
        n = len(examples)
        loss = nll / max(count, 1)
        tasks[task.name] = {
            "accuracy": sum(
                score(t, e.response, spec.scorer, spec.labels or ()) for t, e in zip(texts, examples)
            )
            / max(n, 1),
            "scorer": spec.scorer,  # what `accuracy` counts: exact answers, the first number, or the label word
            "exact_match": sum(normalize(t) == normalize(e.response) for t, e in zip(texts, examples))
            / max(n, 1),
            "f1": sum(token_f1(t, e.response) for t, e in zip(texts, examples)) / max(n, 1),
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "n": n,
            "samples": [
                {"prompt": collator.prompt_text(e), "reference": e.response, "generated": t}
                for t, e in zip(texts[:SAMPLES_KEPT], examples)
            ],
        }
    bar.close()
    model.train()
    metrics = {
        "tasks": tasks,
        "mean_accuracy": sum(t["accuracy"] for t in tasks.values()) / max(len(tasks), 1),
    }
    return with_unscored(metrics, data, split)


def fit_positions(
    prompts: dict[str, torch.Tensor], new_tokens: int, limit: int | None
) -> tuple[dict[str, torch.Tensor], int]:
    """Prompts (left-padded) and a number of new tokens that fit a position table of `limit`: the answer keeps up
    to half of it, and the prompts lose their oldest tokens only when they would leave less."""
    width = prompts["input_ids"].shape[1]
    if limit is None or width + new_tokens <= limit:
        return prompts, new_tokens
    room = max(min(new_tokens, limit - width), min(new_tokens, limit // 2))
    keep = limit - room
    return {k: v[:, -keep:] if v.dim() == 2 else v for k, v in prompts.items()}, room


def warn_unscorable(task: str, scorer: str, labels: Sequence[str], references: Sequence[str]) -> None:
    """A DataWarning when some references give the scorer nothing to compare (a `number` task's reference without
    a number, a `label` task's that names no label): no answer can be right on them."""
    if scorer == "number":
        empty = [r for r in references if first_number(r) is None]
        what = "hold no number"
    elif scorer == "label":
        empty = [r for r in references if first_label(r, labels) is None]
        what = f"name none of the labels {', '.join(labels)}"
    else:
        return
    if empty:
        warnings.warn(
            f"task {task!r}: {len(empty)} of {len(references)} references {what} (e.g. {empty[0]!r}), so no answer "
            f"is scored right on them by the {scorer!r} scorer",
            DataWarning,
            stacklevel=2,
        )
