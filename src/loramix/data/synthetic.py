"""Draft v1 (experiment)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POSITIVE = [
    "happy",
    "brave",
    "kind",
    "bright",
    "gentle",
    "cheerful",
    "calm",
    "clever",
    "lovely",
    "proud",
    "friendly",
    "graceful",
    "honest",
    "merry",
    "polite",
    "lucky",
]
NEGATIVE = [
    "sad",
    "angry",
    "cruel",
    "gloomy",
    "nasty",
    "lazy",
    "rude",
    "bitter",
    "grumpy",
    "awful",
    "wicked",
    "sick",
    "greedy",
    "nervous",
    "sloppy",
    "mean",
]
KINDS = {
    "animal": ["dog", "cat", "horse", "fox", "rabbit", "goat", "owl", "wolf", "mouse", "bear"],
    "person": [
        "farmer",
        "teacher",
        "doctor",
        "child",
        "sailor",
        "baker",
        "soldier",
        "poet",
        "nurse",
        "pilot",
    ],
    "vehicle": ["truck", "bus", "boat", "car", "train", "bike", "wagon", "tractor", "van", "ship"],
    "food": ["apple", "bread", "cake", "cheese", "soup", "pie", "melon", "carrot", "onion", "cookie"],
    "plant": ["tree", "rose", "fern", "tulip", "oak", "cactus", "lily", "bush", "pine", "daisy"],
    "tool": ["hammer", "shovel", "ladder", "rope", "bucket", "saw", "drill", "brush", "axe", "wrench"],
}
KIND_NAMES = list(KINDS)
LIVING = {"animal", "person", "plant"}
VERBS = [
    ("chases", "chased"),
    ("watches", "watched"),
    ("follows", "followed"),
    ("greets", "greeted"),
    ("pushes", "pushed"),
    ("finds", "found"),
    ("ignores", "ignored"),
    ("visits", "visited"),
    ("carries", "carried"),
    ("blocks", "blocked"),
]
PLACES = [
    "river",
    "market",
    "school",
    "forest",
    "bridge",
    "station",
    "garden",
    "harbor",
    "church",
    "mountain",
    "village",
    "castle",
    "field",
    "lake",
    "tower",
    "beach",
]
TIMES = ["at dawn", "at noon", "at night", "today", "in winter", "on sunday"]


@dataclass
class Scene:
    agent_adj: str
    agent: str
    verb: int
    patient_adj: str
    patient: str
    place_adj: str
    place: str
    passive: bool
    time: str | None

    def text(self) -> str:
        active, participle = VERBS[self.verb]
        agent = f"the {self.agent_adj} {self.agent}"
        patient = f"the {self.patient_adj} {self.patient}"
        core = f"{patient} was {participle} by {agent}" if self.passive else f"{agent} {active} {patient}"
        text = f"{core} near the {self.place_adj} {self.place}"
        return f"{text} {self.time}" if self.time else text


KIND_OF = {noun: kind for kind, nouns in KINDS.items() for noun in nouns}


def negative(adj: str) -> bool:
    return adj in NEGATIVE


def sample_scene(rng: random.Random) -> Scene:
    def adj() -> str:
        return rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE)

    def noun() -> str:
        return rng.choice(KINDS[rng.choice(KIND_NAMES)])

    return Scene(
        adj(),
        noun(),
        rng.randrange(len(VERBS)),
        adj(),
        noun(),
        adj(),
        rng.choice(PLACES),
        rng.random() < 0.5,
        rng.choice(TIMES) if rng.random() < 0.5 else None,
    )


def _first_mood(s: Scene) -> int:
    return int(negative(s.patient_adj if s.passive else s.agent_adj))


def _agent_mood(s: Scene) -> int:
    return int(negative(s.agent_adj))


def _patient_kind(s: Scene) -> int:
    return KIND_NAMES.index(KIND_OF[s.patient])


def _kinship(s: Scene) -> int:
    a, b = KIND_OF[s.agent], KIND_OF[s.patient]
    if a == b:
        return 0
    return 1 if (a in LIVING) == (b in LIVING) else 2


def _negativity(s: Scene) -> int:
    return sum(negative(a) for a in (s.agent_adj, s.patient_adj, s.place_adj))


def _mood_match(s: Scene) -> int:
    return int(negative(s.agent_adj) != negative(s.patient_adj))


def _time(s: Scene) -> int:
    if s.time is None:
        return 0
    return 1 + (TIMES.index(s.time) % 3 == 2)


@dataclass
class SyntheticTask:
    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


_TASKS: list[tuple[str, list[str], int, Callable[[Scene], int]]] = [
    ("agent_mood", ["positive", "negative"], 1500, _agent_mood),
    ("patient_kind", KIND_NAMES, 3000, _patient_kind),
    ("negativity", ["zero", "one", "two", "three"], 2000, _negativity),
    ("kinship", ["same", "same_realm", "different_realm"], 1200, _kinship),
    ("mood_match", ["agree", "disagree"], 800, _mood_match),
    ("time", ["none", "a", "b"], 300, _time),
]
TEST_SIZE = 400
LABEL_NOISE = 0.08


def make_suite(seed: int = 0, scale: float = 1.0) -> list[SyntheticTask]:
    tasks = []
    for index, (name, labels, size, rule) in enumerate(_TASKS):
        rng = random.Random(f"{seed}/{index}/{name}")
        n_train, n_test = max(len(labels), round(size * scale)), max(len(labels), round(TEST_SIZE * scale))
        seen: set[str] = set()
        rows: list[tuple[str, int]] = []
        want = n_train + n_test
        while len(rows) < want:
            target = len(rows) % len(labels)
            while True:
                scene = sample_scene(rng)
                if rule(scene) == target:
                    break
            text = scene.text()
            if text in seen:
                continue
            seen.add(text)
            label = target
            if rng.random() < LABEL_NOISE:
                label = rng.choice([k for k in range(len(labels)) if k != target])
            rows.append((text, label))
        rng.shuffle(rows)
        tasks.append(SyntheticTask(name, list(labels), rows[:n_train], rows[n_train:]))
    return tasks


def write_suite(directory, seed=0, scale=1.0):
    out = []
    for task in make_suite(seed, scale):
        d = Path(directory) / task.name
        d.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", task.train), ("test", task.test)):
            with open(d / f"{split}.jsonl", "w") as f:
                for text, label in rows:
                    f.write(json.dumps({"text": text, "label": label}) + "\n")
        (d / "meta.json").write_text(json.dumps({"labels": task.labels}))
        out.append(d)
    return out
