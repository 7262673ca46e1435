"""Generation tasks: rows of a prompt and its response (or a chat), checked with file-and-line errors, and
collated for a causal LM with the loss on the response tokens only.

A row holds `prompt_field` and `response_field` (default `prompt`, `response`), or `messages_field` (default
`messages`): a list of `{"role", "content"}` turns whose last one is the assistant's answer. A chat is rendered with
the tokenizer's chat template when it has one (`add_generation_prompt` before the answer), else as `role: content`
lines ending in `assistant: `.

Tokens: the prompt is tokenized with the tokenizer's special tokens (a BOS where the model wants one), the response
without them, followed by EOS. Prompt and response are tokenized apart, exactly as generation sees them: the model
continues the prompt's tokens. A response that does not fit `max_length` after its prompt is cut (counted and
reported once per task); a prompt that leaves no room for a single response token is an error naming its row.

Legend: n samples, t tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loramix.data.readers import RawSplit, Row, field_value, shown, text_value
from loramix.data.spec import TaskSpec
from loramix.errors import DataError, DataWarning
from loramix.losses.language_model import IGNORE


@dataclass(frozen=True, slots=True)
class GenerationExample:
    """One prompt and its reference response. A chat keeps its turns (`messages`: the turns before the answer,
    as `(role, content)` pairs), rendered by the collator that holds the tokenizer; `prompt` is then empty."""

    prompt: str
    response: str
    task: int = 0
    location: str = ""
    messages: tuple[tuple[str, str], ...] | None = None


def to_generation_examples(raw: RawSplit, spec: TaskSpec, *, task: int = 0) -> list[GenerationExample]:
    """Check every row of a generation task and convert it; a row's problem names its file and line."""
    return [_example(row, spec, task) for row in raw.rows]


def _example(row: Row, spec: TaskSpec, task: int) -> GenerationExample:
    if spec.messages_field in row.fields and spec.prompt_field not in row.fields:
        turns = chat_turns(row, spec.messages_field)
        return GenerationExample("", turns[-1][1], task, row.location, tuple(turns[:-1]))
    prompt = text_value(row, spec.prompt_field, "prompt_field")
    response = text_value(row, spec.response_field, "response_field")
    if not prompt.strip():  # nothing to generate from: a batch of such prompts has no position to continue
        raise DataError(f"{row.location}: field {spec.prompt_field!r} is empty; a prompt needs text")
    if not response.strip():
        raise DataError(f"{row.location}: field {spec.response_field!r} is empty; a response needs text")
    return GenerationExample(prompt, response, task, row.location)


def chat_turns(row: Row, key: str, *, answered: bool = True) -> list[tuple[str, str]]:
    """A chat's `(role, content)` turns, checked; `answered`: the last is the assistant's answer to learn (else
    the chat so far, to be answered)."""
    value = field_value(row, key, "messages_field")
    if not isinstance(value, list) or len(value) < (2 if answered else 1):
        what = (
            "at least two turns (the prompt's and the assistant's answer)" if answered else "the chat's turns"
        )
        raise DataError(f"{row.location}: field {key!r} must be a list of {what}, got {shown(value)}")
    turns = []
    for number, turn in enumerate(value, 1):
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("role"), str)
            and isinstance(turn.get("content"), str)
        ):
            raise DataError(
                f"{row.location}: turn {number} of {key!r} must be an object with string 'role' and 'content', "
                f"got {shown(turn)}"
            )
        turns.append((turn["role"], turn["content"]))
    if answered and (turns[-1][0] != "assistant" or not turns[-1][1].strip()):
        got = f"role {turns[-1][0]!r}" if turns[-1][0] != "assistant" else "an empty answer"
        raise DataError(
            f"{row.location}: the last turn of {key!r} must be the assistant's non-empty answer (the response "
            f"to learn), got {got}"
        )
    return turns


class GenerationCollator:
    """Tokenize generation examples for a causal LM.

    `collator(examples)` is a training batch: `input_ids` `(n, t)` (prompt, response, EOS, right padding),
    `attention_mask`, `lm_labels` `(n, t)` (the response's token ids, -100 elsewhere), `prompt_mask` `(n, t)` (1
    on prompt tokens: what a sample router pools and ELREA's prompt loss reads) and `task_ids` `(n,)`.
    `collator.prompts(examples)` is a generation batch: the prompts alone, left-padded, with `task_ids`.

    Example:
        >>> collator = GenerationCollator(tokenizer, max_length=256)
        >>> batch = collator(data.split("train")[:8])
    """

    def __init__(self, tokenizer: Any, max_length: int = 256) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 for a prompt and a response (got {max_length})")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        self._cache: dict[GenerationExample, tuple[list[int], list[int]]] = {}
        self._plain_chat_said = False  # a tokenizer without a chat template: said once

    def prompt_text(self, example: GenerationExample) -> str:
        if example.messages is None:
            return example.prompt
        turns = [{"role": role, "content": content} for role, content in example.messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        if not self._plain_chat_said:
            self._plain_chat_said = True
            warnings.warn(
                f"{example.location}: the tokenizer has no chat template; chats are rendered as 'role: content' "
                "lines (set tokenizer.chat_template and save it with the model to use one)",
                DataWarning,
                stacklevel=2,
            )
        return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "

    def fitted(self, example: GenerationExample) -> tuple[list[int], list[int]]:
        """`(prompt ids, response ids + EOS)` cut to `max_length`; a prompt with no room for its response is an
        error naming its row."""
        prompt, response = self.token_ids(example)
        if len(prompt) >= self.max_length:
            raise DataError(
                f"{example.location}: the prompt is {len(prompt)} tokens, which leaves no room for the "
                f"response within max_length {self.max_length}; raise max_length or shorten the prompt"
            )
        return prompt, response[: self.max_length - len(prompt)]

    def token_ids(self, example: GenerationExample) -> tuple[list[int], list[int]]:
        """`(prompt ids, response ids + EOS)`, before any cut to `max_length`."""
        cached = self._cache.get(example)
        if cached is None:
            chat = example.messages is not None and bool(getattr(self.tokenizer, "chat_template", None))
            prompt = self.tokenizer(self.prompt_text(example), add_special_tokens=not chat)["input_ids"]
            response = self.tokenizer(example.response, add_special_tokens=False)["input_ids"]
            eos = self.tokenizer.eos_token_id
            cached = self._cache[example] = (list(prompt), list(response) + ([] if eos is None else [eos]))
        return cached

    def check(self, examples: Sequence[GenerationExample], task_name: str) -> int:
        """Refuse a prompt with no room for its response within `max_length` (naming its row); warn once about
        responses that will be cut. Returns how many are cut."""
        cut, first = 0, None
        for example in examples:
            if len(self.fitted(example)[1]) < len(self.token_ids(example)[1]):
                cut += 1
                first = first or example.location
        if cut:
            warnings.warn(
                f"task {task_name!r}: {cut} of {len(examples)} responses are cut to fit max_length "
                f"{self.max_length} after their prompt (the first at {first}); their ends are not learned",
                DataWarning,
                stacklevel=2,
            )
        return cut

    def __call__(self, examples: Sequence[GenerationExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch")
        rows = [self.fitted(example) for example in examples]
        width = max(len(p) + len(r) for p, r in rows)
        n = len(rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        prompt_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (prompt, response) in enumerate(rows):
            p, total = len(prompt), len(prompt) + len(response)
            ids[i, :total] = torch.tensor(prompt + response)
            labels[i, p:total] = torch.tensor(response)
            mask[i, :total] = 1
            prompt_mask[i, :p] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "lm_labels": labels,
            "prompt_mask": prompt_mask,
            "task_ids": torch.tensor([e.task for e in examples], dtype=torch.long),
        }

    def prompts(self, examples: Sequence[GenerationExample]) -> dict[str, torch.Tensor]:
        """The prompts alone, left-padded (generation appends on the right): `input_ids`, `attention_mask`,
        `task_ids`."""
        prompts = [self.token_ids(e)[0][-(self.max_length - 1) :] for e in examples]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "task_ids": torch.tensor([e.task for e in examples], dtype=torch.long),
        }
