"""Generation tasks: rows of prompts and responses (or chats) read with file-and-line errors, and collated for a
causal LM with the loss on the response alone."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from loramix.data import MultiTaskData, TaskSpec
from loramix.data.generation import GenerationCollator, GenerationExample
from loramix.data.synthetic_generation import RULES, write_generation_suite
from loramix.errors import ConfigError, DataError, DataWarning
from loramix.losses.language_model import IGNORE, causal_lm_loss
from loramix.tiny_lm import char_tokenizer, tiny_causal_lm


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(tmp_path: Path, rows: list[dict], **spec: object) -> MultiTaskData:
    train = write_rows(tmp_path / "train.jsonl", rows)
    return MultiTaskData([TaskSpec(name="t", train=str(train), task_type="generation", **spec)])


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_prompt_response_rows_and_chats_are_read(tmp_path: Path, tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    data = load(tmp_path, [{"prompt": "a?", "response": "b"}, {"messages": chat}])
    plain, talk = data.split("train")
    assert (plain.prompt, plain.response, plain.messages) == ("a?", "b", None)
    assert talk.messages == (("user", "hi"),) and talk.response == "yo"
    assert talk.location.endswith("line 2")
    collator = GenerationCollator(tokenizer, max_length=32)
    assert collator.prompt_text(talk) == "<user>hi\n<assistant>"  # the tokenizer's chat template


def test_a_chat_without_a_chat_template_is_rendered_as_lines_and_said_once(tmp_path: Path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    talk = load(tmp_path, [{"messages": chat}, {"messages": chat}]).split("train")
    plain = char_tokenizer()
    plain.chat_template = None
    collator = GenerationCollator(plain, max_length=32)
    with pytest.warns(DataWarning, match="no chat template") as said:
        assert [collator.prompt_text(t) for t in talk] == ["user: hi\nassistant: "] * 2
    assert len(said) == 1 and "line 1" in str(said[0].message)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a"}, "missing field 'response'"),
        ({"prompt": "a", "response": "  "}, "is empty"),
        ({"prompt": " ", "response": "b"}, "field 'prompt' is empty; a prompt needs text"),
        ({"prompt": 3, "response": "b"}, "must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "at least two turns"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}, "assistant"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "turn 1"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            "empty answer",
        ),
    ],
)
def test_a_bad_row_names_its_file_and_line(tmp_path: Path, row: dict, message: str):
    with pytest.raises(DataError, match=message) as caught:
        load(tmp_path, [{"prompt": "ok", "response": "fine"}, row])
    assert "train.jsonl" in str(caught.value) and "line 2" in str(caught.value)


def test_spec_fields_of_a_generation_task_are_checked():
    with pytest.raises(ConfigError, match="scorer 'label' needs `labels`"):
        TaskSpec.from_dict({"name": "t", "train": "t.jsonl", "task_type": "generation", "scorer": "label"})
    with pytest.raises(ConfigError, match="text_pair_field"):
        TaskSpec.from_dict(
            {"name": "t", "train": "t.jsonl", "task_type": "generation", "text_pair_field": "b"}
        )
    for key in (
        "text_field",
        "label_field",
    ):  # a classification task's fields, which a generation task never reads
        with pytest.raises(ConfigError, match=f"reads prompt_field and response_field .*remove {key}"):
            TaskSpec.from_dict({"name": "t", "train": "t.jsonl", "task_type": "generation", key: "prompt"})
    spec = TaskSpec.from_dict(
        {
            "name": "t",
            "train": "t.jsonl",
            "task_type": "generation",
            "prompt_field": "q",
            "response_field": "a",
        }
    )
    assert spec.is_generation and spec.scorer == "exact"


def test_renamed_fields_are_read(tmp_path: Path):
    data = load(tmp_path, [{"q": "x", "a": "y"}], prompt_field="q", response_field="a")
    assert data.split("train")[0].response == "y"


def test_the_collator_labels_only_the_response_and_its_eos(tokenizer):
    collator = GenerationCollator(tokenizer, max_length=32)
    examples = [GenerationExample("ab:", "cd", 0), GenerationExample("a:", "wxyz", 1)]
    batch = collator(examples)
    ids, labels, mask, prompt = (
        batch["input_ids"],
        batch["lm_labels"],
        batch["attention_mask"],
        batch["prompt_mask"],
    )
    eos = tokenizer.eos_token_id
    assert tokenizer.decode(ids[0, :5]) == "ab:cd" and ids[0, 5] == eos
    assert labels[0].tolist() == [IGNORE] * 3 + tokenizer("cd")["input_ids"] + [eos] + [IGNORE]
    assert labels[1].tolist() == [IGNORE] * 2 + tokenizer("wxyz")["input_ids"] + [eos]
    assert mask.tolist() == [[1] * 6 + [0], [1] * 7]
    assert prompt.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]]
    assert batch["task_ids"].tolist() == [0, 1]
    prompts = collator.prompts(examples)  # left-padded, for generation
    assert prompts["input_ids"][1, 0] == tokenizer.pad_token_id
    assert tokenizer.decode(prompts["input_ids"][1, 1:]) == "a:"
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_prompt_tokens_get_no_gradient(tokenizer):
    """The loss reads only the logits that predict response tokens (and EOS): those predicting the prompt or
    padding get exactly zero gradient."""
    model = tiny_causal_lm("gpt2", vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2)
    batch = GenerationCollator(tokenizer, max_length=32)(
        [GenerationExample("abc:", "de", 0), GenerationExample("a:", "b", 0)]
    )
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    logits.requires_grad_(True)
    causal_lm_loss(logits, batch["lm_labels"]).mean().backward()
    touched = logits.grad.abs().sum(-1) > 0  # (n, t): position t predicts token t + 1
    predicts_response = torch.zeros_like(touched)
    predicts_response[:, :-1] = batch["lm_labels"][:, 1:] != IGNORE
    assert torch.equal(touched, predicts_response)
    assert touched[0].tolist() == [False, False, False, True, True, True, False]


def test_a_prompt_without_room_is_an_error_and_cut_responses_are_counted(tmp_path: Path, tokenizer):
    rows = [{"prompt": "p" * 5, "response": "r" * 5}, {"prompt": "q" * 2, "response": "s" * 2}]
    data = load(tmp_path, rows)
    collator = GenerationCollator(tokenizer, max_length=8)
    with pytest.warns(DataWarning, match=r"1 of 2 responses are cut .* line 1"):
        assert collator.check(data.split("train"), "t") == 1
    assert collator(data.split("train"))["input_ids"].shape[1] == 8
    data = load(tmp_path, [{"prompt": "ok", "response": "x"}, {"prompt": "p" * 8, "response": "r"}])
    with pytest.raises(DataError, match=r"line 2: the prompt is 8 tokens, which leaves no room"):
        collator.check(data.split("train"), "t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenerationCollator(tokenizer, max_length=16).check(data.split("train"), "t")  # all fit: silent


def test_the_synthetic_suite_applies_its_rules_and_keeps_test_strings_unseen(tmp_path: Path):
    folders = write_generation_suite(tmp_path, train_size=50, test_size=20)
    assert [f.name for f in folders] == list(RULES)
    for folder in folders:
        rows = {s: [json.loads(line) for line in (folder / f"{s}.jsonl").open()] for s in ("train", "test")}
        assert len(rows["train"]) == 50 and len(rows["test"]) == 20
        assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["test"]}
        for row in rows["test"]:
            word = row["prompt"].removeprefix(f"{folder.name}: ").strip()
            assert row["response"] == RULES[folder.name](word)
    assert RULES["shift"]("akl") == "bla" and RULES["rotate"]("abc") == "bca"
