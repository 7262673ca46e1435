"""A thin wrapper that takes the routing side inputs as forward keyword arguments, so that code which only
calls `model(**batch)`, such as Hugging Face `Trainer` and `generate()`, routes correctly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from loramix.context import routing
from loramix.inject import get_info

# the learned routers that train with an auxiliary loss of their own (`loramix train` and `LoramixTrainer` add it)
AUX_TERMS = {"sample": "MoLA-Router's TwD", "token": "load balance"}


class LoramixModel(nn.Module):
    """`LoramixModel(model)(input_ids=..., task_ids=...)` runs `model` inside `loramix.routing`.

    Attributes the wrapper lacks (`config`, `device`, ...) are looked up on the wrapped model.

    Example:
        >>> wrapped = loramix.LoramixModel(model)
        >>> out = wrapped(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 2]))
    """

    # transformers' Trainer refuses to fine-tune a quantized model unless it carries trainable adapters, which it
    # knows by this flag (PEFT's, set where adapters are attached); the wrapped model's experts are such adapters
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        get_info(model)  # fail early on a model without adapters
        self.model = model
        self.warned = False  # that training through it adds no auxiliary loss (once)

    def _task_ids(self, task_ids: Tensor | None) -> Tensor | None:
        """The given task ids, else those of a `loramix.routing` block already open around the call."""
        active = get_info(self.model).active_states
        return active[-1].task_ids if task_ids is None and active else task_ids

    def forward(self, *args: Any, task_ids: Tensor | None = None, **kwargs: Any) -> Any:
        if task_ids is None and get_info(self.model).active_states:
            # the block open around the call routes it and records its gates (a trainer's losses read them there)
            return self.model(*args, **kwargs)
        if self.training and torch.is_grad_enabled() and not self.warned:
            self._warn_without_aux_loss()
        with routing(self.model, task_ids=task_ids, attention_mask=kwargs.get("attention_mask")):
            return self.model(*args, **kwargs)

    def _warn_without_aux_loss(self) -> None:
        """Training a learned router through the wrapper alone (a plain `Trainer`) leaves out the loss it trains
        with; without TwD MoLA-Router's router does not follow the tasks."""
        self.warned = True
        router = get_info(self.model).config.router
        if router in AUX_TERMS:
            warnings.warn(
                f"LoramixModel: router '{router}' trains with an auxiliary loss ({AUX_TERMS[router]}) that this "
                "wrapper does not add to the model's loss; train with loramix.LoramixTrainer, which adds it, or "
                "open loramix.routing yourself and add it to your loss",
                stacklevel=3,
            )

    def generate(self, *args: Any, task_ids: Tensor | None = None, **kwargs: Any) -> Any:
        """Generate with each sequence routed by its task; the sample router decides once, on the prompt."""
        task_ids = self._task_ids(task_ids)
        num_return = max(kwargs.get("num_beams", 1), kwargs.get("num_return_sequences", 1))
        if task_ids is not None and num_return > 1:
            task_ids = task_ids.repeat_interleave(num_return)
        with routing(self.model, task_ids=task_ids, attention_mask=kwargs.get("attention_mask")) as state:
            state.keep_model_gate = True
            return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)
