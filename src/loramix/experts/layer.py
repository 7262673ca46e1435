"""The base of every adapted layer: base output once, plus the expert mixture chosen by the gate.

    y = base(x) + s * sum_e g_e * E_e(x)

The layer receives its expert bank (built by the bank kind's `from_config`) and, for per-layer routing, its router
(built by the router kind's); it never reads a router's name. Subclasses say how to run the base and the experts on
their kind of input (`delta`) and how a fixed mixture folds into the base weight (`_add_to_base_weight`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from loramix.errors import InjectionError, RoutingError
from loramix.experts.base import StackedExperts
from loramix.routers.base import Router
from loramix.routers.gate import Gate

if TYPE_CHECKING:
    from loramix.routers.state import RoutingState


class AdaptedLayer(nn.Module):
    """Wraps a base module with a bank of experts and, for per-layer routing, its own router.

    `gate_source` says where the gate comes from: "none" (a single expert, gate of ones), "layer" (this layer's
    own router) or "model" (the routing state's model-wide gate).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        experts: StackedExperts,
        router: Router | None,
        gate_source: str,
        name: str,
        in_features: int,
        out_features: int,
        scaling: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = name
        self.in_features, self.out_features = in_features, out_features
        self.scaling = scaling
        self.experts = experts
        self.router = router
        self.gate_source = gate_source
        self.adapter_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged_gate: Tensor | None = None
        self.disabled = False
        # the model's open routing blocks, innermost last (`loramix.routing`; the injected model's list)
        self.routing_states: list[RoutingState] = []
        weight = next((p for p in base_layer.parameters()), None)
        if weight is not None:
            self.experts.to(device=weight.device)
            if self.router is not None:
                self.router.to(device=weight.device)

    # ---- routing -------------------------------------------------------------------------------------------
    def open_routing(self, routing: RoutingState | None = None) -> RoutingState | None:
        """The routing state of this call: `routing` where the call passes one, else the innermost routing block
        open on the model (None outside any)."""
        if routing is not None:
            return routing
        return self.routing_states[-1] if self.routing_states else None

    def gate(self, x: Tensor, routing: RoutingState | None) -> Gate | None:
        """The gate for this call: None for a plain LoRA (a hard gate on its one expert when samples are kept on
        the base), the layer's own router's, or the model-wide one; with the routing state's keep-base mask
        applied. The state is `routing` where the call passes one, else the innermost routing block open on the
        model; a block that activation checkpointing recomputes in backward reads the state its first forward had
        (`loramix.recompute` puts it on top), and a recomputation records nothing."""
        routing = self.open_routing(routing)
        recomputing = routing is not None and routing.recomputing
        if self.gate_source == "none":
            keep = None if routing is None else routing.keep_base
            if keep is None:
                return None
            # the single expert as a hard gate, so that the kept samples get exactly zero
            expert = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            ones = torch.ones(x.shape[0], 1, device=x.device)
            return Gate(weights=ones, indices=expert, hard=True).keep_base(keep)
        if self.gate_source == "layer":
            assert self.router is not None
            kept = routing is not None and routing.keep_model_gate and self.router.per_sample
            if kept and self.layer_name in routing.layer_gates:  # type: ignore[union-attr]
                return routing.layer_gates[self.layer_name]  # type: ignore[union-attr]  # decided on the prompt
            gate = self.router(routing, x)
            if routing is not None:
                gate = gate.keep_base(routing.keep_base)
                if kept:
                    routing.layer_gates[self.layer_name] = gate
                if not recomputing:
                    routing.add(self.layer_name, gate)
            return gate
        if routing is None:
            raise RoutingError(
                f"layer '{self.layer_name}' is routed by a model-wide router but got no gate: call the model "
                "inside loramix.routing(model, ...) (with task_ids when it routes by task); a block checkpointed by "
                "other means than transformers' gradient_checkpointing_enable is recomputed in backward outside it"
            )
        if routing.model_gate is None:
            raise RoutingError(
                f"layer '{self.layer_name}' ran before the model-wide router decided: its input (router_input) "
                "must run before every adapted layer (the input embeddings do), or adapt only the blocks after it "
                "(layers_to_transform)"
            )
        return routing.model_gate

    def forward(self, x: Tensor, *args: Any, routing: RoutingState | None = None, **kwargs: Any) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged_gate is not None or self.disabled or x.shape[0] == 0:  # an empty batch: nothing to add
            return out
        gate = self.gate(x, routing)
        return out + self.delta(x, gate).to(out.dtype)

    def delta(self, x: Tensor, gate: Gate | None) -> Tensor:
        """The mixture for input `x` `(n, ..., i)`: `(n, ..., o)`."""
        if gate is None:
            return self.experts(x, None, self.scaling, self.adapter_dropout)
        batch = x.shape[0]
        self._check_batch(gate, batch)
        x3 = x.reshape(batch, -1, x.shape[-1])  # (n, t, i)
        out = self.experts(x3, gate, self.scaling, self.adapter_dropout)
        return out.reshape(*x.shape[:-1], out.shape[-1])  # (n, ..., o)

    def _check_batch(self, gate: Gate, batch: int) -> None:
        if gate.weights.shape[0] != batch:
            raise RoutingError(
                f"layer '{self.layer_name}' got an input with batch size {batch} but a gate for "
                f"{gate.weights.shape[0]} samples: the routing block's task_ids (or keep_base, attention_mask) "
                "must have one entry per sample of the batch (under `generate` with beams or several sequences "
                "per prompt, use loramix.LoramixModel(model).generate, which repeats them), and the layer's "
                "input must keep the batch as its first dimension"
            )

    # ---- merging -------------------------------------------------------------------------------------------
    def _add_to_base_weight(self, delta: Tensor) -> None:
        raise InjectionError(
            f"layer '{self.layer_name}' wraps a {type(self.base_layer).__name__}: it cannot merge"
        )

    def _check_mergeable(self) -> None:
        if not self.experts.mergeable:
            raise InjectionError(
                f"layer '{self.layer_name}' has '{self.experts.kind}' experts, which do not fold into a base "
                "weight: merging and PEFT export need LoRA experts"
            )

    @torch.no_grad()
    def merge(self, gate: Tensor) -> None:
        """Fold a fixed mixture `gate` `(e,)` into the base weight; the layer then runs as its base alone."""
        self._check_mergeable()
        if self.merged_gate is not None:
            raise RoutingError(f"layer '{self.layer_name}' is already merged; unmerge it first")
        gate = gate.detach().clone()  # delta_weight puts it on the experts' device and dtype
        self._add_to_base_weight(self.experts.delta_weight(gate, self.scaling))  # type: ignore[operator]
        self.merged_gate = gate

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged mixture again (equal to the original weight up to rounding)."""
        if self.merged_gate is None:
            return
        self._add_to_base_weight(-self.experts.delta_weight(self.merged_gate, self.scaling))  # type: ignore[operator]
        self.merged_gate = None

    def extra_repr(self) -> str:
        return f"name={self.layer_name}, gate={self.gate_source}, scaling={self.scaling:g}"
