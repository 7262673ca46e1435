"""The base of every adapted layer: base output once, plus the expert mixture chosen by the gate.

    y = W0 x + s * sum_e g_e * B_e A_e x

Subclasses say how to apply the experts to their kind of input (`delta`) and how a fixed mixture folds into the
base weight (`_add_to_base_weight`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from loramix.config import AdapterConfig
from loramix.errors import RoutingError
from loramix.experts.bank import ExpertBank
from loramix.routers import Gate, build_layer_router

if TYPE_CHECKING:
    from loramix.context import RoutingState


class AdaptedLayer(nn.Module):
    """Wraps a base layer with a bank of experts and, for per-layer routing, its own router."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        config: AdapterConfig,
        name: str,
        in_features: int,
        out_features: int,
        expert_in_features: int | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = name
        self.in_features, self.out_features = in_features, out_features
        self.router_kind = config.router
        self.scaling = config.scaling
        self.experts = ExpertBank(
            expert_in_features or in_features,
            out_features,
            num_experts=config.num_experts,
            rank=config.rank,
            share=config.share,
            shared_dropout=config.shared_dropout,
        )
        self.router = build_layer_router(config, in_features)
        self.adapter_dropout: nn.Module = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged_gate: Tensor | None = None
        self.disabled = False
        weight = getattr(base_layer, "weight", None)
        if isinstance(weight, Tensor):
            self.experts.to(device=weight.device)
            if self.router is not None:
                self.router.to(device=weight.device)

    # ---- routing -------------------------------------------------------------------------------------------
    def gate(self, x: Tensor, routing: RoutingState | None) -> Gate | None:
        """The gate for this call: None for a plain LoRA, the layer's own router's, or the model-wide one."""
        if self.router_kind == "none":
            return None
        if self.router is not None:
            if self.router.needs_task_ids:
                if routing is None or routing.task_ids is None:
                    raise RoutingError(
                        f"layer '{self.layer_name}' routes by task but got no task_ids: call the model inside "
                        "loramix.routing(model, task_ids=...)"
                    )
                gate = self.router(task_ids=routing.task_ids)
            else:
                gate = self.router(hidden=x)
            if routing is not None:
                routing.add(self.layer_name, gate)
            return gate
        if routing is None or routing.model_gate is None:
            need = "task_ids" if self.router_kind == "task" else "the sample router's gate"
            raise RoutingError(
                f"layer '{self.layer_name}' needs {need}: call the model inside loramix.routing(model, ...)"
                + (
                    ""
                    if self.router_kind == "task"
                    else " and check that router_input runs before this layer"
                )
            )
        return routing.model_gate

    def forward(self, x: Tensor, *args, routing: RoutingState | None = None, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged_gate is not None or self.disabled:
            return out
        gate = self.gate(x, routing)
        return out + self.delta(x, gate).to(out.dtype)

    def delta(self, x: Tensor, gate: Gate | None) -> Tensor:
        raise NotImplementedError

    def _check_batch(self, gate: Gate, batch: int) -> None:
        if gate.weights.shape[0] != batch:
            raise RoutingError(
                f"layer '{self.layer_name}' got an input with batch size {batch} but a gate for "
                f"{gate.weights.shape[0]} samples: its input must keep the batch as its first dimension"
            )

    # ---- merging -------------------------------------------------------------------------------------------
    def _add_to_base_weight(self, delta: Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, gate: Tensor) -> None:
        """Fold a fixed mixture `gate` `(e,)` into the base weight; the layer then runs as its base alone."""
        if self.merged_gate is not None:
            raise RoutingError(f"layer '{self.layer_name}' is already merged; unmerge it first")
        gate = gate.detach().float().to(self.experts.A.device)
        self._add_to_base_weight(self.experts.delta_weight(gate, self.scaling))
        self.merged_gate = gate

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged mixture again (equal to the original weight up to rounding)."""
        if self.merged_gate is None:
            return
        self._add_to_base_weight(-self.experts.delta_weight(self.merged_gate, self.scaling))
        self.merged_gate = None

    def extra_repr(self) -> str:
        return f"name={self.layer_name}, router={self.router_kind}, scaling={self.scaling:g}"
