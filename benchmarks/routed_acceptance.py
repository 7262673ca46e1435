"""Routed acceptance (`ddas_accept_state: route`) replayed on a finished run with experts in every block.

The auto-selector of a continual run reads the base model's states entering blocks 0 and 3 (`ddas_layer: 0`,
`ddas_accept_layer: 3`). With experts only in blocks 3-5 both states come free inside the inference pass
(`routed_by_selector`); with experts in every block the state entering block 3 differs from the base model's, so a
base pass through blocks 0-2 must come first, and routing costs about 1.3-1.5x the task ids' pass. Routed
acceptance needs no base pass (`loramix.methods.continual.routed`):

- **choose** the task from the state entering block 0 alone (the embeddings' output: the same on every route), by
  the shared-covariance rule (`ddas_choice: shared`) fitted on the base features of each task's training inputs;
- **accept** by the state entering the acceptance block (`ddas_accept_layer`, 3 here) *of the routed pass*
  itself: its distance to its 3rd nearest neighbour among the chosen task's own training inputs, each taken through
  that task's expert to that block, against the pooled 94th percentile of those distances on held-out training
  inputs (`ddas_threshold: pooled`, `ddas_neighbours: 3`, `ddas_percentile: 94`, as the run's selector accepts);
- inputs it rejects are answered again on the base model (a second pass for them alone).

Every task's expert is frozen after its task, so the final model answers every stage of the sequence as it did
then: stage k's selector is fitted on tasks 0..k and the accuracy matrix is rebuilt from every test input's answer
through every route (`continual_routing.every_route`). The run's own selector is rebuilt the same way (`current`),
and its matrix (mixed or hard, as the run answered) is checked against the one the run wrote (`metrics.json`),
which validates the replay. For each rule: the ZSCL metrics of the hard answer and of the posterior mixture
(weights from the choosing features; an input is mixed when its chosen route accepts it), how often seen tasks'
inputs reach their own task and unseen tasks' inputs the base, and, on the final model, inference time on mixed
batches of 64 against the true task ids, interleaved rounds. The library's own answer with routed acceptance (the
final stage's selector, `method.answer`) is checked to give the replay's routes, base decisions and answers, hard
and mixed. Blending (`ddas_mix: blend`: one pass whose layers mix the tasks' experts by the posterior) needs a pass
of its own, so it is scored on the final model only (the last row, Last), by the library's answer.
`--percentiles` replays both rules again with other acceptance percentiles: how many inputs the selectors keep on
the base trades unseen tasks' inputs sent there against learned tasks' inputs answered by their experts. The test
inputs' features and answers through every route, and each task's fitting features, are kept in RUN_DIR
(`routed-replay.safetensors`, named by the run's weights and settings), so a second replay costs minutes.

    python benchmarks/routed_acceptance.py RUN_DIR --out benchmarks/results/routed-acceptance.json --speed 9
    python benchmarks/routed_acceptance.py RUN_DIR --out benchmarks/results/routed-acceptance.json --speed-only 15
    python benchmarks/routed_acceptance.py RUN_DIR --out ... --percentiles 94 95 96 97 98 99 100

RUN_DIR: a `benchmarks/continual.py --methods continual-mola-grad` run folder with experts in every block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _results import write_results  # noqa: E402
from _timing import interleaved, ratio_stats  # noqa: E402
from continual_routing import every_route, finished_run  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from loramix.methods import get_method  # noqa: E402
from loramix.methods.continual.features import (  # noqa: E402
    base_hidden_states,
    hidden_features,
)
from loramix.methods.continual.learner import Learner, new_selector  # noqa: E402
from loramix.methods.continual.mixing import floored  # noqa: E402
from loramix.methods.continual.report import continual_metrics  # noqa: E402
from loramix.methods.continual.routed import model_inputs  # noqa: E402
from loramix.routers.selector import AutoSelector  # noqa: E402
from loramix.train.run import eval_split  # noqa: E402

CHOOSE = 0  # the block whose input state chooses: before every expert, when experts sit in every block
REPLAY_CACHE = "routed-replay.safetensors"  # the replay's inputs, kept in the run's folder (`replay_inputs`)


def states_entering(learner: Learner, batch: dict, route: torch.Tensor | None) -> list[torch.Tensor]:
    """The states `(n, t, d)` entering block CHOOSE and the run's acceptance block (`ddas_accept_layer`) of the pass
    along `route` (None: the base model); the pass stops there."""
    layers = [CHOOSE, learner.run.ddas_accept_layer]
    return base_hidden_states(learner.backbone, model_inputs(batch), layers, route)


@torch.no_grad()
def features(learner: Learner, batch: dict, routes: list[int]) -> dict[str, torch.Tensor]:
    """`choose (n, d+3)`: the base state entering block 0; `current (n, 2d+3)`: the run's selector's feature (base
    states entering blocks 0 and the acceptance block); `accept (n, R, d+3)`: the state entering the acceptance block
    through each of `routes`."""
    n = batch["input_ids"].shape[0]
    base0, base_later = states_entering(learner, batch, None)
    accept = []
    for route in routes:
        _, routed_later = states_entering(learner, batch, torch.full((n,), route, device=learner.device))
        accept.append(hidden_features(batch, [routed_later]))
    return {
        "choose": hidden_features(batch, [base0]).cpu(),
        "current": hidden_features(batch, [base0, base_later]).cpu(),
        "accept": torch.stack(accept, 1).cpu(),
    }


def on_route(answers: torch.Tensor, route: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`(n, L)`: each input's answer along its route, or the base's (the last route) where it is kept there."""
    base = answers.shape[1] - 1
    return answers[torch.arange(len(route)), torch.where(keep, torch.full_like(route, base), route)]


def decisions(rule: str, selectors: dict, test: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(route (n,), keep (n,), posterior weights (n, T))` of every test input under `rule`."""
    if rule == "current":
        selector = selectors["current"]
        route, keep = selector(test["current"])
        return route, keep, floored(selector.posterior(test["current"]))
    selector = selectors["routed"]
    route, keep = selector(routed_features(selector, test))
    return route, keep, floored(selector.posterior(test["choose"]))


def routed_features(selector: AutoSelector, test: dict) -> torch.Tensor:
    """`(n, 2d+6)`: each input's choice feature, then its acceptance feature through the route chosen on it."""
    route = selector.choice_scores(test["choose"]).argmin(-1)
    return torch.cat([test["choose"], test["accept"][torch.arange(len(route)), route]], 1)


def stage_scores(route, keep, weights, answers, labels, task_of, tasks: int, seen: int) -> dict:
    """Per task accuracy of the hard and mixed answers, and the routing rates, with `seen` tasks learned."""
    base = answers.shape[1] - 1
    hard = on_route(answers, route, keep)
    mix = torch.einsum("nt,ntl->nl", weights.double(), answers[:, : weights.shape[1]].double())
    mixed = torch.where(keep[:, None], answers[:, base].double(), mix)
    rows = {}
    for name, probs in (("hard", hard), ("mixed", mixed)):
        right = (probs.argmax(-1) == labels).double()
        rows[name] = [float(right[task_of == t].mean()) for t in range(tasks)]
    is_seen = task_of < seen
    own = (~keep & (route == task_of))[is_seen]
    unseen_base = keep[~is_seen]
    rows["own_rate"] = float(own.double().mean()) if is_seen.any() else None
    rows["unseen_to_base_rate"] = float(unseen_base.double().mean()) if (~is_seen).any() else None
    return rows


def new_selectors(learner: Learner, percentile: float | None = None) -> dict[str, AutoSelector]:
    """The run's selector (`current`) and routed acceptance's (`routed`), with no task learned yet; `percentile`
    replaces the run's acceptance percentile (`ddas_percentile`) in both."""
    run = learner.run
    if percentile is not None:
        run = run.model_copy(update={"ddas_percentile": percentile})
    return {
        "current": new_selector(run, learner.backbone),
        "routed": new_selector(run.model_copy(update={"ddas_accept_state": "route"}), learner.backbone),
    }


def task_fits(learner: Learner, method) -> list[dict[str, torch.Tensor]]:
    """Each task's fitting features for both selectors, as the run fitted its own after that task: the base
    features (`current`) and the choosing feature with the acceptance block's state along the task's own route
    (`routed`)."""
    fits = []
    for task in range(learner.data.num_tasks):
        parts: dict[str, list] = {"choose": [], "current": [], "accept": []}
        for batch in learner.batches(method.task_examples(learner, task), 64):
            for key, value in features(learner, batch, [task]).items():
                parts[key].append(value)
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        fits.append(
            {
                "current": tensors["current"],
                "routed": torch.cat([tensors["choose"], tensors["accept"][:, 0]], 1),
            }
        )
    return fits


def add_task(selectors: dict, fit: dict[str, torch.Tensor], seed: int) -> None:
    """Both selectors fitted on one more task's features (`task_fits`)."""
    for rule, selector in selectors.items():
        selector.add_task(fit[rule], seed=seed)


def check_rebuilt(learner: Learner, selectors: dict, run_dir: Path) -> None:
    """Stop unless the rebuilt `current` selector is the one the run saved, tensor for tensor."""
    replica = selectors["current"].state()
    if any(not torch.equal(v, replica[k]) for k, v in learner.selector.state().items() if v.numel()):
        raise SystemExit(f"{run_dir}: the rebuilt selector differs from the run's")


def answering(learner: Learner, selectors: dict, rule: str, mix: str) -> Learner:
    """The learner set to answer by `rule`'s final selector (`current` or `routed`), mixed or not."""
    update = {"ddas_mix": mix, "ddas_accept_state": "route" if rule == "routed" else "base"}
    learner.run, learner.selector = learner.run.model_copy(update=update), selectors[rule]
    return learner


def library_agrees(learner: Learner, method, selectors: dict, test: dict) -> dict:
    """How often the library's answer with routed acceptance on the final model (one pass along the chosen route,
    the rejected inputs again on the base) gives the replay's route, keep-base decision and answer, hard and mixed
    (the replay reads each route's states in passes of their own)."""
    route, keep, weights = decisions("routed", selectors, test)
    replay = {"hard": on_route(test["answers"], route, keep).argmax(-1)}
    mix = torch.einsum("nt,ntl->nl", weights.double(), test["answers"][:, : weights.shape[1]].double())
    replay["mixed"] = torch.where(keep[:, None], test["answers"][:, -1].double(), mix).argmax(-1)
    got: dict[str, list] = {"route": [], "keep": [], "hard": [], "mixed": []}
    run, split = learner.run, eval_split(learner.data)
    with learner.model.heads.inference_cache():
        for task in learner.data.tasks:
            for batch in learner.batches(
                learner.data.eval_examples(split, task.task_id, run.max_eval_examples), 50
            ):
                for mix, name in (("none", "hard"), ("posterior", "mixed")):
                    answer = method.answer(answering(learner, selectors, "routed", mix), batch)
                    got[name].append(answer[3].labels.cpu())
                got["route"].append(answer[0].cpu())
                got["keep"].append(answer[1].cpu())
    learner.run = run
    got = {k: torch.cat(v) for k, v in got.items()}
    return {
        "route": float((got["route"] == route).double().mean()),
        "keep": float((got["keep"] == keep).double().mean()),
        **{name: float((got[name].long() == replay[name]).double().mean()) for name in ("hard", "mixed")},
    }


@torch.no_grad()
def blended_last(learner: Learner, method, selectors: dict) -> dict:
    """Each task's accuracy on the final model with every task learned (the last row), answered by the library with
    `ddas_mix: blend` (one pass whose layers mix the tasks' experts by the posterior) under each selector; blending
    needs a pass of its own, so the replay's per-route answers cannot give it."""
    run, split = learner.run, eval_split(learner.data)
    rows: dict[str, list[float]] = {"current": [], "routed": []}
    with learner.model.heads.inference_cache():
        for task in learner.data.tasks:
            right = dict.fromkeys(rows, 0)
            examples = learner.data.eval_examples(split, task.task_id, run.max_eval_examples)
            for batch in learner.batches(examples, 50):
                for rule in rows:
                    answer = method.answer(answering(learner, selectors, rule, "blend"), batch)
                    right[rule] += int((answer[3].labels.cpu().long() == batch["labels"].cpu()).sum())
            for rule in rows:
                rows[rule].append(right[rule] / len(examples))
    learner.run = run
    return {
        rule: {"last_row": row, "Last": round(100 * float(np.mean(row)), 2)} for rule, row in rows.items()
    }


def speed(learner: Learner, method, selectors: dict, rounds: int) -> dict:
    """The final model's answers on mixed batches: the run's selector (a base pass first) and routed acceptance,
    each hard, mixed by the posterior and blended, against the true task ids (the baseline); each within the head's
    inference cache."""
    run, own = learner.run, learner.selector
    examples = [
        e
        for task in learner.data.tasks
        for e in learner.data.eval_examples(eval_split(learner.data), task.task_id, run.max_eval_examples)
    ]
    order = np.random.default_rng(0).permutation(len(examples))[:320]
    batches = list(learner.batches([examples[i] for i in order], 64))
    by_task_id = get_method(f"{method.name}-task-id")
    heads = learner.model.heads
    cases = {  # name: (selector, ddas_mix)
        "current": ("current", "none"),
        "routed-acceptance": ("routed", "none"),
        "current-mixed": ("current", "posterior"),
        "routed-acceptance-mixed": ("routed", "posterior"),
        "current-blend": ("current", "blend"),
        "routed-acceptance-blend": ("routed", "blend"),
    }

    def case(name: str):
        @torch.inference_mode()
        def call() -> None:
            answering(learner, selectors, *cases.get(name, ("current", "none")))
            with heads.inference_cache():
                for batch in batches:
                    (by_task_id if name == "task-ids" else method).answer(learner, batch)

        return call

    timings = interleaved(
        {name: case(name) for name in ("task-ids", *cases)}, device=learner.device, rounds=rounds
    )
    learner.run, learner.selector = run, own
    return {
        "inputs": len(order),
        "batch": 64,
        "rounds": rounds,
        **{
            f"{name}_vs_task_ids": ratio_stats(timings.wall[name], timings.wall["task-ids"]) for name in cases
        },
    }


def fingerprint(run_dir: Path) -> str:
    """What the replay's inputs depend on: the run's saved weights and its settings."""
    digest = hashlib.sha256()
    for name in ("adapter/adapters.safetensors", "config.yaml"):
        digest.update((run_dir / name).read_bytes())
    return digest.hexdigest()


def eval_inputs(learner: Learner) -> dict[str, torch.Tensor]:
    """Every test input's selector features (`features`, through every route), its answer through every route and
    through the base (`answers (n, T + 1, L)`, padded to the widest task), its label and its task."""
    tasks, split, run = learner.data.num_tasks, eval_split(learner.data), learner.run
    test: dict[str, list] = {k: [] for k in ("choose", "current", "accept", "answers", "labels", "task")}
    width = max(int(w) for w in learner.model.heads.num_labels)
    with learner.model.heads.inference_cache():
        for task in learner.data.tasks:
            for batch in learner.batches(
                learner.data.eval_examples(split, task.task_id, run.max_eval_examples), 50
            ):
                for key, value in features(learner, batch, list(range(tasks))).items():
                    test[key].append(value)
                answers = every_route(learner, batch, task.task_id)  # (n, T + 1, L_task)
                test["answers"].append(torch.nn.functional.pad(answers, (0, width - answers.shape[2])))
                test["labels"].append(batch["labels"].cpu())
                test["task"].append(batch["task_ids"].cpu())
    return {k: torch.cat(v) for k, v in test.items()}


def kept_inputs(run_dir: Path, tasks: int, key: str | None = None) -> tuple[dict, list[dict]] | None:
    """The replay's inputs kept in RUN_DIR (`replay_inputs`), or None where none were kept for this run's weights
    and settings (`key`: the run's `fingerprint`, when already computed)."""
    cache = run_dir / REPLAY_CACHE
    if not cache.exists():
        return None
    with safe_open(cache, "pt") as handle:
        if (handle.metadata() or {}).get("fingerprint") != (key or fingerprint(run_dir)):
            return None
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    test = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("test.")}
    fits = [{rule: tensors[f"fit.{task}.{rule}"] for rule in ("current", "routed")} for task in range(tasks)]
    return test, fits


def replay_inputs(learner: Learner, method, run_dir: Path) -> tuple[dict, list[dict]]:
    """`eval_inputs` and `task_fits`, computed once and kept in RUN_DIR (a safetensors file named by the run's
    fingerprint), so that replaying again at other percentiles costs minutes."""
    key = fingerprint(run_dir)
    kept = kept_inputs(run_dir, learner.data.num_tasks, key)
    if kept is not None:
        return kept
    test, fits = eval_inputs(learner), task_fits(learner, method)
    tensors = {f"test.{k}": v.contiguous() for k, v in test.items()}
    tensors.update(
        {f"fit.{t}.{rule}": v.contiguous() for t, fit in enumerate(fits) for rule, v in fit.items()}
    )
    partial = (run_dir / REPLAY_CACHE).with_suffix(".partial")
    save_file(tensors, partial, metadata={"fingerprint": key})
    os.replace(partial, run_dir / REPLAY_CACHE)
    return test, fits


def replay(selectors: dict, fits: list[dict], test: dict, seed: int) -> tuple[dict, dict]:
    """The accuracy matrices (`{rule}-hard`, `{rule}-mixed`) and routing rates of both rules, stage by stage: stage
    k's selectors fitted on tasks 0..k."""
    tasks, n = len(fits), len(test["task"])
    matrices: dict[str, list] = {f"{rule}-{answer}": [] for rule in selectors for answer in ("hard", "mixed")}
    rates: dict[str, list] = {rule: [] for rule in selectors}
    on_base = (torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool), torch.zeros(n, 1))
    zero = stage_scores(*on_base, test["answers"], test["labels"], test["task"], tasks, 0)
    for rows in matrices.values():
        rows.append(zero["hard"])
    for task in range(tasks):
        add_task(selectors, fits[task], seed)
        for rule in rates:
            route, keep, weights = decisions(rule, selectors, test)
            scores = stage_scores(
                route, keep, weights, test["answers"], test["labels"], test["task"], tasks, task + 1
            )
            matrices[f"{rule}-hard"].append(scores["hard"])
            matrices[f"{rule}-mixed"].append(scores["mixed"])
            rates[rule].append({k: scores[k] for k in ("own_rate", "unseen_to_base_rate")})
    return matrices, rates


def summary(matrices: dict, rates: dict) -> dict:
    """The ZSCL metrics of every matrix (in %) and the mean routing rates (unseen ones over the stages that have
    unseen tasks)."""
    return {
        "metrics": {
            name: {k: round(100 * v, 2) for k, v in continual_metrics(np.array(rows)).items()}
            for name, rows in matrices.items()
        },
        "mean_own_rate": {
            rule: float(np.mean([r["own_rate"] for r in rows])) for rule, rows in rates.items()
        },
        "mean_unseen_to_base_rate": {
            rule: float(np.mean([r["unseen_to_base_rate"] for r in rows[:-1]]))
            for rule, rows in rates.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="a JSON list of runs' results to add this one to")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed", type=int, metavar="ROUNDS", help="also time the ways of answering")
    parser.add_argument(
        "--speed-only",
        type=int,
        metavar="ROUNDS",
        help="only time the ways of answering, with the final selectors alone fitted (minutes, not the replay's "
        "half hour); the timings replace those of the run's earlier replay (its routed-acceptance.json)",
    )
    parser.add_argument(
        "--percentiles",
        type=float,
        nargs="+",
        metavar="P",
        help="also replay both rules with each of these acceptance percentiles (ddas_percentile) in place of the "
        "run's",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    earlier = args.run_dir / "routed-acceptance.json"
    if args.speed_only and not earlier.exists():
        parser.error(f"{args.run_dir}: --speed-only refreshes a replay's timings; replay the run first")
    learner, method = finished_run(args.run_dir)
    run, data = learner.run, learner.data
    if run.method != "continual-mola-grad" or run.layers_to_transform is not None:
        parser.error(f"{args.run_dir}: needs a continual-mola-grad run with experts in every block")
    if run.ddas_layer != CHOOSE or run.ddas_accept_layer in (None, CHOOSE):
        parser.error(
            f"{args.run_dir}: the run's selector must read block {CHOOSE} and a later acceptance block"
        )
    if args.speed_only:
        selectors = new_selectors(learner)
        kept = kept_inputs(args.run_dir, data.num_tasks)
        for fit in task_fits(learner, method) if kept is None else kept[1]:
            add_task(selectors, fit, run.seed)
        check_rebuilt(learner, selectors, args.run_dir)
        results = {
            **json.loads(earlier.read_text()),
            "speed": speed(learner, method, selectors, args.speed_only),
        }
        write_results(earlier, args.out, results)
        print(f"speed: {results['speed']}")
        return 0
    test, fits = replay_inputs(learner, method, args.run_dir)
    print(f"test features: {time.perf_counter() - started:.0f} s", flush=True)
    selectors = new_selectors(learner)
    matrices, rates = replay(selectors, fits, test, run.seed)
    check_rebuilt(learner, selectors, args.run_dir)
    saved = json.loads((args.run_dir / "metrics.json").read_text())
    run_matrix = np.array(saved["accuracy_matrix"])
    as_run = "current-mixed" if run.ddas_mix == "posterior" else "current-hard"  # how the run answered
    results = {
        "run": args.run_dir.name,
        "seed": run.seed,
        "tasks": data.task_names,
        **summary(matrices, rates),
        "matrices": matrices,
        "rates": rates,
        "replay_vs_run_max_difference": float(np.abs(np.array(matrices[as_run]) - run_matrix).max()),
    }
    results["library_agrees"] = library_agrees(learner, method, selectors, test)
    results["blend"] = blended_last(learner, method, selectors)
    if args.percentiles:
        results["percentiles"] = {
            str(p): summary(*replay(new_selectors(learner, p), fits, test, run.seed))
            for p in args.percentiles
        }
    if args.speed:
        results["speed"] = speed(learner, method, selectors, args.speed)
    elif earlier.exists() and "speed" in (kept := json.loads(earlier.read_text())):
        results["speed"] = kept["speed"]  # the same final model's timings
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_results(earlier, args.out, results)
    for name, values in results["metrics"].items():
        print(f"{name:>15}: {values}")
    print(f"own rate {results['mean_own_rate']}, unseen to base {results['mean_unseen_to_base_rate']}")
    print(f"replay vs run: {results['replay_vs_run_max_difference']}")
    print(f"the library's answer agrees with the replay: {results['library_agrees']}")
    print(f"blended, Last: { ({rule: v['Last'] for rule, v in results['blend'].items()}) }")
    for p, values in results.get("percentiles", {}).items():
        print(f"percentile {p}: {values}")
    if args.speed:
        print(f"speed: {results['speed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
