"""A synthetic generative suite: tasks that map the same kind of input, a short string of letters, to different
outputs, so that one shared adapter must serve conflicting rules while an expert per task need not.

Each prompt names its task as a prefix (`"reverse: cafe\\n"`), so every method, learned routers included, can
tell the tasks apart from the input; the response is the transformed string. Small enough that a tiny causal LM
(`model: tiny-gpt2`) learns it from scratch in minutes on two cores.

Example:
    >>> folders = write_generation_suite("runs/gen-demo/data", seed=0)
    >>> [f.name for f in folders]
    ['reverse', 'sort', 'shift', 'rotate']
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from loramix.io.files import atomic_write_bytes

ALPHABET = "abcdefghijkl"
LENGTHS = (3, 6)  # shortest and longest input string


def _shift(text: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in text)


RULES: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "shift": _shift,  # every letter to the next one, l back to a
    "rotate": lambda s: s[1:] + s[0],  # the first letter moves to the end
}


def make_rows(task: str, count: int, rng: random.Random) -> list[dict[str, str]]:
    rule = RULES[task]
    rows = []
    for _ in range(count):
        word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(*LENGTHS)))
        rows.append({"prompt": f"{task}: {word}\n", "response": rule(word)})
    return rows


def write_generation_suite(
    root: str | os.PathLike[str], *, seed: int = 0, train_size: int = 2000, test_size: int = 200
) -> list[Path]:
    """Write each task as `root/<task>/{train,test}.jsonl` with a `meta.json` (`task_type: generation`), laid out
    for `tasks_dir`; test strings never occur in the task's train split. Returns the task folders."""
    root = Path(root)
    folders = []
    for index, task in enumerate(RULES):
        rng = random.Random(seed * 1000 + index)
        test = make_rows(task, test_size, rng)
        seen = {row["prompt"] for row in test}
        train = [row for row in make_rows(task, 2 * train_size, rng) if row["prompt"] not in seen][
            :train_size
        ]
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train), ("test", test)):
            atomic_write_bytes(
                folder / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()
            )
        atomic_write_bytes(folder / "meta.json", json.dumps({"task_type": "generation"}).encode())
        folders.append(folder)
    return folders
