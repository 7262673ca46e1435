"""What a continual run's auto-selector costs it, and what its choices would give if mixed. Scores a finished run
with a selector (`continual-mola-grad`, `moe-adapters`) on its test inputs with the same trained experts, routers and
head, every input answered through every learned task's route and through the base, then:

- `selector`: the run's own answers (its route, or the base where the selector keeps the input there);
- `task-id`: each input sent to its own task's route (what the method's `-task-id` variant scores, since training
  never consults the selector);
- `task-id-if-accepted`: the inputs the selector accepts sent to their own task's route, the others kept on the
  base: the best any choice among the accepted inputs' routes (any mixture) could give;
- `base`: every input on the untouched base model;
- `posterior`: each input the selector accepts answered by the mixture of every learned task's answer (class
  probabilities), weighted by the selector's posterior over the tasks (`AutoSelector.posterior`: the tasks'
  Gaussian, or linear discriminant, posteriors at equal priors), as a run with `ddas_mix: posterior` weighs them,
  but each route's answers computed on their own. Inputs it keeps on the base stay there.

It also counts the selector's mistakes and what they cost: inputs routed to another task (how many of them the
routed, the own and the base answer get right), and seen tasks' inputs kept on the base.

    python benchmarks/continual_routing.py RUN_DIR --out benchmarks/results/continual-routing.json
    python benchmarks/continual_routing.py RUN_DIR --speed 9 --out ...   # and what each way of answering costs

RUN_DIR is a finished run, e.g. a `benchmarks/continual.py --work` folder. Writes RUN_DIR/routing.json, and adds it
to the list in `--out`. `--speed ROUNDS` also times the run's own inference on batches of 64 test inputs that mix
the tasks (a seeded shuffle of 320 of them), as `loramix eval` answers them: routed by the selector, routed by it
with `ddas_mix: posterior`, and given the true task ids (the `-task-id` method's answer, the baseline); interleaved
rounds, the median of per-round ratios with its quartiles. Each way is also timed without the head's inference cache
(every batch encoding the class texts it needs again), and against that. `--refit` fits the run's selector again with this version
of the library (checked equal to the saved one): a run saved before the posterior's temperature was calibrated on
held-out features then mixes as a run of this version would. With `--percentile P` the refitted selector accepts up
to percentile P instead of the run's: training never consults the selector, so the `selector` and `posterior` modes
are then the last row of the same run trained with `ddas_percentile: P` (rows before it need the models of their
stages). `--with KEY=VALUE ...` does the same for other selector settings (its own pass's `ddas_tokens` and
`ddas_precision`, say).

    python benchmarks/continual_routing.py RUN_DIR --refit --percentile 99 --out ...
    python benchmarks/continual_routing.py RUN_DIR --refit --with ddas_tokens=null ddas_precision=float32 --out ...
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _results import write_results  # noqa: E402
from _timing import interleaved, ratio_stats  # noqa: E402

from loramix.data import MultiTaskData  # noqa: E402
from loramix.io import read_checkpoint  # noqa: E402
from loramix.methods import get_method  # noqa: E402
from loramix.methods.continual.learner import (  # noqa: E402
    SELECTOR_SETTINGS,
    Learner,
    new_selector,
    saved_selector,
)
from loramix.methods.continual.mixing import probabilities, route_weights  # noqa: E402
from loramix.routers.selector import AutoSelector  # noqa: E402
from loramix.train.run import eval_split, load_trained, make_collator, task_specs  # noqa: E402


@torch.no_grad()
def every_route(learner: Learner, batch: dict, task: int) -> torch.Tensor:
    """`(n, T + 1, L)`: the class probabilities of `task`'s L classes with every input sent through each learned
    task's route (0..T-1) and through the base (T)."""
    heads = learner.model.heads
    n, tasks = batch["input_ids"].shape[0], learner.selector.num_tasks
    start, width = int(heads.offsets[task]), int(heads.num_labels[task])
    answers = []
    for route in range(tasks + 1):
        routes = torch.full((n,), min(route, tasks - 1), dtype=torch.long, device=learner.device)
        keep = torch.full((n,), route == tasks, dtype=torch.bool, device=learner.device)
        answers.append(probabilities(learner, batch, routes, keep)[:, start : start + width])
    return torch.stack(answers, 1).cpu()


@torch.no_grad()
def collect(learner: Learner, split: str) -> list[dict]:
    """Per test input: its task and label, the selector's route and keep-base, the weights `ddas_mix: posterior`
    gives its routes (`route_weights`: the posterior, small weights dropped; zero when kept), and `every_route`."""
    selector, run = learner.selector, learner.run
    rows = []
    for task in learner.data.tasks:
        for batch in learner.batches(
            learner.data.eval_examples(split, task.task_id, run.max_eval_examples), 50
        ):
            features = learner.base_features(batch)
            route, keep = selector(features)
            weights = route_weights(learner, batch, keep, features)
            answers = every_route(learner, batch, task.task_id)
            for i in range(len(route)):
                rows.append(
                    {
                        "task": task.task_id,
                        "label": int(batch["labels"][i]),
                        "route": int(route[i]),
                        "keep": bool(keep[i]),
                        "weights": weights[i].cpu().double().numpy(),
                        "answers": answers[i].numpy(),
                    }
                )
    return rows


def refit(learner: Learner, method, saved: AutoSelector, changes: dict | None = None) -> AutoSelector:
    """The run's auto-selector fitted again from its training inputs by this version of the library, as the run
    fitted it after each task (it reads only the base model, so training does not change it): the same tensors, to
    the bit, as the saved one, which is checked, plus what this version keeps beside them (the held-out features
    that calibrate the posterior's temperature). With `changes` (selector settings: `ddas_percentile`, or
    `ddas_tokens` and `ddas_precision`, which change its features too), also fitted with them in place of the
    run's, which is the one returned; the learner then chooses with them (its `run` changed)."""
    if learner.offset:
        raise SystemExit("--refit: a run that continued another refits only with the earlier run's data")

    def fitted(run) -> AutoSelector:
        learner.run = run
        selector = new_selector(run, learner.backbone)
        for task in range(learner.data.num_tasks):
            selector.add_task(method.task_features(learner, task), seed=run.seed)
        return selector

    replica = fitted(learner.run)
    state = replica.state()
    for key, value in saved.state().items():
        if value.numel() == 0 < state[key].numel():  # kept by this version only
            continue
        if not torch.equal(value, state[key]):
            raise SystemExit(
                f"--refit: the refitted selector's {key} differs from the saved one's (a different --threads than "
                "the run's changes the fitted floats)"
            )
    if not changes:
        return replica
    return fitted(learner.run.model_copy(update=changes))


def speed(learner: Learner, method, split: str, rounds: int) -> dict:
    """Inference on mixed-task batches: the selector's answers, with and without `ddas_mix: posterior`, against
    the true task ids' (the run's `-task-id` variant), each as `Method.answer` gives it; ratios per round."""
    run = learner.run
    examples = [
        e
        for task in learner.data.tasks
        for e in learner.data.eval_examples(split, task.task_id, run.max_eval_examples)
    ]
    order = np.random.default_rng(0).permutation(len(examples))[:320]
    batches = list(learner.batches([examples[i] for i in order], 64))
    by_task_id = get_method(f"{method.name}-task-id")
    settings = {
        "selector": run.model_copy(update={"ddas_mix": "none"}),
        "mixed": run.model_copy(update={"ddas_mix": "posterior"}),
    }
    heads = learner.model.heads

    def answering(name: str, cached: bool = True):
        @torch.inference_mode()
        def call() -> None:
            learner.run = settings.get(name, run)
            with heads.inference_cache() if cached else contextlib.nullcontext():
                for batch in batches:
                    (by_task_id if name == "task-ids" else method).answer(learner, batch)

        return call

    cases = {name: answering(name) for name in ("task-ids", *settings)}
    uncached = {f"{name}-uncached": answering(name, cached=False) for name in ("task-ids", *settings)}
    timings = interleaved(cases | uncached, device=learner.device, rounds=rounds)
    learner.run = run
    return {
        "inputs": len(order),
        "batch": 64,
        "rounds": rounds,
        "seconds_task_ids": sorted(timings.wall["task-ids"])[rounds // 2],
        **{
            f"{name}_vs_task_ids": ratio_stats(timings.wall[name], timings.wall["task-ids"])
            for name in settings
        },
        **{
            f"{name}_uncached_vs_task_ids_uncached": ratio_stats(
                timings.wall[f"{name}-uncached"], timings.wall["task-ids-uncached"]
            )
            for name in settings
        },
        **{
            f"{name}_vs_uncached": ratio_stats(timings.wall[name], timings.wall[f"{name}-uncached"])
            for name in ("task-ids", *settings)
        },
    }


def finished_run(run_dir: Path) -> tuple[Learner, object]:
    """The learner of a finished continual run with an auto-selector, every task learned, in eval mode, and its
    method."""
    run, model, tokenizer, _ = load_trained(run_dir)
    model.eval()
    data = MultiTaskData(task_specs(run))
    method = get_method(run.method)
    if not method.uses_selector:
        raise SystemExit(f"{run_dir}: method {run.method} has no auto-selector")
    learner = Learner(run, data, model, make_collator(run, data, tokenizer))
    learner.learned = [True] * data.num_tasks
    method.mark_learned(learner)
    learner.selector = saved_selector(read_checkpoint(run_dir / "adapter")[1], run_dir)
    return learner, method


def score(rows: list[dict], answer, tasks: int) -> dict:
    right, count = np.zeros(tasks), np.zeros(tasks)
    for row in rows:
        right[row["task"]] += int(np.argmax(answer(row)) == row["label"])
        count[row["task"]] += 1
    accuracy = right / np.maximum(count, 1)
    return {"mean": float(accuracy.mean()), "per_task": accuracy.tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="a JSON list of runs' results to add this one to")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--refit",
        action="store_true",
        help="fit the run's selector again with this version (checked equal to the saved one) and mix by its "
        "posterior, calibrated where this version calibrates it",
    )
    parser.add_argument(
        "--percentile",
        type=float,
        help="with --refit: the selector accepts up to this percentile (ddas_percentile) instead of the run's; as "
        "training never consults the selector, this is the last row of a run trained with it",
    )
    parser.add_argument(
        "--with",
        dest="changes",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="with --refit: other selector settings (ddas_tokens=null, ddas_precision=float32, ...) in place of the "
        "run's, as --percentile",
    )
    parser.add_argument(
        "--speed", type=int, metavar="ROUNDS", help="also time the ways of answering (see above)"
    )
    args = parser.parse_args(argv)
    changes = {"ddas_percentile": args.percentile} if args.percentile is not None else {}
    for pair in args.changes:
        key, sep, value = pair.partition("=")
        if not sep or key not in SELECTOR_SETTINGS:
            parser.error(
                f"--with {pair!r}: expected KEY=VALUE with KEY one of {', '.join(SELECTOR_SETTINGS)}"
            )
        changes[key] = yaml.safe_load(value)
    if changes and not args.refit:
        parser.error("--percentile and --with refit the selector: give --refit too")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    learner, method = finished_run(args.run_dir)
    run, data = learner.run, learner.data
    if learner.selector.normalize != "gaussian":
        parser.error(f"{args.run_dir}: the posterior needs the gaussian rule's likelihoods")
    if args.refit:
        learner.selector = refit(learner, method, learner.selector, changes)
    tasks, base = data.num_tasks, data.num_tasks
    with learner.model.heads.inference_cache():  # as `loramix eval` answers
        rows = collect(learner, eval_split(data))

    modes = {
        "selector": lambda r: r["answers"][base if r["keep"] else r["route"]],
        "task-id": lambda r: r["answers"][r["task"]],
        "task-id-if-accepted": lambda r: r["answers"][base if r["keep"] else r["task"]],
        "base": lambda r: r["answers"][base],
        "posterior": lambda r: r["answers"][base] if r["keep"] else r["weights"] @ r["answers"][:tasks],
    }
    routed_away = [r for r in rows if not r["keep"] and r["route"] != r["task"]]
    kept = [r for r in rows if r["keep"]]

    def right(group: list[dict], pick) -> int:
        return sum(int(np.argmax(r["answers"][pick(r)]) == r["label"]) for r in group)

    results = {
        # an entry of its own for each setting the selector is refitted with
        "run": args.run_dir.name
        + "".join(
            f" {k.removeprefix('ddas_')}={f'{v:g}' if isinstance(v, float) else v}"
            for k, v in changes.items()
        ),
        "method": run.method,
        "seed": run.seed,
        "tasks": data.task_names,
        "modes": {name: score(rows, answer, tasks) for name, answer in modes.items()},
        "routed_to_another_task": {
            "inputs": len(routed_away),
            "right_as_routed": right(routed_away, lambda r: r["route"]),
            "right_by_own_task": right(routed_away, lambda r: r["task"]),
            "right_on_base": right(routed_away, lambda r: base),
        },
        "kept_on_base": {
            "inputs": len(kept),
            "right_on_base": right(kept, lambda r: base),
            "right_by_own_task": right(kept, lambda r: r["task"]),
        },
        "inputs": len(rows),
        "posterior_temperature": float(learner.selector.temperature),
        "refit": args.refit,
        "percentile": float(learner.selector.percentile),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.speed:
        results["speed"] = speed(learner, method, eval_split(data), args.speed)
    write_results(args.run_dir / "routing.json", args.out, results)
    for name, result in results["modes"].items():
        print(
            f"{name:>10}: {100 * result['mean']:.2f}  "
            + " ".join(f"{100 * a:.0f}" for a in result["per_task"])
        )
    print(f"routed to another task: {results['routed_to_another_task']}")
    print(f"kept on the base: {results['kept_on_base']}")
    if args.speed:
        print(f"speed: {results['speed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
