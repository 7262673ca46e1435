"""What every expert kind shares: stacked parameters (one tensor per role, experts along dim 0), per-expert
freezing that survives any optimizer, growth in place, and a registry of kinds.

A kind is one class with its stacked parameters, its batched op (`forward`) and its plain loop reference
(`loop_reference`), plus one entry in :data:`EXPERT_KINDS`. Adapted layers receive a bank built by its kind's
`from_config`; they never build experts themselves.

Legend: n samples, t tokens, e experts, i / o in / out features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from loramix.frozen_rows import FrozenRows

if TYPE_CHECKING:
    from loramix.config import AdapterConfig
    from loramix.routers.gate import Gate

Dropout = Callable[[Tensor], Tensor]


class StackedExperts(FrozenRows):
    """Base of expert banks: E experts whose parameters are stacked along dim 0 (rows are experts).

    `stacked` names the parameters that hold one slice per expert (or one slice shared by all, when their first
    dimension is 1). Freezing comes from :class:`~loramix.frozen_rows.FrozenRows`: a frozen expert stays
    bit-identical whatever the optimizer does.
    """

    loramix_role: ClassVar[str] = "expert"
    kind: ClassVar[str] = ""
    mergeable: ClassVar[bool] = (
        False  # whether a fixed mixture folds into the base weight (merge, PEFT export)
    )
    # the adapter config's fields this kind never reads (`loramix inspect` leaves them out)
    unread: ClassVar[tuple[str, ...]] = ("adapter_scale",)

    num_experts: int
    in_features: int
    out_features: int

    @property
    def num_rows(self) -> int:
        return self.num_experts

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int, out_features: int) -> StackedExperts:
        raise NotImplementedError

    @staticmethod
    def scaling_of(config: AdapterConfig) -> float:
        """The scale s this kind applies, from the config."""
        return config.alpha / (config.rank**0.5 if config.rslora else config.rank)

    def forward(self, x: Tensor, gate: Gate | None, scaling: float, dropout: Dropout) -> Tensor:
        """The mixture `s * sum_e g_e E_e(x)`: x `(n, t, i)` (or `(..., i)` without a gate) -> `(n, t, o)`."""
        raise NotImplementedError

    def loop_reference(self, x: Tensor, gate: Tensor, scaling: float) -> Tensor:
        """The same mixture one expert at a time (tests only). gate `(n, e)`, `(n, t, e)` or long `(n,)`."""
        raise NotImplementedError

    def reset_rows(self, rows: slice) -> None:
        """Initialise the given experts' slices (a new expert starts as 'add nothing')."""
        raise NotImplementedError

    def freeze_experts(self, experts: list[int] | Tensor) -> None:
        """Freeze the given experts: they keep their values and get no gradient (a shared slice stays trainable;
        freeze it with `requires_grad_(False)`)."""
        self.freeze_rows(experts)

    def copy_expert(self, source: int, target: int) -> None:
        """Start expert `target` as a copy of expert `source` (its kept values when frozen); a shared slice stays
        shared."""
        self.copy_row(source, target)

    def unfreeze_experts(self, experts: list[int] | Tensor | None = None) -> None:
        """Make experts trainable again, writing their frozen values back into the parameters."""
        self.unfreeze_rows(experts)

    @property
    def frozen_experts(self) -> list[int]:
        return self.frozen_rows

    def grow(self, num_experts: int) -> None:
        """Add experts in place: old ones keep their exact values and frozen state, new ones add nothing. The
        parameters are new tensors: build the optimizer after growing."""
        self.grow_rows(num_experts, keep_shared=getattr(self, "share", "none"))
        self.num_experts = num_experts


EXPERT_KINDS: dict[str, type[StackedExperts]] = {}


def register_expert_kind(cls: type[StackedExperts]) -> type[StackedExperts]:
    """Class decorator: make an expert kind available to configs by its `kind` name."""
    EXPERT_KINDS[cls.kind] = cls
    return cls


def build_experts(config: AdapterConfig, in_features: int, out_features: int) -> StackedExperts:
    """The bank of `config.experts` kind for one layer."""
    return EXPERT_KINDS[config.experts].from_config(config, in_features, out_features)
