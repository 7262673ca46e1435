"""Auxiliary losses: pure functions of routing outputs, weighted and summed only in the training step."""

from loramix.losses.balance import load_balance_loss, router_z_loss
from loramix.losses.decorrelation import TwDProjection, twd_loss

__all__ = ["TwDProjection", "load_balance_loss", "router_z_loss", "twd_loss"]
