"""Experts: stacked parameters, the ops that apply them, and the layers that wrap base modules."""

from loramix.experts.bank import ExpertBank
from loramix.experts.conv import Conv2dExperts
from loramix.experts.layer import AdaptedLayer
from loramix.experts.linear import Conv1DExperts, LinearExperts

__all__ = ["AdaptedLayer", "Conv1DExperts", "Conv2dExperts", "ExpertBank", "LinearExperts"]
