"""Heads behind one interface (`loss(outputs, batch)`, `predict(model, batch)`): per-task classification and
regression, and label prompts (cosine to encoded class texts)."""

from loramix.heads.base import Head, pool
from loramix.heads.classification import TaskHeads
from loramix.heads.label_prompt import LabelPromptHead

__all__ = ["Head", "LabelPromptHead", "TaskHeads", "pool"]
