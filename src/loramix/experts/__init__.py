"""Experts: stacked parameters of several kinds (a registry, :data:`EXPERT_KINDS`), the ops that apply them, and
the layers that wrap base modules (a Linear, a GPT-2 Conv1D, a Conv2d, or any module in parallel)."""

from loramix.experts.adapter import AdapterExperts
from loramix.experts.base import EXPERT_KINDS, StackedExperts, build_experts, register_expert_kind
from loramix.experts.conv import Conv2dExperts
from loramix.experts.layer import AdaptedLayer
from loramix.experts.linear import Conv1DExperts, LinearExperts
from loramix.experts.lora import LoraExperts
from loramix.experts.parallel import ParallelExperts

__all__ = [
    "EXPERT_KINDS",
    "AdaptedLayer",
    "AdapterExperts",
    "Conv1DExperts",
    "Conv2dExperts",
    "LinearExperts",
    "LoraExperts",
    "ParallelExperts",
    "StackedExperts",
    "build_experts",
    "register_expert_kind",
]
