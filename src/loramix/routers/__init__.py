"""Routers: each returns a :class:`Gate` and computes no loss; a kind is one class in one file plus a registry
entry (:data:`ROUTERS`)."""

from __future__ import annotations

from loramix.routers.base import ROUTERS, LearnedRouter, Router, register_router, router_class
from loramix.routers.gate import Gate
from loramix.routers.none import NoRouter
from loramix.routers.per_task import PerTaskRouter
from loramix.routers.poly import PolyRouter
from loramix.routers.sample import SampleRouter
from loramix.routers.task import TaskRouter
from loramix.routers.token import TokenRouter

__all__ = [
    "ROUTERS",
    "Gate",
    "LearnedRouter",
    "NoRouter",
    "PerTaskRouter",
    "PolyRouter",
    "Router",
    "SampleRouter",
    "TaskRouter",
    "TokenRouter",
    "register_router",
    "router_class",
]
