"""No router: one expert and a gate of ones, a plain LoRA (Hu et al. 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loramix.routers.base import Router, register_router

if TYPE_CHECKING:
    from loramix.config import AdapterConfig


@register_router
class NoRouter(Router):
    """Builds nothing: every adapted layer applies its single expert with a gate of ones."""

    kind = "none"
    scope = None

    @classmethod
    def check_config(cls, config: AdapterConfig) -> None:
        super().check_config(config)
        if config.num_experts != 1:
            raise ValueError("router 'none' gives a plain LoRA and needs num_experts=1")

    @classmethod
    def from_config(cls, config: AdapterConfig, in_features: int | None, **kwargs: Any) -> Router | None:
        return None
