"""How the auto-selector's saved tensors name its rules, and what a selector saved by an earlier version lacks,
filled in so that it decides as it did when it was saved (:meth:`AutoSelector.load_state`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loramix.errors import ConfigError

NORMALIZE = ("l2", "whiten", "gaussian")  # saved by index: append only
CHOICES = ("own", "shared")  # saved by index: append only


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
