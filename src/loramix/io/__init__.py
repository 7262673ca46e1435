"""Files: save and load adapters (in a folder or on the Hugging Face Hub), exchange with PEFT."""

from loramix.io.checkpoint import read_checkpoint, save
from loramix.io.export import export_peft, import_peft
from loramix.io.hub import load, push_to_hub

__all__ = ["export_peft", "import_peft", "load", "push_to_hub", "read_checkpoint", "save"]
