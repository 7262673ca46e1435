"""The auto-selector (DDAS) on the ten real tasks, without training anything: the base model's features of each
task's inputs are computed once (cached), then for the continual order, after each task t the selector is fitted on
tasks 1..t and every task's test inputs are routed. A seen task's inputs should choose their own task (target
>= 90%), a task not learned yet should go to the base model (target >= 80%).

    python benchmarks/ddas_selector.py --threads 1                 # every variant, writes results/ddas-selector.*
    python benchmarks/ddas_selector.py --threads 1 --splits 6 --variants ... --out results/ddas-selector-splits.json
                                                                   # the same on six held-out splits: mean, range
    python benchmarks/ddas_selector.py --threads 1 --variants "gaussian, block-0 features + token stats"
    python benchmarks/ddas_selector.py --threads 1 --bound         # what classifiers that see unseen tasks allow
    python benchmarks/ddas_selector.py --threads 1 --cascade       # a block-0 first stage before the example's

Features: the same train sample `Continual.task_features` takes (`ddas_examples` of the run's training inputs, the
benchmark's `max_train_examples` 2000, seed 0) and the fixed test sample of `max_eval_examples`, tokenised at the
continual benchmark's `max_length` (48); cached under --cache as one `.pt` per task.

Legend: n samples, d feature width, T tasks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from loramix.methods.continual.features import STATS  # noqa: E402

ROOT = Path(__file__).resolve().parent
ORDER = ["ag_news", "sst2", "trec", "emotion", "sms_spam", "subj", "banking77", "cola", "mrpc", "rte"]


FEATURES = {  # name -> (ddas_features, ddas_layer)
    "embeddings": ("embeddings", 0),
    "hidden0": ("hidden", 0),
    "hidden1": ("hidden", 1),
    "hidden3": ("hidden", 3),
    "hidden6": ("hidden", 6),
}
# name -> (features, AutoSelector options, add_task options, how the harness changes it)
AE = {"normalize": "whiten"}  # the autoencoders on whitened features (the library default before `gaussian`)
REFERENCE = (
    "whiten, block-3 features + token stats, log-z"  # the autoencoder variant the others change one thing of
)
DEFAULT = "gaussian, block-0 features + token stats"  # the library's default
# `ddas_accept_layer: 3`: block 3's features (with the token stats) decide acceptance, blocks 0 and 3 the task
TWO_STAGE = "gaussian, block 3 accepts, blocks 0 + 3 choose"
TWO_STAGE_POOLED = "gaussian, block 3 accepts (pooled threshold), blocks 0 + 3 choose"
POOLED = {"normalize": "gaussian", "threshold": "pooled"}
NEIGHBOURS = "neighbours: block 3's 5th nearest accepts (pooled), blocks 0 + 3 choose"
SHARED = {"normalize": "gaussian", "choice": "shared"}
SHARED_NEIGHBOURS = (
    "shared choice: block 3's 3rd nearest accepts (pooled, percentile 94), blocks 0 + 3 choose"
)
EXAMPLE = "shared choice: block 3's 3rd nearest accepts (pooled, percentile 94.5), blocks 0 + 3 choose"  # the example configs' selector
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {
    "paper: input embeddings, l2, err/thr": ("embeddings", {"normalize": "l2"}, {}, ""),
    "l2 rule, block-3 features + token stats": ("hidden3", {"normalize": "l2"}, {}, ""),
    "whiten, input embeddings": ("embeddings", AE, {}, ""),
    "whiten, block-0 features + token stats": ("hidden0", AE, {}, ""),
    "whiten, block-3 features, no token stats": ("hidden3", AE, {}, "no-stats"),
    "whiten, block-6 (last) features + token stats": ("hidden6", AE, {}, ""),
    REFERENCE: ("hidden3", AE, {}, ""),
    "whiten block-3, err/thr to choose the task": ("hidden3", AE, {}, "ratio"),
    "whiten block-3, percentile 90": ("hidden3", {**AE, "percentile": 90.0}, {}, ""),
    "whiten block-3, percentile 99": ("hidden3", {**AE, "percentile": 99.0}, {}, ""),
    "whiten block-3, shrinkage 0.01": ("hidden3", {**AE, "shrinkage": 0.01}, {}, ""),
    "whiten block-3, shrinkage 0.5": ("hidden3", {**AE, "shrinkage": 0.5}, {}, ""),
    "whiten block-3, autoencoder width 16": ("hidden3", {**AE, "hidden": 16}, {}, ""),
    "whiten block-3, denoising (noise 0.5)": ("hidden3", AE, {"noise": 0.5}, ""),
    "whiten block-3, 50 epochs": ("hidden3", AE, {"epochs": 50}, ""),
    DEFAULT: ("hidden0", {"normalize": "gaussian"}, {}, ""),
    "gaussian, block-3 features + token stats": ("hidden3", {"normalize": "gaussian"}, {}, ""),
    "gaussian, block-6 (last) features + token stats": ("hidden6", {"normalize": "gaussian"}, {}, ""),
    "gaussian, block-0, percentile 99": ("hidden0", {"normalize": "gaussian", "percentile": 99.0}, {}, ""),
    "gaussian, block-0, shrinkage 0.3": ("hidden0", {"normalize": "gaussian", "shrinkage": 0.3}, {}, ""),
    "gaussian, block-0, shrinkage 0.01": ("hidden0", {"normalize": "gaussian", "shrinkage": 0.01}, {}, ""),
    "gaussian, block-0, percentile 90": ("hidden0", {"normalize": "gaussian", "percentile": 90.0}, {}, ""),
    TWO_STAGE: ("hidden0+3", {"normalize": "gaussian"}, {}, ""),
    "gaussian, block-1 features + token stats": ("hidden1", {"normalize": "gaussian"}, {}, ""),
    "gaussian, block 1 accepts, blocks 0 + 1 choose": ("hidden0+1", {"normalize": "gaussian"}, {}, ""),
    # `ddas_threshold: pooled`: one acceptance level, a percentile of every learned task's held-out errors
    "gaussian, block-0, pooled threshold": ("hidden0", POOLED, {}, ""),
    "gaussian, block-3, pooled threshold": ("hidden3", POOLED, {}, ""),
    TWO_STAGE_POOLED: ("hidden0+3", POOLED, {}, ""),
    "gaussian, block 3 accepts (pooled), shrinkage 0.03": (
        "hidden0+3",
        {**POOLED, "shrinkage": 0.03},
        {},
        "",
    ),
    "gaussian, block 3 accepts (pooled), percentile 93": (
        "hidden0+3",
        {**POOLED, "percentile": 93.0},
        {},
        "",
    ),
    "gaussian, block 1 accepts (pooled), blocks 0 + 1 choose": ("hidden0+1", POOLED, {}, ""),
    # `ddas_neighbours: k`: the distance to the k-th nearest of a task's fitting features decides acceptance
    NEIGHBOURS: ("hidden0+3", {**POOLED, "neighbours": 5}, {}, ""),
    "neighbours: block 3's 3rd nearest accepts (pooled), blocks 0 + 3 choose": (
        "hidden0+3",
        {**POOLED, "neighbours": 3},
        {},
        "",
    ),
    "neighbours: block 3's 10th nearest accepts (pooled), blocks 0 + 3 choose": (
        "hidden0+3",
        {**POOLED, "neighbours": 10},
        {},
        "",
    ),
    "neighbours: block 3's 5th nearest accepts (each task's threshold), blocks 0 + 3 choose": (
        "hidden0+3",
        {"normalize": "gaussian", "neighbours": 5},
        {},
        "",
    ),
    "neighbours: block 0's 5th nearest accepts (pooled)": ("hidden0", {**POOLED, "neighbours": 5}, {}, ""),
    "neighbours: block 3's 3rd nearest accepts (pooled, percentile 94), blocks 0 + 3 choose": (
        "hidden0+3",
        {**POOLED, "neighbours": 3, "percentile": 94.0},
        {},
        "",
    ),
    # `ddas_choice: shared`: the task is the nearest mean under one covariance shared by the learned tasks
    "shared choice: gaussian, block-0 features + token stats": ("hidden0", {**SHARED}, {}, ""),
    "shared choice: gaussian, block 3 accepts (pooled), blocks 0 + 3 choose": (
        "hidden0+3",
        {**POOLED, **SHARED},
        {},
        "",
    ),
    "shared choice: block 3's 3rd nearest accepts (pooled), blocks 0 + 3 choose": (
        "hidden0+3",
        {**POOLED, **SHARED, "neighbours": 3},
        {},
        "",
    ),
    SHARED_NEIGHBOURS: ("hidden0+3", {**POOLED, **SHARED, "neighbours": 3, "percentile": 94.0}, {}, ""),
    EXAMPLE: (
        "hidden0+3",
        {**POOLED, **SHARED, "neighbours": 3, "percentile": 94.5},
        {},
        "",
    ),
    "shared choice: block 1's 3rd nearest accepts (pooled, percentile 94), blocks 0 + 1 choose": (
        "hidden0+1",
        {**POOLED, **SHARED, "neighbours": 3, "percentile": 94.0},
        {},
        "",
    ),
}
# the variants whose rows after each task and confusion the markdown shows
DETAILED = (
    REFERENCE,
    DEFAULT,
    "gaussian, block-3 features + token stats",
    TWO_STAGE,
    TWO_STAGE_POOLED,
    NEIGHBOURS,
    SHARED_NEIGHBOURS,
)


def harness_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """`(data, model, collate)`: the ten tasks as a continual run reads them, the frozen MiniLM and its collator."""
    from loramix.data import MultiTaskData, TextCollator
    from loramix.models import load_backbone
    from loramix.train.config import RunConfig
    from loramix.train.run import task_specs

    run = RunConfig.from_dict(
        {
            "method": "moe-adapters",
            "model": "minilm",
            "tasks_dir": str(args.data),
            "tasks": ORDER,
            "head": "label-prompt",
            "steps": 1,
            "steps_per_task": 1,
            "max_train_examples": args.max_train,
            "max_eval_examples": args.max_eval,
            "max_length": args.max_length,
            "seed": args.seed,
        }
    )
    model, tokenizer = load_backbone("minilm")
    model.eval()
    return MultiTaskData(task_specs(run)), model, TextCollator(tokenizer, max_length=args.max_length)


def task_examples(data: Any, name: str, args: argparse.Namespace) -> dict[str, list]:
    """A task's fitting sample (as `Continual.task_features` draws it) and its fixed test sample."""
    task = data.task_names.index(name)
    own = [e for e in data.split("train") if e.task == task]
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(len(own), size=min(len(own), args.train_examples), replace=False)
    return {
        "train": [own[i] for i in sorted(chosen)],
        "test": data.eval_examples("test", task, args.max_eval),
    }


@torch.no_grad()
def task_features(args: argparse.Namespace) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """`features[task][split][kind]`, each `(n, d)`, computed by the library's `selector_features` for every kind
    of `FEATURES` (cached: one file per task)."""
    from loramix.methods.continual.features import selector_features

    out: dict[str, Any] = {}
    if any(not (args.cache / f"{t}.pt").is_file() for t in ORDER):
        data, model, collate = harness_inputs(args)
    for name in ORDER:
        path = args.cache / f"{name}.pt"
        if path.is_file():
            out[name] = torch.load(path, weights_only=True)
            continue
        started = time.perf_counter()
        splits = task_examples(data, name, args)
        out[name] = {}
        for split, examples in splits.items():
            kinds: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURES}
            for start in range(0, len(examples), 64):
                batch = collate(examples[start : start + 64])
                for kind, (features, layer) in FEATURES.items():
                    kinds[kind].append(selector_features(model, batch, features, layer))
            out[name][split] = {k: torch.cat(v) for k, v in kinds.items()}
        args.cache.mkdir(parents=True, exist_ok=True)
        torch.save(out[name], path)
        print(f"features of {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def picked(features: dict, task: str, split: str, kind: str) -> torch.Tensor:
    """One kind of feature of a task's split; `hidden0+k`: the library's two-block layout (block 0's pooled state,
    then block k's, then the token statistics)."""
    if kind.startswith("hidden0+"):
        later = features[task][split]["hidden" + kind.split("+")[1]]
        return torch.cat([features[task][split]["hidden0"][:, :-STATS], later], 1)
    return features[task][split][kind]


def measure(features: dict, name: str, seed: int) -> dict[str, Any]:
    """One variant over the sequence: an autoencoder per task (each depends on its own task only, so the
    selector after task t is the first t of them), every task's test inputs routed after each task."""
    kind, _, fit_options, change = VARIANTS[name]
    started = time.perf_counter()
    full, pick = fitted(features, VARIANTS[name], seed)
    if change == "ratio":  # without the held-out log-error statistics the selector chooses by err / thr
        full.log_error_stats = full.log_error_stats[:0]
    test = torch.cat([pick(task, "test") for task in ORDER])  # (n, d)
    labels = torch.cat([torch.full((len(pick(t, "test")),), i) for i, t in enumerate(ORDER)])
    own_rates, base_rates, rows = [], [], []
    for learned in range(1, len(ORDER) + 1):
        chosen, keep = learned_only(full, learned)(test)
        seen = labels < learned
        own = float(((chosen == labels) & ~keep)[seen].float().mean())
        base = float(keep[~seen].float().mean()) if (~seen).any() else None
        own_rates.append(own)
        base_rates.append(base)
        rows.append({"learned": learned, "own_task_rate": own, "base_rate_unlearned": base})
    confusion = np.zeros((len(ORDER), len(ORDER) + 1), dtype=int)
    np.add.at(confusion, (labels.numpy(), torch.where(keep, len(ORDER), chosen).numpy()), 1)
    # acceptance[i][j]: the share of task j's test inputs that task i's own threshold accepts, whatever the others do
    accepted = (full.accept_errors(test) <= full.acceptance_thresholds()).float()  # (n, T)
    acceptance = [
        [float(accepted[labels == j, i].mean()) for j in range(len(ORDER))] for i in range(len(ORDER))
    ]
    unseen = [b for b in base_rates if b is not None]
    return {
        "variant": name,
        "features": kind,
        "options": {**full.options, **fit_options, **({"change": change} if change else {})},
        "own_task_mean": float(np.mean(own_rates)),
        "own_task_last": own_rates[-1],
        "own_task_min": min(own_rates),
        "unseen_base_mean": float(np.mean(unseen)),
        "unseen_base_min": min(unseen),
        "rows": rows,
        "confusion_after_all": confusion.tolist(),
        "acceptance": acceptance,
        "seconds": round(time.perf_counter() - started, 1),
    }


def fitted(features: dict, variant: tuple, seed: int) -> tuple[Any, Any]:
    """A variant's selector (a value of `VARIANTS`) fitted on all ten tasks in order, and the function that picks
    its feature of a task's split; the selector after task t is its first t tasks (`learned_only`)."""
    from loramix.routers.selector import AutoSelector

    kind, options, fit_options, change = variant

    def pick(task: str, split: str) -> torch.Tensor:
        x = picked(features, task, split, kind)
        return x[:, :-STATS] if change == "no-stats" else x

    if kind.startswith("hidden0+"):
        later = "hidden" + kind.split("+")[1]
        options = {**options, "accept_width": features[ORDER[0]]["train"][later].shape[1]}
    selector = AutoSelector(pick(ORDER[0], "train").shape[1], **options)
    for task in ORDER:
        selector.add_task(pick(task, "train"), seed=seed, **fit_options)
    selector.options = options
    return selector, pick


def learned_only(full: Any, learned: int) -> Any:
    """The selector `full` as it was after its first `learned` tasks."""
    from loramix.routers.selector import AutoSelector

    selector = AutoSelector(full.in_features, **full.options)
    selector.load_state({k: v[:learned] if v.dim() and k != "rule" else v for k, v in full.state().items()})
    return selector


CASCADE_FIRST = {  # first stages: block 0 alone, accepting at a lower pooled percentile than the second stage
    "block 0's Gaussian": {"normalize": "gaussian", "threshold": "pooled", "choice": "shared"},
    "block 0's 3rd nearest": {
        "normalize": "gaussian",
        "threshold": "pooled",
        "choice": "shared",
        "neighbours": 3,
    },
}


def cascade(features: dict, seed: int) -> list[dict[str, Any]]:
    """A cheaper way to the example config's selector with experts in every block: block 0's features (the
    embeddings' output, free in the pass) decide the inputs a first stage accepts at a low percentile, which then
    need no pass through blocks 0-2 of the base model; the others go to the example config's selector. Reported:
    the rates over the sequence, and the share of the ten learned tasks' test inputs that still need the second
    stage (the part of that pass inference pays for, about 0.49 of a pass on MiniLM with 22 experts a block)."""
    second, pick = fitted(features, VARIANTS[SHARED_NEIGHBOURS], seed)
    test = torch.cat([pick(t, "test") for t in ORDER])
    test0 = torch.cat([picked(features, t, "test", "hidden0") for t in ORDER])
    labels = torch.cat([torch.full((len(pick(t, "test")),), i) for i, t in enumerate(ORDER)])
    steps = range(1, len(ORDER) + 1)
    later = [learned_only(second, learned)(test) for learned in steps]  # the second stage's answers, once
    out = []
    for first_name, options in CASCADE_FIRST.items():
        for percentile in (50.0, 60.0, 70.0, 80.0):
            first = fitted(features, ("hidden0", {**options, "percentile": percentile}, {}, ""), seed)[0]
            own, unseen, stage_two = [], [], 0.0
            for learned, (chosen, keep) in zip(steps, later):
                early, early_keep = learned_only(first, learned)(test0)
                # the first stage's acceptances stand; the rest take the second stage's answer
                accepted = ~early_keep
                chosen, keep = torch.where(accepted, early, chosen), keep & ~accepted
                seen = labels < learned
                own.append(float(((chosen == labels) & ~keep)[seen].float().mean()))
                if (~seen).any():
                    unseen.append(float(keep[~seen].float().mean()))
                stage_two = float(early_keep.float().mean())
            out.append(
                {
                    "first_stage": first_name,
                    "percentile": percentile,
                    "own_task_mean": float(np.mean(own)),
                    "unseen_base_mean": float(np.mean(unseen)),
                    "second_stage_after_ten": stage_two,
                }
            )
    return out


def supervised_bound(features: dict, kind: str, model: str, seed: int) -> dict[str, Any]:
    """How well the features could send unseen inputs to the base if the selector knew the unseen tasks: after
    each task t, a classifier trained on both sides (tasks 1..t against t+1..10, their training features, the
    sides weighted equally; what no selector has) keeps 95% of the learned tasks' held-out inputs, and the share
    of unseen test inputs it rejects is the rate it allows. `model`: logistic regression or a one-hidden-layer
    MLP (256 units, early stopping), on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    train = {t: picked(features, t, "train", kind).double().numpy() for t in ORDER}
    test = {t: picked(features, t, "test", kind).double().numpy() for t in ORDER}
    held_out = {t: rng.permutation(len(train[t]))[: len(train[t]) // 5] for t in ORDER}
    fitted = {t: np.setdiff1d(np.arange(len(train[t])), held_out[t]) for t in ORDER}
    rates = []
    for learned in range(1, len(ORDER)):
        seen, unseen = ORDER[:learned], ORDER[learned:]
        x_seen = np.concatenate([train[t][fitted[t]] for t in seen])
        x_unseen = np.concatenate([train[t][fitted[t]] for t in unseen])
        x = np.concatenate([x_seen, x_unseen])
        y = np.r_[np.ones(len(x_seen)), np.zeros(len(x_unseen))]
        scaler = StandardScaler().fit(x)
        if model == "logistic":
            weights = np.r_[
                np.full(len(x_seen), 0.5 / len(x_seen)), np.full(len(x_unseen), 0.5 / len(x_unseen))
            ]
            classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(x), y, weights * len(x))
        else:
            classifier = MLPClassifier((256,), early_stopping=True, random_state=seed, max_iter=300)
            classifier.fit(scaler.transform(x), y)
        held = np.concatenate([train[t][held_out[t]] for t in seen])
        threshold = np.percentile(classifier.predict_proba(scaler.transform(held))[:, 1], 5)
        rejected = [classifier.predict_proba(scaler.transform(test[t]))[:, 1] < threshold for t in unseen]
        rates.append(float(np.mean([r.mean() for r in rejected])))
    return {"features": kind, "model": model, "unseen_base_mean": float(np.mean(rates)), "rows": rates}


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# DDAS auto-selector on the ten tasks (no training: base-model features only)",
        "",
        f"Order {', '.join(ORDER)}; {args.train_examples} training inputs per task (a fifth held out for the "
        f"threshold), {args.max_eval} test inputs per task, MiniLM, max_length {args.max_length}. Own-task: a seen "
        "task's test inputs routed to their own task (mean over the ten rows; last row; worst row). Unseen→base: "
        "inputs of tasks not learned yet sent to the base model (mean over rows 1–9; worst row). Targets: own "
        "≥ 90%, unseen→base ≥ 80%.",
        "",
        "| variant | own mean | own last | own min | unseen→base mean | unseen→base min |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {100 * r['own_task_mean']:.1f} | {100 * r['own_task_last']:.1f} | "
            f"{100 * r['own_task_min']:.1f} | {100 * r['unseen_base_mean']:.1f} | {100 * r['unseen_base_min']:.1f} |"
        )
    split = [r for r in results if "over_splits" in r]
    if split:
        count = len(split[0]["over_splits"]["seeds"])
        lines += [
            "",
            f"Over {count} held-out splits (each task's fifth held out for its threshold drawn with seeds "
            f"{', '.join(map(str, split[0]['over_splits']['seeds']))}; the rows above are the first): the mean, "
            "then the range. The split alone moves a variant's unseen→base rate by a few points.",
            "",
            "| variant | own mean | own range | unseen→base mean | unseen→base range |",
            "|---|---|---|---|---|",
        ]
        for r in split:
            own, unseen = (100 * np.array(r["over_splits"][k]) for k in ("own_task_mean", "unseen_base_mean"))
            lines.append(
                f"| {r['variant']} | {own.mean():.1f} | {own.min():.1f}-{own.max():.1f} | {unseen.mean():.1f} | "
                f"{unseen.min():.1f}-{unseen.max():.1f} |"
            )
    for shown in [r for r in results if r["variant"] in DETAILED]:
        name = shown["variant"]
        lines += ["", f"{name}, after each task (own-task %, unseen→base %):", ""]
        lines += [
            f"- after {ORDER[r['learned'] - 1]}: {100 * r['own_task_rate']:.1f}, "
            + ("-" if r["base_rate_unlearned"] is None else f"{100 * r['base_rate_unlearned']:.1f}")
            for r in shown["rows"]
        ]
        lines += [
            "",
            f"{name}, confusion after all ten (rows: true task; columns: chosen task, then base):",
            "",
        ]
        lines += ["| | " + " | ".join(ORDER) + " | base |", "|---" * (len(ORDER) + 2) + "|"]
        lines += [
            f"| {t} | " + " | ".join(map(str, row)) + " |"
            for t, row in zip(ORDER, shown["confusion_after_all"])
        ]
        lines += [
            "",
            f"{name}, which task accepts which (rows: the task whose threshold is applied; columns: the task whose "
            "test inputs it sees; % accepted, all ten fitted). An input goes to the base only when no learned task "
            "accepts it, so one broad task that accepts a later task's inputs keeps them from the base:",
            "",
        ]
        lines += ["| | " + " | ".join(ORDER) + " |", "|---" * (len(ORDER) + 1) + "|"]
        lines += [
            f"| {t} | " + " | ".join(f"{100 * a:.0f}" for a in row) + " |"
            for t, row in zip(ORDER, shown["acceptance"])
        ]
    return "\n".join(lines) + "\n"


def harness_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every use of the harness's features takes (`harness_inputs`, `task_features`, the splits)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument(
        "--train-examples", type=int, default=1000, help="ddas_examples: inputs fitted per task"
    )
    parser.add_argument("--max-eval", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/loramix-ddas-selector"))
    parser.add_argument(
        "--splits",
        type=int,
        default=1,
        help="also fit each variant on this many held-out splits in all (seeds --seed, --seed + 1, ...) and report "
        "the mean and range of its rates over them",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = harness_parser(__doc__)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ddas-selector.json")
    parser.add_argument(
        "--bound",
        action="store_true",
        help="only the supervised bound on unseen->base (classifiers that see the unseen tasks); writes "
        "results/ddas-selector-bound.json",
    )
    parser.add_argument(
        "--cascade",
        action="store_true",
        help="only the example config's selector behind a block-0 first stage; writes "
        "results/ddas-selector-cascade.json",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    features = task_features(args)
    if args.cascade:
        from loramix.io.files import atomic_write_json

        rows = cascade(features, args.seed)
        for r in rows:
            print(
                f"{r['first_stage']} at {r['percentile']:.0f}: own {100 * r['own_task_mean']:.1f}, unseen->base "
                f"{100 * r['unseen_base_mean']:.1f}, second stage for {100 * r['second_stage_after_ten']:.1f}% "
                "after ten"
            )
        atomic_write_json(args.out.with_name("ddas-selector-cascade.json"), rows)
        return 0
    if args.bound:
        from loramix.io.files import atomic_write_json

        bounds = []
        for kind in ("hidden0", "hidden3", "hidden0+3"):
            for model in ("logistic", "mlp"):
                bounds.append(supervised_bound(features, kind, model, args.seed))
                rows = " ".join(f"{100 * r:.0f}" for r in bounds[-1]["rows"])
                print(
                    f"{kind} {model}: unseen->base {100 * bounds[-1]['unseen_base_mean']:.1f} (rows {rows})"
                )
        atomic_write_json(args.out.with_name("ddas-selector-bound.json"), bounds)
        return 0
    results = []
    for name in args.variants:
        results.append(measure(features, name, args.seed))
        r = results[-1]
        if args.splits > 1:  # the same variant on other held-out fifths: how much the split alone moves it
            others = [measure(features, name, args.seed + k) for k in range(1, args.splits)]
            r["over_splits"] = {
                "seeds": list(range(args.seed, args.seed + args.splits)),
                "own_task_mean": [r["own_task_mean"]] + [o["own_task_mean"] for o in others],
                "unseen_base_mean": [r["unseen_base_mean"]] + [o["unseen_base_mean"] for o in others],
            }
        spread = ""
        if "over_splits" in r:
            own, unseen = (np.mean(r["over_splits"][k]) for k in ("own_task_mean", "unseen_base_mean"))
            spread = f"; over {args.splits} splits own {100 * own:.1f}, unseen->base {100 * unseen:.1f}"
        print(
            f"{name}: own {100 * r['own_task_mean']:.1f} (last {100 * r['own_task_last']:.1f}), unseen->base "
            f"{100 * r['unseen_base_mean']:.1f} (min {100 * r['unseen_base_min']:.1f}){spread} [{r['seconds']} s]",
            flush=True,
        )
    from loramix.io.files import atomic_write_json

    atomic_write_json(args.out, {"order": ORDER, "train_examples": args.train_examples, "results": results})
    args.out.with_suffix(".md").write_text(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
