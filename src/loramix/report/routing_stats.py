"""What did the router learn? Summaries of recorded gates against the task each sample came from.

Every function here is pure numpy / scikit-learn and returns plain JSON-able Python (lists, floats, None), so the
result can go straight into `metrics.json` and `loramix.report.write_report`.

Legend: n samples, e experts, t tasks, l layers.

Thresholds behind the warnings (module constants, so a test or a caller can read them):

- `COLLAPSE_SHARE = 0.8`: with more than one expert, one expert is the argmax of more than 80 % of samples.
  A balanced router over e experts gives each about 1/e, so 80 % means the others are nearly idle.
- `UNUSED_GATE_FRACTION = 0.1`: an expert is "never used" when it is the argmax of no sample *and* its mean gate
  is below 0.1 / e, a tenth of its uniform share (a soft router may still mix in an expert that never wins).
  An expert that wins no sample but keeps a larger mean gate is reported as "never the top choice" (when there are
  at least as many samples as experts, so that every expert could have won one).
- `UNIFORM_ENTROPY = 0.95`: with more than one expert, a normalised gate entropy of 0.95 or more means the gates
  are close to uniform: the router mixes every expert nearly equally and has not specialised. (Over 8 experts, a
  gate that gives its top expert 0.3, 2.4 times its uniform share, and the rest alike is just below 0.95.)
- `FLAT_SPREAD = 0.05`: `spread` is the mean over samples of the total-variation distance between a sample's gate
  and the mean gate (0: every input gets the same gate; a router that sends each input to its own expert is near
  1 - 1/e). Below 0.05 the router gives every input nearly the same mixture: it routes nothing, and the experts act
  as one LoRA.
- `TASK_BLIND_NMI = 0.05`: near-uniform gates (above) whose top expert shares less than 0.05 normalised mutual
  information with the task also route nothing: what little the gate varies does not follow the tasks.
  Both "routes nothing" cases give one warning that starts with `ROUTES_NOTHING`, so that a report can raise the
  alarm above the rest.

Why two signals for "routes nothing": a router whose logits do not depend on the input gives the same gate to
every sample, near-uniform or not, and then no expert specialises; the entropy alone misses such a gate when it is
uneven (0.97 of the maximum for 8 experts, 3 of them never chosen), the spread does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import normalized_mutual_info_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from loramix.errors import RoutingError

COLLAPSE_SHARE = 0.8
UNUSED_GATE_FRACTION = 0.1
UNIFORM_ENTROPY = 0.95
FLAT_SPREAD = 0.05
TASK_BLIND_NMI = 0.05
ROUTES_NOTHING = "routes nothing"
PROBE_FOLDS = 5
_TIE_ATOL = 1e-6


def _check_inputs(gates: Any, task_ids: Any, task_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    gates = np.asarray(gates, dtype=np.float64)
    task_ids = np.asarray(task_ids)
    if gates.ndim != 2 or gates.shape[0] == 0 or gates.shape[1] == 0:
        raise RoutingError(
            f"gates must have shape (n, e) with n >= 1 samples and e >= 1 experts, got {gates.shape}; "
            "average per-token gates over tokens first (or use per_layer_summary for several layers)"
        )
    if not np.all(np.isfinite(gates)):
        raise RoutingError(
            "gates contain NaN or infinite values; check the router outputs before summarising"
        )
    if task_ids.shape != (gates.shape[0],):
        raise RoutingError(
            f"task_ids must have shape (n,) = ({gates.shape[0]},) to match gates {gates.shape}, "
            f"got {task_ids.shape}"
        )
    if not np.issubdtype(task_ids.dtype, np.integer):
        if not (np.issubdtype(task_ids.dtype, np.number) and np.all(task_ids == np.round(task_ids))):
            raise RoutingError(f"task_ids must be integer task indices, got dtype {task_ids.dtype}")
        task_ids = task_ids.astype(np.int64)
    if len(task_names) == 0:
        raise RoutingError("task_names is empty; pass one name per task index")
    if task_ids.min() < 0 or task_ids.max() >= len(task_names):
        raise RoutingError(
            f"task_ids must lie in [0, {len(task_names)}) to index task_names {list(task_names)}, "
            f"got values from {task_ids.min()} to {task_ids.max()}"
        )
    return gates, task_ids.astype(np.int64)


def _argmax_share(gates: np.ndarray) -> np.ndarray:
    """Fraction of samples whose argmax is each expert, `(e,)`; a tie splits the sample among the tied experts.

    Splitting ties keeps a constant (for example uniform) gate from looking like a collapse onto expert 0.
    """
    is_top = np.isclose(gates, gates.max(axis=1, keepdims=True), rtol=0.0, atol=_TIE_ATOL)  # (n, e)
    return (is_top / is_top.sum(axis=1, keepdims=True)).mean(axis=0)  # (e,)


def _purity(argmax: np.ndarray, task_ids: np.ndarray, num_experts: int) -> tuple[float, list[int | None]]:
    """Accuracy of the best many-to-one map expert -> task, and that map (None for an expert nobody picks)."""
    num_tasks = int(task_ids.max()) + 1
    counts = np.zeros((num_experts, num_tasks), dtype=np.int64)  # (e, t)
    np.add.at(counts, (argmax, task_ids), 1)
    return count_purity(counts)


def count_purity(counts: np.ndarray) -> tuple[float, list[int | None]]:
    """`_purity` from the counts `(e, t)` of samples of each task whose top expert is each expert (NaN for no
    sample): each expert mapped to the task it took most samples of."""
    expert_task = [int(row.argmax()) if row.sum() > 0 else None for row in counts]
    total = counts.sum()
    return float(counts.max(axis=1).sum() / total) if total else math.nan, expert_task


def _normalised_entropy(gates: np.ndarray) -> float | None:
    """Mean over samples of the gate entropy divided by log e (1 = uniform, 0 = one-hot); None when e == 1.

    Rows are renormalised to sum to one first, so sigmoid or top-k gates are measured as distributions too.
    """
    num_experts = gates.shape[1]
    if num_experts == 1:
        return None
    totals = gates.sum(axis=1, keepdims=True)  # (n, 1)
    probs = np.divide(gates, totals, out=np.zeros_like(gates), where=totals > 0)  # (n, e)
    logs = np.log(probs, out=np.zeros_like(probs), where=probs > 0)
    return float((-(probs * logs).sum(axis=1)).mean() / math.log(num_experts))


def _probe(features: np.ndarray, task_ids: np.ndarray, seed: int) -> tuple[float | None, int]:
    """Stratified k-fold accuracy of a logistic-regression probe features -> task, and the number of folds.

    Tasks with a single sample cannot be both trained on and tested, so they are left out; the number of folds
    drops to the smallest remaining task count (at most PROBE_FOLDS). With fewer than two tasks of two or more
    samples there is nothing to probe and the accuracy is None (folds 0).
    """
    labels, counts = np.unique(task_ids, return_counts=True)
    keep_labels = labels[counts >= 2]
    if len(keep_labels) < 2:
        return None, 0
    keep = np.isin(task_ids, keep_labels)
    folds = int(min(PROBE_FOLDS, counts[counts >= 2].min()))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(probe, features[keep], task_ids[keep], cv=splitter, scoring="accuracy")
    return float(scores.mean()), folds


def _spread(gates: np.ndarray) -> float:
    """Mean over samples of the total-variation distance between a sample's gate and the mean gate, rows
    renormalised to sum to one first (as for the entropy)."""
    totals = gates.sum(axis=1, keepdims=True)  # (n, 1)
    probs = np.divide(gates, totals, out=np.zeros_like(gates), where=totals > 0)  # (n, e)
    mean = probs.mean(axis=0)  # (e,)
    return float(0.5 * np.abs(probs - mean).sum(axis=1).mean())


def _warnings(
    argmax_share: np.ndarray,
    load: np.ndarray,
    entropy: float | None,
    spread: float,
    nmi: float,
    num_samples: int,
) -> list[str]:
    num_experts = len(load)
    found = []
    if num_experts > 1:
        flat = spread < FLAT_SPREAD
        uniform = entropy is not None and entropy >= UNIFORM_ENTROPY
        if flat or (uniform and nmi < TASK_BLIND_NMI):
            reasons = []
            if flat:
                reasons.append(f"every input gets nearly the same gate (spread {spread:.3f} < {FLAT_SPREAD})")
            if uniform:
                reasons.append(f"near-uniform gates (normalised entropy {entropy:.3f} >= {UNIFORM_ENTROPY})")
            reasons.append(f"NMI of the top expert with the task {nmi:.3f}")
            found.append(f"{ROUTES_NOTHING}: {'; '.join(reasons)}; the experts act as one LoRA")
        elif uniform:
            found.append(
                f"near-uniform gates: normalised entropy {entropy:.3f} >= {UNIFORM_ENTROPY}, the router has not "
                "specialised"
            )
        top = int(argmax_share.argmax())
        if argmax_share[top] > COLLAPSE_SHARE:
            found.append(f"collapse: expert {top} takes {100 * argmax_share[top]:.1f}% of samples")
        unused = [
            e
            for e in range(num_experts)
            if argmax_share[e] == 0 and load[e] < UNUSED_GATE_FRACTION / num_experts
        ]
        for expert in unused:
            found.append(f"expert {expert} is never used (mean gate {load[expert]:.4f})")
        unchosen = [e for e in range(num_experts) if argmax_share[e] == 0 and e not in unused]
        if unchosen and num_samples >= num_experts:
            gates = ", ".join(f"{load[e]:.3f}" for e in unchosen)
            found.append(
                f"{len(unchosen)} of {num_experts} experts are never the top choice of any sample: "
                f"{', '.join(map(str, unchosen))} (mean gates {gates})"
            )
    return found


def routing_summary(
    gates: np.ndarray,
    task_ids: np.ndarray,
    task_names: Sequence[str],
    *,
    seed: int = 0,
    probe: bool = True,
    probe_features: np.ndarray | None = None,
) -> dict[str, Any]:
    """Summarise how a router's gates relate to the task of each sample.

    Args:
        gates: `(n, e)` gate per sample and expert (per-token routers: average over tokens first).
        task_ids: `(n,)` integer task index per sample, indexing `task_names`.
        task_names: one name per task index.
        seed: shuffles the probe's folds.
        probe: fit the linear probe; False skips it (`probe_accuracy` is None) for speed.
        probe_features: `(n, f)` features for the probe instead of `gates` (per_layer_summary passes every
            layer's gates side by side).

    Returns:
        A JSON-able dict:
        `task_names`, `num_experts`, `num_samples`, `task_counts` (t,);
        `gate_mean` (t x e): mean gate per task and expert, a row of None for a task without samples;
        `load` (e,): mean gate per expert over all samples;
        `argmax_share` (e,): fraction of samples whose largest gate is each expert (ties split evenly);
        `purity`: accuracy of the best many-to-one map expert -> task (each expert predicts the majority task
        of the samples whose argmax it is); 1.0 when every expert serves one task. Compare with
        `majority_share`, the share of the largest task, which any routing reaches;
        `expert_task` (e,): that map, the task name per expert or None for an expert that is never the argmax;
        `nmi`: normalised mutual information between argmax expert and task (sklearn);
        `probe_accuracy`, `probe_folds`: stratified-k-fold accuracy of a logistic-regression probe gates -> task
        (None / 0 when skipped or when fewer than two tasks have two samples);
        `entropy`: mean gate entropy / log e (None for a single expert);
        `spread`: mean total-variation distance of a sample's gate from the mean gate (0: the same gate for every
        input);
        `warnings`: list of strings, see the module docstring for the thresholds.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> task_ids = rng.integers(0, 2, size=200)
        >>> gates = np.eye(4)[task_ids] * 0.9 + 0.025
        >>> routing_summary(gates, task_ids, ["sst2", "rte"])["purity"]
        1.0
    """
    gates, task_ids = _check_inputs(gates, task_ids, task_names)
    num_samples, num_experts = gates.shape
    num_tasks = len(task_names)
    task_counts = np.bincount(task_ids, minlength=num_tasks)  # (t,)
    gate_mean: list[list[float] | list[None]] = []
    for task in range(num_tasks):
        rows = gates[task_ids == task]  # (n_task, e)
        gate_mean.append(rows.mean(axis=0).tolist() if len(rows) else [None] * num_experts)

    load = gates.mean(axis=0)  # (e,)
    argmax_share = _argmax_share(gates)  # (e,)
    argmax = gates.argmax(axis=1)  # (n,)
    purity, expert_task = _purity(argmax, task_ids, num_experts)
    entropy = _normalised_entropy(gates)
    spread = _spread(gates)
    nmi = float(normalized_mutual_info_score(task_ids, argmax))
    if probe:
        features = gates if probe_features is None else np.asarray(probe_features, dtype=np.float64)
        probe_accuracy, probe_folds = _probe(features, task_ids, seed)
    else:
        probe_accuracy, probe_folds = None, 0

    return {
        "task_names": list(task_names),
        "num_experts": int(num_experts),
        "num_samples": int(num_samples),
        "task_counts": task_counts.tolist(),
        "gate_mean": gate_mean,
        "load": load.tolist(),
        "argmax_share": argmax_share.tolist(),
        "purity": purity,
        "majority_share": float(task_counts.max() / num_samples),
        "expert_task": [None if task is None else task_names[task] for task in expert_task],
        "nmi": nmi,
        "probe_accuracy": probe_accuracy,
        "probe_folds": probe_folds,
        "entropy": entropy,
        "spread": spread,
        "warnings": _warnings(argmax_share, load, entropy, spread, nmi, num_samples),
    }


def per_layer_summary(
    gates_by_layer: Mapping[str, np.ndarray],
    task_ids: np.ndarray,
    task_names: Sequence[str],
    *,
    probe: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """`routing_summary` for every layer of a per-layer (or per-token) router, plus one aggregate summary.

    The aggregate summarises the layer-mean gate `(n, e)` when every layer has the same number of experts, or
    else every layer's gates side by side divided by the number of layers `(n, sum e)` (still a distribution).
    Its probe always runs, on all layers' gates side by side: can the task be read from the routing anywhere?
    Its extra keys `num_layers`, `mean_layer_purity`, `mean_layer_nmi`, `mean_layer_entropy` average the layers,
    and its `warnings` are every layer's, prefixed by the layer name (after one that the router routes nothing when
    every layer routes nothing): the layer-mean gate's own would judge a mixture that no layer computes.

    Args:
        gates_by_layer: layer name -> `(n, e)` gates per sample (per-token gates averaged over tokens).
        task_ids: `(n,)` integer task index per sample.
        task_names: one name per task index.
        probe: also fit a probe per layer (slower); the aggregate probe runs regardless.
        seed: shuffles the probes' folds.

    Returns:
        `{"layers": {layer: routing_summary}, "aggregate": routing_summary + extra keys}`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> task_ids = rng.integers(0, 2, size=100)
        >>> layers = {f"layer{i}": rng.dirichlet(np.ones(4), size=100) for i in range(3)}
        >>> sorted(per_layer_summary(layers, task_ids, ["sst2", "rte"]))
        ['aggregate', 'layers']
    """
    if len(gates_by_layer) == 0:
        raise RoutingError("gates_by_layer is empty; pass at least one layer name -> (n, e) gates")
    layers = {name: _check_inputs(gates, task_ids, task_names)[0] for name, gates in gates_by_layer.items()}
    summaries = {
        name: routing_summary(gates, task_ids, task_names, seed=seed, probe=probe)
        for name, gates in layers.items()
    }
    stacked = list(layers.values())
    side_by_side = np.concatenate(stacked, axis=1)  # (n, sum e)
    if len({gates.shape[1] for gates in stacked}) == 1:
        combined = np.mean(stacked, axis=0)  # (n, e)
    else:
        combined = side_by_side / len(stacked)  # (n, sum e)
    aggregate = routing_summary(combined, task_ids, task_names, seed=seed, probe_features=side_by_side)

    def mean_of(key: str) -> float | None:
        values = [summary[key] for summary in summaries.values() if summary[key] is not None]
        return float(np.mean(values)) if values else None

    aggregate["num_layers"] = len(summaries)
    aggregate["mean_layer_purity"] = mean_of("purity")
    aggregate["mean_layer_nmi"] = mean_of("nmi")
    aggregate["mean_layer_entropy"] = mean_of("entropy")
    if len(summaries) > 1:
        # expert e of one layer is unrelated to expert e of another: the layer-mean gate's own warnings would judge
        # a mixture no layer computes (a mean over layers that each route looks uniform). Only the layers speak,
        # and the aggregate says "routes nothing" when all of them do.
        flat = [
            any(str(w).startswith(ROUTES_NOTHING) for w in summary["warnings"])
            for summary in summaries.values()
        ]
        aggregate["warnings"] = (
            [f"{ROUTES_NOTHING} in any of its {len(summaries)} layers; the experts act as one LoRA"]
            if all(flat)
            else []
        )
    aggregate["warnings"] += [
        f"{name}: {warning}" for name, summary in summaries.items() for warning in summary["warnings"]
    ]
    return {"layers": summaries, "aggregate": aggregate}
