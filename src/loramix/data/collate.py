"""Turn a list of :class:`~loramix.data.readers.Example` into model inputs, labels and task ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loramix.data.readers import Example
from loramix.errors import DataError


class TextCollator:
    """Tokenise a batch (pairs jointly, ``tokenizer(text, text_pair)``), pad to its longest member, and add
    ``labels`` and ``task_ids``.

    Returns ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them), each
    ``(n, t)`` long; ``labels`` ``(n,)`` float32, and ``task_ids`` ``(n,)`` long. Labels are float because one
    batch may mix classification and regression tasks; a classification head casts its rows back with
    ``labels.long()`` (class indices up to 2**24 are exact in float32). Single-text and pair examples may share
    a batch.

    Example:
        >>> loader = DataLoader(data.split("train"), batch_sampler=sampler, collate_fn=TextCollator(tokenizer))
    """

    def __init__(
        self, tokenizer: Any, max_length: int = 128, *, pad_to_multiple_of: int | None = None
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (got {max_length})")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch")
        singles = [i for i, example in enumerate(examples) if example.text_pair is None]
        pairs = [i for i, example in enumerate(examples) if example.text_pair is not None]
        if not pairs or not singles:
            encoded = self._encode(examples, padding="longest")
        else:
            # The tokenizer takes a pair list only when every entry is a pair: encode each kind, then pad together.
            features: list[dict[str, Any] | None] = [None] * len(examples)
            for group in (singles, pairs):
                unpadded = self._encode([examples[i] for i in group], padding=False, tensors=False)
                for row, i in enumerate(group):
                    features[i] = {key: values[row] for key, values in unpadded.items()}
            encoded = dict(
                self.tokenizer.pad(
                    features,
                    padding="longest",
                    pad_to_multiple_of=self.pad_to_multiple_of,
                    return_tensors="pt",
                )
            )
        batch = {
            key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded
        }
        batch["labels"] = torch.tensor([float(example.label) for example in examples], dtype=torch.float32)
        batch["task_ids"] = torch.tensor([example.task for example in examples], dtype=torch.long)
        return batch

    def _encode(
        self, examples: Sequence[Example], *, padding: str | bool, tensors: bool = True
    ) -> dict[str, Any]:
        texts = [example.text for example in examples]
        text_pairs = [example.text_pair for example in examples]
        encoded = self.tokenizer(
            texts,
            text_pairs if text_pairs[0] is not None else None,
            truncation=True,
            max_length=self.max_length,
            padding=padding,
            pad_to_multiple_of=self.pad_to_multiple_of if padding else None,
            return_tensors="pt" if tensors else None,
        )
        return dict(encoded)
