"""The gate type every router returns. Legend: n samples, t tokens, e experts, k experts kept."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Gate:
    """A routing decision.

    weights: `(n, e)` per sample or `(n, t, e)` per token, fp32; each row sums to 1, or to 0 where `keep` is set.
    indices: for a hard gate, the expert of each sample `(n,)`; for top-k, the kept experts `(..., k)`.
    logits: the router's raw scores where it has them (TwD and the z-loss need them).
    hard: one expert per sample, applied by gather + bmm instead of the dense op.
    keep: `(n,)` bool, True for samples that get no expert at all: the mixture adds exactly zero, so their output
        is the base model's bit for bit, in the same batched op as the other samples.
    expert: for a hard gate whose samples all take one expert, that expert where it is known on the host (task ids
        given on the CPU): the layers run it as one LoRA instead of gathering each sample's matrices.
    pairs: for a per-sample top-k gate whose rows may name fewer than k experts: the (sample, expert) pairs with a
        non-zero weight beyond each sample's first index, `(p, 2)` long. LoRA experts then run `indices[:, 0]` as a
        hard gate, weighed, and these pairs besides (`ops.add_pairs`); other experts read the top-k gate.
    """

    weights: Tensor
    indices: Tensor | None = None
    logits: Tensor | None = None
    hard: bool = False
    keep: Tensor | None = None
    pairs: Tensor | None = None
    expert: int | None = None

    @property
    def per_token(self) -> bool:
        return self.weights.dim() == 3

    def keep_base(self, keep: Tensor | None) -> Gate:
        """This gate with the samples where `keep` `(n,)` is True sent to the base model (weights zeroed)."""
        if keep is None:
            return self
        keep = keep.to(device=self.weights.device, dtype=bool)
        if self.keep is not None:
            keep = keep | self.keep
        shape = (-1,) + (1,) * (self.weights.dim() - 1)
        return replace(self, weights=self.weights * (~keep).to(self.weights.dtype).view(shape), keep=keep)

    def single_expert(self) -> int | None:
        """The one expert a layer may run alone, as a plain LoRA, for every sample: a hard gate's `expert` where no
        sample stays on the base; None otherwise, and while `torch.compile` traces (a graph per expert)."""
        if not self.hard or self.expert is None or self.keep is not None or torch.compiler.is_compiling():
            return None
        return self.expert
