"""The adapter configuration: one flat, typed, validated record, round-trippable to JSON and YAML.

Every field is documented once, here. A wrong field fails at construction with the field's name and what is
allowed (a :class:`~loramix.errors.ConfigError`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loramix.errors import ConfigError

RouterKind = Literal["none", "task", "poly", "token", "sample"]
ShareKind = Literal["none", "A", "B"]


class AdapterConfig(BaseModel):
    """How experts are injected into a model and how they are routed.

    Example:
        >>> cfg = AdapterConfig(num_experts=4, rank=8, router="task", num_tasks=4, targets=["query", "value"])
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int = Field(1, ge=1, description="E, the number of experts in every adapted layer.")
    rank: int = Field(8, ge=1, description="r, the rank of each expert.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: s = alpha / r (or alpha / sqrt(r)).")
    rslora: bool = Field(False, description="Use s = alpha / sqrt(r) (rank-stabilised LoRA).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the r-dimensional adapter hidden.")
    share: ShareKind = Field("none", description="'A': one A for all experts (MoSLD, HydraLoRA); 'B': one B.")
    shared_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the shared matrix in training.")
    targets: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt: an exact name or a dotted suffix; 'all-linear' for every Linear/Conv1D.",
    )
    target_regex: str | None = Field(
        None, description="A regex that module names must fully match (instead of targets)."
    )
    exclude: list[str] = Field(
        default_factory=list, description="Names or suffixes never adapted (e.g. heads)."
    )
    router: RouterKind = Field(
        "none",
        description="'none': one expert, gate of ones (plain LoRA); 'task': hard routing by task id (MoLA-Grad); "
        "'poly': learned per-task table per layer (Poly/MHR); 'token': per-layer, per-token router; "
        "'sample': one router for the whole model on the pooled input (MoLA-Router).",
    )
    num_tasks: int | None = Field(None, ge=1, description="Number of task ids (needed by 'task' and 'poly').")
    task_to_expert: list[int] | None = Field(None, description="Expert index of each task (router 'task').")
    top_k: int | None = Field(
        None, ge=1, description="Keep the k largest gates and renormalise (token, sample)."
    )
    noisy: bool = Field(False, description="Add Gaussian noise to router logits in training (noisy top-k).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of learned routers.")
    router_hidden: int = Field(64, ge=1, description="Hidden width of the sample router's MLP.")
    router_input: str | None = Field(
        None,
        description="Module whose output the sample router pools; default: the model's input embeddings.",
    )
    train_backbone: bool = Field(
        False, description="Train the base weights jointly (MoLA does); else frozen."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules (heads) trained in full and saved with the adapters."
    )

    @field_validator("target_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AdapterConfig:
        if self.router == "none" and self.num_experts != 1:
            raise ValueError("router 'none' gives a plain LoRA and needs num_experts=1")
        if self.router in ("task", "poly") and self.num_tasks is None:
            raise ValueError(f"router '{self.router}' needs num_tasks")
        if self.task_to_expert is not None:
            if self.router != "task":
                raise ValueError("task_to_expert is only used with router 'task'")
            if len(self.task_to_expert) != self.num_tasks:
                raise ValueError(
                    f"task_to_expert has {len(self.task_to_expert)} entries but num_tasks is {self.num_tasks}"
                )
            bad = [e for e in self.task_to_expert if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"task_to_expert names experts {bad} outside 0..{self.num_experts - 1}")
        elif self.router == "task" and self.num_tasks != self.num_experts:
            raise ValueError(
                f"router 'task' with num_tasks={self.num_tasks} != num_experts={self.num_experts} needs task_to_expert"
            )
        if self.top_k is not None:
            if self.router not in ("token", "sample"):
                raise ValueError("top_k is only used with routers 'token' and 'sample'")
            if self.top_k > self.num_experts:
                raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.targets != "all-linear" and not self.targets and self.target_regex is None:
            raise ValueError(
                "targets is empty: name at least one module, use 'all-linear', or set target_regex"
            )
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Validate a plain dict (from JSON or YAML); errors name each bad field and what is allowed."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "adapter config")) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line per problem: `field: message (got value)`."""
    lines = [f"invalid {where}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {field}: {err['msg']}{shown}")
    return "\n".join(lines)
