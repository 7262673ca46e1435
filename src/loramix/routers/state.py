"""The routing state of one forward pass: what the routers read (task ids, the attention mask, the keep-base mask)
and what they decided. A data type like :class:`Gate`, so that routers and adapted layers can name it without
depending on the routing context that fills it (`loramix.context`, which re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from loramix.routers.gate import Gate


@dataclass(eq=False)  # identity: an open block is found and removed as itself, never by comparing tensors
class RoutingState:
    """What one forward pass needs to route, and what its routers decided."""

    task_ids: Tensor | None = None
    # the task id of every sample where they are one and known on the host (the ids were given on the CPU): a
    # router by task then names one expert for the whole batch, which the layers slice instead of gathering
    one_task: int | None = None
    attention_mask: Tensor | None = None
    # the mask is the model call's own `attention_mask` (none was given to the block)
    mask_from_forward: bool = False
    keep_base: Tensor | None = None  # (n,) bool: these samples get no expert (bit-exact base output)
    # (n, T): router 'task' mixes each sample's experts by these weights over the tasks (a row of zeros: its task's)
    task_weights: Tensor | None = None
    model_gate: Gate | None = None
    record: bool = True
    noise: bool = True  # noisy routers add their noise in training; off: the clean logits (class texts)
    keep_model_gate: bool = False  # generation: the sample router decides on the prompt, later steps reuse it
    # generation: the same for per-sample layer routers, by layer name
    layer_gates: dict[str, Gate] = field(default_factory=dict)
    records: list[tuple[str, Gate]] = field(default_factory=list)
    # activation checkpointing is running a block's forward again in backward: nothing is recorded again
    recomputing: bool = False

    def add(self, name: str, gate: Gate) -> None:
        if self.record:
            self.records.append((name, gate))

    def gates(self) -> list[Gate]:
        return [gate for _, gate in self.records]
