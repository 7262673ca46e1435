"""The router template and the registry of router kinds.

Every router is called the same way, `router(state, hidden) -> Gate`: `state` is the routing state of the forward
pass (task ids, attention mask, keep-base mask), `hidden` the input it may score (the adapted layer's input for a
router that lives in each layer; the pooled model input for one that runs once per forward). A router says what it
decided and nothing else: it computes no loss. Routing maths runs in fp32.

A new kind is one class in one file, decorated with :func:`register_router`. Nothing outside this registry
compares router names: the rest of the library reads the class's attributes (`scope`, `needs_task_ids`, ...).

Legend: n samples, t tokens, e experts, k experts kept, d router input features, T tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import ConfigError, RoutingError, did_you_mean
from loramix.routers.gate import Gate

if TYPE_CHECKING:
    from loramix.config import AdapterConfig


class Router(nn.Module):
    """Base of all routers.

    Class attributes say what the rest of the library needs to know:
    - `scope`: "model" (runs once per forward, its gate shared by every adapted layer), "layer" (one router in
      each adapted layer, reading that layer's input) or None (no router: a plain LoRA, gate of ones);
    - `needs_task_ids`: the routing context must be given task ids;
    - `needs_num_tasks`, `uses_top_k`, `uses_task_to_expert`: which config fields it reads (checked at the door);
    - `pools_model_input`: a model-scope router that scores the pooled model input (needs `router_input`);
    - `per_token`: its gates are per token, `(n, t, e)` (a Conv2d cannot take them);
    - `per_sample`: a layer-scope router with one gate per sample, read from the whole sequence (generation decides
      it on the prompt and keeps it for every later step, as a model-scope router's).
    """

    loramix_role: ClassVar[str] = "router"
    kind: ClassVar[str] = ""
    scope: ClassVar[str | None] = "layer"
    needs_task_ids: ClassVar[bool] = False
    needs_num_tasks: ClassVar[bool] = False
    uses_top_k: ClassVar[bool] = False
    uses_task_to_expert: ClassVar[bool] = False
    pools_model_input: ClassVar[bool] = False
    per_token: ClassVar[bool] = False
    per_sample: ClassVar[bool] = False

    @classmethod
    def check_config(cls, config: AdapterConfig) -> None:
        """Raise ValueError (naming the field) when `config` does not fit this kind."""
        if cls.needs_num_tasks and config.num_tasks is None:
            raise ValueError(f"router '{cls.kind}' needs num_tasks")
        if config.top_k is not None and not cls.uses_top_k:
            raise ValueError(f"top_k is not used by router '{cls.kind}'")
        if config.task_to_expert is not None and not cls.uses_task_to_expert:
            raise ValueError(f"task_to_expert is not used by router '{cls.kind}'")
        if config.router_input is not None and not cls.pools_model_input:
            raise ValueError(f"router_input is not used by router '{cls.kind}'")

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int | None, **kwargs: Any) -> Router | None:
        raise NotImplementedError

    def forward(self, state: Any, hidden: Tensor | None) -> Gate:
        raise NotImplementedError

    def grow(self, num_experts: int, num_tasks: int | None) -> None:
        """Make room for more experts and task slots in place; old decisions on old tasks stay as they were where
        the router fixes them by task (a softmax over the inputs gives the new experts a share of it)."""
        raise NotImplementedError

    def task_gate(self, task: int) -> Tensor | None:
        """The fixed `(e,)` gate of one task, for merging and export; None when the router decides per input."""
        return None

    def task_ids(self, state: Any) -> Tensor:
        task_ids = None if state is None else state.task_ids
        if task_ids is None:
            raise RoutingError(
                f"router '{self.kind}' routes by task but got no task_ids: call the model inside "
                "loramix.routing(model, task_ids=...)"
            )
        return task_ids


class LearnedRouter(Router):
    """Template for routers that score experts from features: `logits()` differs, the rest is shared.

    softmax(logits / temperature), optional noise in training (noisy top-k, Shazeer et al. 2017, with a learned
    noise scale), optional top-k with renormalisation. Top-1 keeps a gate of exactly 1 whose gradient is the
    chosen probability's (a straight-through estimate), so the router still learns from the task loss.
    """

    uses_top_k = True

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        top_k: int | None = None,
        noisy: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.temperature, self.noisy = num_experts, top_k, temperature, noisy
        self.noise = nn.Linear(in_features, num_experts, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int | None, **kwargs: Any) -> Router | None:
        assert in_features is not None
        return cls(
            in_features,
            config.num_experts,
            top_k=config.top_k,
            noisy=config.noisy,
            temperature=config.temperature,
            **kwargs,
        )

    def logits(self, hidden: Tensor, state: Any) -> Tensor:
        raise NotImplementedError

    def noise_scale(self, hidden: Tensor, state: Any) -> Tensor:
        assert self.noise is not None
        return F.softplus(F.linear(hidden, self.noise.weight.float()))

    def features(self, hidden: Tensor, state: Any = None) -> Tensor:
        """What the router scores, from what it is given (the identity; per-task routers take the first token)."""
        return hidden

    def forward(self, state: Any, hidden: Tensor | None) -> Gate:
        assert hidden is not None
        hidden = self.features(hidden, state).float()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            logits = self.logits(hidden, state).float()  # (n, [t,] e)
            scores = logits
            if self.noisy and self.training and (state is None or state.noise):
                scores = logits + torch.randn_like(logits) * self.noise_scale(hidden, state)
            probs = torch.softmax(scores / self.temperature, dim=-1)
            if self.top_k is None or self.top_k >= self.num_experts:
                return Gate(weights=probs, logits=logits)
            top_p, top_i = probs.topk(self.top_k, dim=-1)  # (..., k)
            if self.top_k == 1:  # value 1, gradient of p: renormalising alone would give the router none
                top_p = top_p - top_p.detach() + 1.0
            else:
                top_p = top_p / top_p.sum(-1, keepdim=True)
            weights = torch.zeros_like(probs).scatter(-1, top_i, top_p)
            return Gate(weights=weights, indices=top_i, logits=logits)

    @torch.no_grad()
    def _grow_noise(self, num_experts: int) -> None:
        if self.noise is not None and num_experts > self.noise.out_features:
            grown = nn.Linear(self.noise.in_features, num_experts, bias=False).to(self.noise.weight)
            grown.weight.zero_()
            grown.weight[: self.noise.out_features] = self.noise.weight
            grown.weight.requires_grad_(self.noise.weight.requires_grad)
            self.noise = grown


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make a router kind available to configs by its `kind` name."""
    ROUTERS[cls.kind] = cls
    return cls


def router_class(kind: str) -> type[Router]:
    """The registered class of a router kind; a ConfigError lists the kinds there are."""
    try:
        return ROUTERS[kind]
    except KeyError:
        raise ConfigError(
            f"unknown router {kind!r}; the router kinds are: {', '.join(ROUTERS)}{did_you_mean(kind, ROUTERS)}"
        ) from None
