"""The adapter configuration: one flat, typed, validated record, round-trippable to JSON and YAML.

Every field is documented once, here. A wrong field fails at construction with the field's name and what is
allowed (a :class:`~loramix.errors.ConfigError`); a float field takes finite numbers only.

Whether the router and expert kinds it names exist and fit it is checked where a config is built into a model, by
:func:`loramix.kinds.check_kinds` (their registries live in `experts/` and `routers/`, which read this config), so
this module imports no torch and no kind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from loramix.errors import ConfigError, did_you_mean

ShareKind = Literal["none", "A", "B"]


def _as_list(value: object) -> object:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


# transformer block indices: one index or a list of them, as PEFT's `layers_to_transform` takes
BlockIndices = Annotated[list[int] | None, BeforeValidator(_as_list)]


class AdapterConfig(BaseModel):
    """How experts are injected into a model and how they are routed.

    Example:
        >>> cfg = AdapterConfig(num_experts=4, rank=8, router="task", num_tasks=4, targets=["query", "value"])
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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
    layers_to_transform: BlockIndices = Field(
        None,
        description="Adapt only the targets inside these transformer blocks (indices into the model's list of "
        "config.num_hidden_layers blocks, from 0; one index or a list), as PEFT's option of the same name; None: "
        "every target.",
    )
    experts: str = Field(
        "lora",
        description="The expert kind: 'lora' (B A x) or 'adapter' (a bottleneck adapter: s W_up ReLU(W_down x + b) "
        "+ b_up, width `rank`, scale `adapter_scale`); any kind registered in loramix.experts.",
    )
    placement: Literal["wrap", "parallel"] = Field(
        "wrap",
        description="'wrap': the experts read a target Linear/Conv's input and add to its output; 'parallel': "
        "targets may be any module (e.g. a transformer block's MLP), the experts read its first input and add to "
        "its output (AdaptFormer, MoE-Adapters).",
    )
    adapter_scale: float = Field(0.1, gt=0, description="Scale s of 'adapter' experts.")
    router: str = Field(
        "none",
        description="'none': one expert, gate of ones (plain LoRA); 'task': hard routing by task id (MoLA-Grad); "
        "'poly': learned per-task table per layer (Poly/MHR); 'token': per-layer, per-token router; "
        "'sample': one router for the whole model on the pooled input (MoLA-Router); 'per-task': one learned "
        "router per task in each layer (MoE-Adapters); any kind registered in loramix.routers.",
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
        description=(
            "Module whose output the sample router pools (its name, or the end of one module's name: 'embeddings' "
            "is 'bert.embeddings' in a BERT classifier); default: the model's input embeddings."
        ),
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
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.task_to_expert is not None and self.num_tasks is None:
            raise ValueError("task_to_expert needs num_tasks")
        if self.targets != "all-linear" and not self.targets and self.target_regex is None:
            raise ValueError(
                "targets is empty: name at least one module, use 'all-linear', or set target_regex"
            )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Validate a plain dict (from JSON or YAML); errors name each bad field and what is allowed."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "adapter config", cls.model_fields)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives one key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by the loader, not a key
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):  # a complex key: the loader's own checks apply
                continue
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {first[key] + 1}); keep one",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """Parse YAML safely (no object tags), refusing a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader)


def format_validation_error(exc: ValidationError, where: str, fields: Iterable[str] = ()) -> str:
    """One line per problem: `field: message (got value)`."""
    lines = [f"invalid {where}:"]
    for err in exc.errors():
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        field = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ") + shown
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            message = f"not a key of this config{shown}{did_you_mean(str(err['loc'][0]), fields)}"
        lines.append(problem_line(field, message, fields))
    return "\n".join(lines)


def problem_line(field: str, message: str, fields: Iterable[str]) -> str:
    """`  field: message`. A problem of several fields together (no `field`) is the problem of the one of `fields`
    its message starts with (`top_k=12 exceeds ...` is `top_k`'s), else of `(top level)`."""
    if not field:
        named = re.match(r"\w+", message)
        field = named.group(0) if named and named.group(0) in set(fields) else "(top level)"
    return f"  {field}: {message}"
