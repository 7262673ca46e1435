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
    TrainingError,
)
from loramix.growth import grow
from loramix.inject import InjectionReport, adapter_state, get_info, inject, merge_and_unload, remove
from loramix.io import export_peft, import_peft, load, save
from loramix.wrapper import LoramixModel

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InjectionError",
    "InjectionReport",
    "LoramixError",
    "LoramixModel",
    "RoutingError",
    "RoutingState",
    "TrainingError",
    "adapter_state",
    "export_peft",
    "get_info",
    "grow",
    "import_peft",
    "load",
    "inject",
    "merge_and_unload",
    "remove",
    "routing",
    "save",
]
