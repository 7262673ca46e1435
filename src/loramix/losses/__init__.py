"""Losses as pure functions: the auxiliary losses of routing outputs (weighted and summed only in the training
step) and the causal LM's next-token loss."""

from loramix.losses.balance import load_balance_loss, router_z_loss
from loramix.losses.decorrelation import TwDProjection, twd_loss
from loramix.losses.language_model import causal_lm_loss, token_nll

__all__ = ["TwDProjection", "causal_lm_loss", "load_balance_loss", "router_z_loss", "token_nll", "twd_loss"]
