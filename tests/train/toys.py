"""A tiny offline "model directory" (a 2-layer BERT and a word-level tokenizer) and tiny generated tasks laid out
like shared/data, for tests that run whole trainings. Everything is built from configs; nothing is downloaded.

Each task draws its filler words from its own topic, so a router that looks at the input can tell the tasks apart,
and its label is one keyword in the sentence, so a few dozen steps learn it.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import yaml

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SHARED = ["the", "a", "is", "was", "with", "and", "very", "some", "this", "that", "near", "big", "small"]
# name -> (topic words, one keyword per label, label names)
TASKS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "sentiment": (
        ["film", "movie", "plot", "actor", "scene", "story", "ending", "music", "cast", "script"],
        ["bad", "good"],
        ["negative", "positive"],
    ),
    "animals": (
        ["park", "tree", "grass", "house", "garden", "field", "river", "yard", "farm", "hill"],
        ["dog", "cat"],
        ["dog", "cat"],
    ),
    "colors": (
        ["car", "ball", "shirt", "door", "cup", "box", "hat", "wall", "bag", "lamp"],
        ["red", "green", "blue"],
        ["red", "green", "blue"],
    ),
}
TASK_NAMES = list(TASKS)
VOCAB = SPECIALS + SHARED + [w for topic, keys, _ in TASKS.values() for w in topic + keys]
MAX_LENGTH = 16

# Settings every test run starts from: tiny, quiet, one thread.
BASE_SETTINGS: dict[str, Any] = {
    "rank": 4,
    "alpha": 8.0,
    "batch_size": 8,
    "eval_batch_size": 32,
    "max_length": MAX_LENGTH,
    "lr": 5e-3,
    "router_lr": 1e-2,
    "head_lr": 1e-2,
    "warmup_ratio": 0.1,
    "sampling": "uniform",
    "log_every": 2,
    "progress": False,
    "threads": 1,
}


def sentence(rng: random.Random, task: str, label: int) -> str:
    topic, keys, _ = TASKS[task]
    words = [rng.choice(topic) for _ in range(rng.randint(3, 6))] + [rng.choice(SHARED)]
    rng.shuffle(words)
    words.insert(rng.randint(0, len(words)), keys[label])
    return " ".join(words)


def write_task(root: Path, task: str, *, train: int = 96, test: int = 24, seed: int = 0) -> Path:
    """`root/task/{train,test}.jsonl` and `meta.json`, labels balanced and shuffled."""
    rng = random.Random(f"{task}-{seed}")
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    num_labels = len(TASKS[task][1])
    for split, count in (("train", train), ("test", test)):
        labels = [i % num_labels for i in range(count)]
        rng.shuffle(labels)
        rows = [{"text": sentence(rng, task, label), "label": label} for label in labels]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps({"name": task, "labels": TASKS[task][2]}), encoding="utf-8")
    return folder


def write_tasks(root: Path, names: list[str] = TASK_NAMES, **kwargs: Any) -> Path:
    for task in names:
        write_task(root, task, **kwargs)
    return root


def tiny_bert_config(**overrides: Any) -> transformers.BertConfig:
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=len(VOCAB),
        max_position_embeddings=64,
    )
    return transformers.BertConfig(**{**settings, **overrides})


def write_model_dir(directory: Path, seed: int = 0, **sizes: Any) -> Path:
    """A BertModel (`sizes` changing `tiny_bert_config`'s) and a BertTokenizerFast saved so that
    `AutoModel/AutoTokenizer.from_pretrained` read them."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    transformers.BertModel(tiny_bert_config(**sizes)).save_pretrained(directory)
    transformers.BertTokenizerFast(vocab=str(vocab_file)).save_pretrained(directory)
    return directory


def shared_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder under the session's base temp dir, shared by every test module of the session."""
    return factory.getbasetemp() / name


def model_dir(factory: pytest.TempPathFactory, **sizes: Any) -> Path:
    """The tiny model directory, written once per session; `sizes` change `tiny_bert_config`'s (the default
    intermediate width, 37, keeps the grouped GEMM from running: its rows are not 16 bytes long)."""
    directory = shared_dir(factory, "-".join(["tiny-model", *(f"{k}{v}" for k, v in sorted(sizes.items()))]))
    if not (directory / "config.json").is_file():
        write_model_dir(directory, **sizes)
    return directory


def tasks_dir(factory: pytest.TempPathFactory) -> Path:
    """The tiny tasks, written once per session."""
    directory = shared_dir(factory, "tiny-tasks")
    if not (directory / TASK_NAMES[-1] / "meta.json").is_file():
        write_tasks(directory)
    return directory


def settings(model: Path, data: Path, /, **overrides: Any) -> dict[str, Any]:
    """A run config dict on the tiny model and the tasks in `data`; `overrides` may replace any key."""
    return {**BASE_SETTINGS, "model": str(model), "tasks_dir": str(data), "tasks": TASK_NAMES, **overrides}


def write_yaml(path: Path, settings: dict[str, Any]) -> Path:
    """`settings` written to `path` as YAML in their own order (its folder made if needed); the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------ generation: tiny causal LMs and string tasks

# initializer_range 0.1, not 0.02: a random LM's logits are then wide enough for adapters on a frozen base to move
# (with 0.02 and tied embeddings they span about +-0.6, and the loss cannot fall below about 4.4 nats)
LM_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "max_positions": 64,
    "initializer_range": 0.1,
}
GEN_TASKS = ["reverse", "sort", "shift"]


def lm_dir(factory: pytest.TempPathFactory, kind: str = "gpt2") -> Path:
    """A tiny causal LM of `kind` with the character tokenizer, written once per session."""
    from loramix.tiny_lm import write_tiny_lm

    directory = shared_dir(factory, f"tiny-{kind}")
    if not (directory / "config.json").is_file():
        write_tiny_lm(directory, kind, **LM_SIZES)
    return directory


def gen_tasks_dir(factory: pytest.TempPathFactory) -> Path:
    """Three synthetic string tasks (reverse, sort, shift), small, written once per session."""
    from loramix.data.synthetic_generation import write_generation_suite

    directory = shared_dir(factory, "tiny-gen-tasks")
    if not (directory / GEN_TASKS[-1] / "meta.json").is_file():
        write_generation_suite(directory, train_size=64, test_size=8)
    return directory


def gen_settings(model: Path, data: Path, /, **overrides: Any) -> dict[str, Any]:
    """A run config dict for generation tasks on a tiny causal LM."""
    base = {**BASE_SETTINGS, "max_length": 24, "eval_batch_size": 8}
    return {**base, "model": str(model), "tasks_dir": str(data), "tasks": GEN_TASKS, **overrides}


class Interrupted(Exception):
    """What a test raises to stop a run as a crash would."""


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int, train: Any, *args: Any, **kwargs: Any) -> None:
    """Run `train(*args, **kwargs)` and crash it right after step `step` (after that step's checkpoint, if any)."""
    from loramix.train import callbacks

    checkpoint_step = callbacks.Checkpointer.on_step_end

    def crash(self, trainer, logs):  # type: ignore[no-untyped-def]
        checkpoint_step(self, trainer, logs)
        if trainer.step == step:
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.Checkpointer, "on_step_end", crash)
        with pytest.raises(Interrupted):
            train(*args, **kwargs)


def host_routed_states(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Any]:
    """Replace `module.routed` by a wrapper that asserts each batch's route ids come from the host (as collated, on
    the CPU) and keeps the routing state of every batch; returns the list it fills."""
    from loramix.train.step import routed

    states: list[Any] = []

    @contextlib.contextmanager
    def spying(model: Any, batch: Any, host_ids: Any = None) -> Iterator[Any]:
        assert host_ids is not None and host_ids.device.type == "cpu"
        with routed(model, batch, host_ids) as state:
            states.append(state)
            yield state

    monkeypatch.setattr(module, "routed", spying)
    return states
