"""The auto-selector's options: which values each takes and which go together (:func:`check_options`), how its
saved tensors name its rules, and what a selector saved by an earlier version lacks, filled in so that it decides as
it did when it was saved (:meth:`AutoSelector.load_state`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loramix.errors import ConfigError

NORMALIZE = ("l2", "whiten", "gaussian")  # saved by index: append only
CHOICES = ("own", "shared")  # saved by index: append only
THRESHOLDS = ("task", "pooled")
ACCEPT_STATES = ("base", "route")


def check_options(
    in_features: int,
    *,
    percentile: float,
    normalize: str,
    shrinkage: float,
    accept_width: int,
    threshold: str,
    neighbours: int,
    choice: str,
    accept_state: str,
) -> None:
    """Refuse, by name, an option out of range or one that needs another (most need the `gaussian` rule)."""
    if not 0 < percentile <= 100:
        raise ConfigError(f"percentile must lie in (0, 100], got {percentile}")
    if normalize not in NORMALIZE:
        raise ConfigError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if not 0 < shrinkage <= 1:
        raise ConfigError(f"shrinkage must lie in (0, 1], got {shrinkage}")
    if accept_width and (normalize != "gaussian" or not 0 < accept_width < in_features):
        raise ConfigError(
            f"accept_width {accept_width}: a separate acceptance stage needs the gaussian rule and fewer "
            f"columns than the {in_features} features"
        )
    if threshold not in THRESHOLDS or (threshold == "pooled" and normalize != "gaussian"):
        raise ConfigError(
            f"threshold must be one of {THRESHOLDS} ('pooled' with the gaussian rule only), got {threshold!r} "
            f"with {normalize!r}"
        )
    if neighbours < 0 or (neighbours and normalize != "gaussian"):
        raise ConfigError(
            f"neighbours {neighbours}: acceptance by the k-th nearest neighbour needs k >= 0 and the gaussian "
            f"rule, which chooses the task (got {normalize!r})"
        )
    if choice not in CHOICES or (choice == "shared" and normalize != "gaussian"):
        raise ConfigError(
            f"choice must be one of {CHOICES} ('shared' with the gaussian rule only), got {choice!r} with "
            f"{normalize!r}"
        )
    if accept_state not in ACCEPT_STATES or (accept_state == "route" and not accept_width):
        raise ConfigError(
            f"accept_state must be one of {ACCEPT_STATES} ('route' with an acceptance stage of its own: "
            f"accept_width > 0), got {accept_state!r} with accept_width {accept_width}"
        )


def upgrade(state: dict[str, Tensor], in_features: int) -> dict[str, Tensor]:
    """`state` with what each later rule adds, at the value that leaves the saved selector's decisions unchanged:
    the `l2` rule before `whiten` existed, each task's own threshold before pooling, each task's own Gaussian to
    choose, acceptance on the base's features, Gaussians (not neighbours) to accept, and temperature 1."""
    state = dict(state)
    if "rule" not in state:
        state["rule"] = torch.tensor(NORMALIZE.index("l2"))
        state["log_error_stats"] = torch.zeros(0, 2)
    if "pooled_level" not in state:  # no held-out errors either
        state["pooled_level"] = torch.tensor(0.0)
        state["held_errors"] = torch.full((state["thresholds"].shape[0], 0), math.nan)
    state.setdefault("choice_rule", torch.tensor(CHOICES.index("own")))
    state.setdefault("accept_routed", torch.tensor(False))
    if "neighbours" not in state:
        width = int(state.get("accept_columns", torch.tensor(0))) or in_features
        state.update(
            neighbours=torch.tensor(0),
            bank=torch.zeros(0, 0, width),
            bank_rows=torch.zeros(0, dtype=torch.long),
        )
    tasks, banks = state["thresholds"].shape[0], state["bank_rows"].shape[0]
    if int(state["neighbours"]) and banks != tasks:
        raise ConfigError(
            f"this auto-selector accepts by nearest neighbours but holds fitting features for {banks} of its "
            f"{tasks} tasks"
        )
    # no held-out features: temperature 1, also after tasks are added
    state.setdefault("held_features", torch.zeros(0, 0, in_features))
    return state
