from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertTokenizerFast

from loramix.data import Example, TaskBalancedSampler, TextCollator
from loramix.errors import DataError

WORDS = "a the movie film was is good bad great awful plot actor story fun dull i it not very and".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizerFast:
    folder: Path = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(folder))  # a local folder: no download


def ids(tokenizer: BertTokenizerFast, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


def test_single_texts_give_padded_ids_masks_labels_and_task_ids(tokenizer):
    batch = TextCollator(tokenizer)([Example("the movie was good", None, 1, 0), Example("dull", None, 0, 2)])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "task_ids"}
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [
        [cls, *ids(tokenizer, "the movie was good"), sep],
        [cls, *ids(tokenizer, "dull"), sep, pad, pad, pad],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["labels"].dtype == torch.float32 and batch["labels"].long().tolist() == [1, 0]
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == [0, 2]


def test_pairs_are_encoded_jointly(tokenizer):
    batch = TextCollator(tokenizer)([Example("a good film", "it was great", 1, 1)])
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    expected = [cls, *ids(tokenizer, "a good film"), sep, *ids(tokenizer, "it was great"), sep]
    assert batch["input_ids"].tolist() == [expected]
    assert batch["token_type_ids"].tolist() == [[0] * 5 + [1] * 4]


def test_mixed_single_and_pair_batch_equals_encoding_each_alone(tokenizer):
    examples = [
        Example("good", None, 1, 0),
        Example("the plot was dull", "not fun", 0, 1),
        Example("a very very very good film", None, 1, 0),
    ]
    batch = TextCollator(tokenizer)(examples)
    assert batch["input_ids"].shape == (3, 9)
    for row, example in enumerate(examples):
        alone = tokenizer(example.text, example.text_pair)
        length = len(alone["input_ids"])
        assert batch["input_ids"][row, :length].tolist() == alone["input_ids"]
        assert batch["token_type_ids"][row, :length].tolist() == alone["token_type_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (9 - length)


def test_long_inputs_are_truncated_to_max_length(tokenizer):
    long_text = " ".join(WORDS * 3)
    batch = TextCollator(tokenizer, max_length=10)(
        [Example(long_text, long_text, 0, 0), Example(long_text, None, 1, 0)]
    )
    assert batch["input_ids"].shape == (2, 10)
    assert batch["attention_mask"].all()
    assert (batch["input_ids"] == tokenizer.sep_token_id).sum(dim=1).tolist() == [2, 1]


def test_regression_and_classification_labels_share_a_float_tensor(tokenizer):
    batch = TextCollator(tokenizer)([Example("good", None, 2, 0), Example("bad", None, 0.25, 1)])
    assert batch["labels"].tolist() == [2.0, 0.25]
    is_classification = batch["task_ids"] == 0
    assert batch["labels"][is_classification].long().tolist() == [2]


def test_pad_to_multiple_of(tokenizer):
    batch = TextCollator(tokenizer, pad_to_multiple_of=8)([Example("good", None, 1, 0)])
    assert batch["input_ids"].shape == (1, 8)


def test_empty_batch_is_an_error(tokenizer):
    with pytest.raises(DataError, match="empty batch"):
        TextCollator(tokenizer)([])


def test_data_loader_with_sampler_and_collator(tokenizer):
    examples = [Example(f"good film {i}", None, i % 2, 0) for i in range(12)]
    examples += [Example("bad plot", "dull story", 1, 1) for _ in range(4)]
    sampler = TaskBalancedSampler([e.task for e in examples], batch_size=4, mode="uniform", seed=1)
    batches = list(
        DataLoader(examples, batch_sampler=sampler, collate_fn=TextCollator(tokenizer, max_length=16))
    )
    assert len(batches) == 4
    for batch, indices in zip(
        batches, TaskBalancedSampler([e.task for e in examples], batch_size=4, mode="uniform", seed=1)
    ):
        assert batch["task_ids"].tolist() == [examples[i].task for i in indices]
        assert batch["input_ids"].shape[0] == 4
