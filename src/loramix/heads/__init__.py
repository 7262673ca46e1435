"""Heads behind one interface (`loss(outputs, batch)`, `predict(model, batch)`): per-task classification and
regression, label prompts (cosine to encoded class texts), and a causal LM's own output layer for generation."""

from loramix.heads.base import Head, pool
from loramix.heads.classification import TaskHeads
from loramix.heads.label_prompt import LabelPromptHead
from loramix.heads.language_model import LanguageModelHead

__all__ = ["Head", "LabelPromptHead", "LanguageModelHead", "TaskHeads", "pool"]
