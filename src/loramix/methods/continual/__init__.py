"""Continual learning: tasks learned one after another without the earlier tasks' data (see :mod:`.sequence`).

Methods: `moe-adapters` (and `moe-adapters-task-id`, `joint`), `continual-mola-grad` (and
`continual-mola-grad-task-id`), `lae`, and the references `zero-shot` and `sequential-lora`.
"""

from loramix.methods.continual.baselines import Lae, SequentialLora, ZeroShot
from loramix.methods.continual.learner import Learner
from loramix.methods.continual.moe_adapters import JointMoEAdapters, MoEAdapters, MoEAdaptersTaskId
from loramix.methods.continual.mola_grad import ContinualMolaGrad, ContinualMolaGradTaskId
from loramix.methods.continual.report import continual_metrics
from loramix.methods.continual.sequence import Continual

__all__ = [
    "Continual",
    "ContinualMolaGrad",
    "ContinualMolaGradTaskId",
    "JointMoEAdapters",
    "Lae",
    "Learner",
    "MoEAdapters",
    "MoEAdaptersTaskId",
    "SequentialLora",
    "ZeroShot",
    "continual_metrics",
]
