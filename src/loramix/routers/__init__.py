"""Routers: each returns a :class:`Gate` and computes no loss."""

from __future__ import annotations

from loramix.config import AdapterConfig
from loramix.routers.base import Gate, LearnedRouter, Router
from loramix.routers.learned import SampleRouter, TokenRouter
from loramix.routers.task import PolyRouter, TaskRouter

__all__ = [
    "Gate",
    "LearnedRouter",
    "PolyRouter",
    "Router",
    "SampleRouter",
    "TaskRouter",
    "TokenRouter",
    "build_layer_router",
    "build_model_router",
]


def build_layer_router(config: AdapterConfig, in_features: int) -> Router | None:
    """The router that lives inside each adapted layer, if the config asks for one."""
    if config.router == "poly":
        assert config.num_tasks is not None
        return PolyRouter(config.num_tasks, config.num_experts)
    if config.router == "token":
        return TokenRouter(
            in_features,
            config.num_experts,
            top_k=config.top_k,
            noisy=config.noisy,
            temperature=config.temperature,
        )
    return None


def build_model_router(
    config: AdapterConfig, in_features: int | None, network: object | None = None
) -> Router | None:
    """The one router that runs per model forward and gates every layer, if the config asks for one."""
    if config.router == "task":
        assert config.num_tasks is not None
        return TaskRouter(config.num_tasks, config.num_experts, task_to_expert=config.task_to_expert)
    if config.router == "sample":
        assert in_features is not None
        return SampleRouter(
            in_features,
            config.num_experts,
            hidden=config.router_hidden,
            network=network,  # type: ignore[arg-type]
            top_k=config.top_k,
            noisy=config.noisy,
            temperature=config.temperature,
        )
    return None
