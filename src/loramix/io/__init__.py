"""Files: save and load adapters, exchange with PEFT."""

from loramix.io.checkpoint import load, read_checkpoint, save
from loramix.io.export import export_peft, import_peft

__all__ = ["export_peft", "import_peft", "load", "read_checkpoint", "save"]
