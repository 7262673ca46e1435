"""loramix: train one model on heterogeneous data with a mixture of low-rank adapter (LoRA) experts."""

from loramix.config import AdapterConfig
from loramix.context import RoutingState, routing
from loramix.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InjectionError,
    LoramixError,
    RoutingError,
)
from loramix.inject import InjectionReport, adapter_state, get_info, inject, merge_and_unload, remove

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InjectionError",
    "InjectionReport",
    "LoramixError",
    "RoutingError",
    "RoutingState",
    "adapter_state",
    "get_info",
    "inject",
    "merge_and_unload",
    "remove",
    "routing",
]
