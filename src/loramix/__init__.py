"""loramix: train one model on heterogeneous data with a mixture of low-rank adapter (LoRA) experts.

The top-level names are imported on first use (PEP 562), not with the package: most of them need torch, which takes
seconds to load, and `loramix --help` or a config error should answer before that. `from loramix import inject`
and `loramix.inject(...)` work as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from loramix.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InjectionError,
    LoramixError,
    RoutingError,
    TrainingError,
)

if TYPE_CHECKING:
    from loramix.config import AdapterConfig
    from loramix.context import RoutingState, routing
    from loramix.growth import grow
    from loramix.hf_trainer import LoramixTrainer, LoramixTrainerMixin, aux_losses_for
    from loramix.inject import (
        InjectionReport,
        adapter_state,
        disabled,
        get_info,
        inject,
        remove,
    )
    from loramix.io import export_peft, import_peft, load, push_to_hub, save
    from loramix.merge import merge_and_unload
    from loramix.runs import TrainedRun, open_run
    from loramix.wrapper import LoramixModel

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "AdapterConfig": "loramix.config",
    "RoutingState": "loramix.context",
    "routing": "loramix.context",
    "grow": "loramix.growth",
    "LoramixTrainer": "loramix.hf_trainer",
    "LoramixTrainerMixin": "loramix.hf_trainer",
    "aux_losses_for": "loramix.hf_trainer",
    "InjectionReport": "loramix.inject",
    "adapter_state": "loramix.inject",
    "disabled": "loramix.inject",
    "get_info": "loramix.inject",
    "inject": "loramix.inject",
    "merge_and_unload": "loramix.merge",
    "remove": "loramix.inject",
    "export_peft": "loramix.io",
    "import_peft": "loramix.io",
    "load": "loramix.io",
    "push_to_hub": "loramix.io",
    "save": "loramix.io",
    "LoramixModel": "loramix.wrapper",
    "TrainedRun": "loramix.runs",
    "open_run": "loramix.runs",
}

__all__ = [
    "AdapterConfig",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InjectionError",
    "InjectionReport",
    "LoramixError",
    "LoramixModel",
    "LoramixTrainer",
    "LoramixTrainerMixin",
    "RoutingError",
    "RoutingState",
    "TrainingError",
    "TrainedRun",
    "adapter_state",
    "aux_losses_for",
    "disabled",
    "export_peft",
    "get_info",
    "grow",
    "import_peft",
    "load",
    "inject",
    "merge_and_unload",
    "open_run",
    "push_to_hub",
    "remove",
    "routing",
    "save",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if importlib.util.find_spec(f"loramix.{name}") is not None:  # a subpackage, as `loramix.io.export`
            return importlib.import_module(f"loramix.{name}")
        raise AttributeError(f"module 'loramix' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package module, which keeps a function when the import system binds a submodule of the same name.

    `loramix.inject` is both the function and the module `loramix/inject.py`; importing that module (as any
    `from loramix.inject import ...` does) sets the package attribute `inject` to the module. With eager imports
    the function was bound afterwards and won; with lazy ones the module must not shadow it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
