"""Training with Hugging Face `Trainer`: :class:`LoramixTrainer` routes each batch by its `task_ids` column, adds
the router's auxiliary losses as `loramix train` does, and saves and resumes the adapters alone.

Example:
    >>> loramix.inject(model, {"num_experts": 4, "router": "sample"})
    >>> trainer = loramix.LoramixTrainer(model=model, args=TrainingArguments("out"), train_dataset=rows)
    >>> trainer.train()  # rows: input_ids, attention_mask, labels and task_ids; MoLA-Router's TwD is added
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import HubStrategy
from transformers.utils import can_return_loss, find_labels

from loramix.context import routing
from loramix.errors import ConfigError, DataError, did_you_mean
from loramix.inject import get_info, saved_modules
from loramix.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_into, save
from loramix.io.files import atomic_write_bytes
from loramix.io.hub import CARD_FILE, trainer_card
from loramix.methods import get_method
from loramix.roles import parameters_by_role
from loramix.train.aux_losses import AuxLoss
from loramix.train.config import RunConfig
from loramix.train.step import with_aux_losses
from loramix.wrapper import LoramixModel

# the method whose auxiliary losses `loramix train` adds for a model-wide or per-token learned router
ROUTER_METHODS = {"sample": "mola-router", "token": "token-router"}
# the run-config keys that set those losses
AUX_KEYS = ("twd_weight", "twd_space", "twd_temperature", "balance_weight", "z_loss_weight")
# the models whose labels `Trainer`'s label smoother shifts
CAUSAL_LMS = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def aux_losses_for(model: nn.Module, **settings: Any) -> list[AuxLoss]:
    """The auxiliary loss terms `loramix train` adds for the adapters injected into `model`, by their router:
    MoLA-Router's TwD (and load balance and z-loss, off by default) for router 'sample', load balance and z-loss
    for router 'token', none for the others. `settings` are run-config keys of these terms (`twd_weight`,
    `twd_space`, `twd_temperature`, `balance_weight`, `z_loss_weight`), checked as a run config checks them."""
    config = get_info(model).config
    name = ROUTER_METHODS.get(config.router)
    run = RunConfig.model_construct(method=name or "lora")
    for key, value in settings.items():
        if key not in AUX_KEYS:
            raise ConfigError(
                f"{key}: not a setting of the auxiliary losses (those are {', '.join(AUX_KEYS)})"
                f"{did_you_mean(key, AUX_KEYS)}"
            )
        field = RunConfig.model_fields[key]
        try:
            value = TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
        except ValidationError as exc:
            raise ConfigError(f"{key}: {exc.errors()[0]['msg']} (got {value!r})") from None
        setattr(run, key, value)
    if name is None:
        if settings:
            raise ConfigError(
                f"{', '.join(settings)}: router '{config.router}' trains with no auxiliary loss to set"
            )
        return []
    return get_method(name).aux_losses(run, config)


def accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether `Trainer` would give this model, unwrapped, `num_items_in_batch` (by its flag, else its forward's
    `**kwargs`)."""
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


class TaskIdsCollator:
    """Runs the trainer's own collator and, where it kept only the inputs it knows (TRL's language-model collator
    does), adds the examples' `task_ids` to its batch as one tensor."""

    def __init__(self, collator: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collator = collator

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        batch = self.collator(examples)
        first = examples[0] if examples else None
        if "task_ids" in batch or not isinstance(first, Mapping) or "task_ids" not in first:
            return batch
        missing = [i for i, example in enumerate(examples) if example.get("task_ids") is None]
        if missing:
            raise DataError(f"examples {missing[:5]} of a batch have no task_ids where the others have")
        batch["task_ids"] = torch.tensor([int(example["task_ids"]) for example in examples])
        return batch


def own_groups(optimizer: torch.optim.Optimizer, chosen: set[int], lr: float) -> None:
    """Move the parameters whose ids are `chosen` out of the optimizer's groups into groups of their own at `lr`,
    one per weight decay they had; groups left empty are dropped (a fresh optimizer: no state moves)."""
    moved: list[tuple[nn.Parameter, float]] = []
    for group in optimizer.param_groups:
        moved += [(p, group.get("weight_decay", 0.0)) for p in group["params"] if id(p) in chosen]
        group["params"] = [p for p in group["params"] if id(p) not in chosen]
    for decay in sorted({d for _, d in moved}):
        params = [p for p, d in moved if d == decay]
        optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": decay})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


def shifted(smoother: Any, outputs: Any, labels: Tensor, shift_labels: bool = False, **kwargs: Any) -> Tensor:
    """A label smoother called on a causal LM's outputs, its labels shifted as `Trainer` shifts a bare one's."""
    return smoother(outputs, labels, shift_labels=True, **kwargs)


class LoramixTrainerMixin:
    """What makes a Hugging Face `Trainer` (or a subclass: `Seq2SeqTrainer`, TRL's `SFTTrainer`) train a model with
    loramix adapters, injected or wrapped in :class:`LoramixModel`: put it first among the bases,
    `class MyTrainer(LoramixTrainerMixin, SFTTrainer)`. :class:`LoramixTrainer` is it on `Trainer`.

    - Each batch's `task_ids` column routes it (`loramix.routing`); the rest goes to the model as `Trainer` sends it,
      and `remove_unused_columns` keeps `task_ids` and the model's own inputs.
    - `aux_losses`: the terms added to the model's loss in training; by default those of :func:`aux_losses_for`
      (MoLA-Router's TwD for a model-wide router), set by `aux_settings` (e.g. `{"twd_weight": 0.5}`); `[]` adds
      none. They are added as `loramix train` adds them, to each micro-batch's own mean loss (the model is then not
      given `num_items_in_batch`). `loss` logs the sum, `task_loss` the model's own and `<name>_loss` each term's
      raw value. Evaluation reports the model's loss alone.
    - `router_lr` and `head_lr`: the learning rates of the routers and of the adapter config's `modules_to_save`
      (a classifier head), as `loramix train`'s, each in optimizer groups of their own; unset, `args.learning_rate`.
    - Saves (checkpoints, `save_model`) hold the adapters, the modules saved with them and any trainable backbone
      weight, as `loramix.save` writes them (`loramix.load(base_model, folder)` reads them); `resume_from_checkpoint`
      and `load_best_model_at_end` load them back. The frozen base model is never written.
    - The Hub (`push_to_hub=True`, `trainer.push_to_hub()`): each push holds the newest save's adapters, and the
      model card is `Trainer`'s with `library_name: loramix` and how to load them (`loramix.load(base, repo_id)`).
    - `model_init` (a hyperparameter search's trials): each model it returns is wrapped and brings its router's
      auxiliary terms, as a model passed in does.

    Not supported: DeepSpeed and FSDP (their saves hold the whole model), auxiliary terms with parameters of their
    own (TwD's projection; train it with `loramix train`), and `compute_loss_func` beside auxiliary terms. Data
    parallel training (`torchrun`, `accelerate launch`) is `Trainer`'s own; two CPU processes are tested.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *args: Any,
        aux_losses: Sequence[AuxLoss] | None = None,
        aux_settings: dict[str, Any] | None = None,
        router_lr: float | None = None,
        head_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None and kwargs.get("model_init") is None:
            raise ConfigError(
                "LoramixTrainer: pass the model with loramix adapters injected (model=...), or a model_init that "
                "returns one"
            )
        if aux_losses is not None and aux_settings:
            raise ConfigError(
                "LoramixTrainer: aux_settings set the default terms; with aux_losses given, set those"
            )
        for key, lr in (("router_lr", router_lr), ("head_lr", head_lr)):
            if lr is not None and not lr > 0:
                raise ConfigError(f"{key}: a learning rate is positive (got {lr!r})")
        self.router_lr, self.head_lr = router_lr, head_lr
        self.aux_logs: dict[str, list[Tensor]] = {}
        self.aux_spec = (aux_losses, aux_settings or {})
        wrapped = None if model is None else self.adopt(model)  # with model_init, `Trainer` calls it
        super().__init__(wrapped, *args, **kwargs)
        self.accepts_by_trainer = self.model_accepts_loss_kwargs
        self.data_collator = TaskIdsCollator(self.data_collator)
        # the labels and whether a loss comes back, read from the model inside the wrapper as from a bare one
        if self.args.label_names is None:
            self.label_names = find_labels(type(self.injected))
        self.can_return_loss = can_return_loss(type(self.injected))
        if self.label_smoother is not None and type(self.injected).__name__ in CAUSAL_LMS:
            # `Trainer` shifts a causal LM's labels by the name of the model it holds, here the wrapper's
            self.label_smoother = partial(shifted, self.label_smoother)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ConfigError(
                "LoramixTrainer: DeepSpeed and FSDP are not supported (their saves hold the whole model); "
                "train on several GPUs data parallel (`accelerate launch`), or with `loramix train`"
            )
        self.settle()

    def adopt(self, model: nn.Module) -> LoramixModel:
        """Take `model` (adapters injected) as the one to train, wrapped, with the auxiliary terms its router trains
        with (the ones given, or `aux_losses_for` it)."""
        wrapped = model if isinstance(model, LoramixModel) else LoramixModel(model)
        self.injected = wrapped.model
        given, settings = self.aux_spec
        terms = list(given) if given is not None else aux_losses_for(self.injected, **settings)
        owning = [
            t.name for t in terms if isinstance(t, nn.Module) and any(p.requires_grad for p in t.parameters())
        ]
        if owning:
            raise ConfigError(
                f"LoramixTrainer: the auxiliary terms {', '.join(owning)} have parameters of their own (TwD's "
                "projection), which this trainer does not optimize or save; train them with `loramix train`"
            )
        self.aux_losses = [t for t in terms if t.weight > 0]
        return wrapped

    def settle(self) -> None:
        """What depends on the model and its terms beside `Trainer`'s own setup: a `compute_loss_func` refused
        beside auxiliary terms, and whether the model is given `num_items_in_batch`."""
        if self.aux_losses and self.compute_loss_func is not None:
            raise ConfigError(
                "LoramixTrainer: compute_loss_func scales its loss for gradient accumulation, the auxiliary "
                "terms per micro-batch; pass aux_losses=[] to use it, or subclass and add the terms yourself"
            )
        # `Trainer` read the wrapper's forward, which takes any keyword: ask the model inside whether it takes
        # `num_items_in_batch`; with auxiliary terms, each micro-batch's loss is its own mean, as the terms are
        self.model_accepts_loss_kwargs = (
            self.accepts_by_trainer and accepts_loss_kwargs(self.injected) and not self.aux_losses
        )

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """`model_init`'s model (as `Trainer` makes one at the start and at each `train`, a hyperparameter search's
        trial included), adopted as a model passed in is."""
        wrapped = self.adopt(super().call_model_init(trial))
        if hasattr(self, "accepts_by_trainer"):  # a new model after `Trainer`'s setup
            self.settle()
        return wrapped

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """`Trainer`'s optimizer, with the routers' parameters in groups of their own at `router_lr` and those of the
        adapter config's `modules_to_save` at `head_lr`, where set (each keeping its weight decay)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        saved = [
            p for m in saved_modules(self.injected, get_info(self.injected).config) for p in m.parameters()
        ]
        for lr, params in (
            (self.router_lr, parameters_by_role(self.injected)["router"]),
            (self.head_lr, saved),
        ):
            if lr is not None:
                own_groups(optimizer, {id(p) for p in params}, lr)
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        # the wrapper's forward takes **kwargs: name the inputs of the model inside it, and the task ids
        if self._signature_columns is None:
            columns = list(inspect.signature(self.injected.forward).parameters)
            self._signature_columns = [*columns, "task_ids", "label", "label_ids", *self.label_names]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        inputs = dict(inputs)
        task_ids = inputs.pop("task_ids", None)
        mask = inputs.get("attention_mask")
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        with routing(self.injected, task_ids=task_ids, attention_mask=mask) as state:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training and self.aux_losses:
            batch = {"attention_mask": mask, "task_ids": task_ids}
            loss, parts = with_aux_losses(loss, self.aux_losses, state, batch)
            for name, value in parts.items():
                self.aux_logs.setdefault(name, []).append(value.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs gain the mean of the model's loss and each auxiliary term since the last log (this process's
        batches)."""
        if "loss" in logs and self.aux_logs:
            for name, values in self.aux_logs.items():
                logs[f"{name}_loss"] = round(float(torch.stack(values).float().mean()), 6)
            self.aux_logs.clear()
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Tensor] | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        save(self.injected, folder)
        processor = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(folder)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # `Trainer` copies the checkpoint's model files it knows by name into `output_dir` and uploads that folder:
        # the adapters' files are copied too, or the push would not hold them
        if self.is_world_process_zero() and self.args.hub_strategy != HubStrategy.END:
            for name in (WEIGHTS_FILE, CONFIG_FILE):  # the record, which names the weights' digest, last
                source = Path(checkpoint_folder) / name
                if source.is_file():
                    atomic_write_bytes(Path(self.args.output_dir) / name, source.read_bytes())
        super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        card = Path(self.args.output_dir) / CARD_FILE
        if self.is_world_process_zero() and card.is_file():
            repo_id = (
                getattr(self, "hub_model_id", None)
                or kwargs.get("model_name")
                or Path(self.args.output_dir).name
            )
            text = trainer_card(self.injected, repo_id, card.read_text(encoding="utf-8"))
            atomic_write_bytes(card, text.encode("utf-8"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_into(self.injected, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_into(self.injected, self.state.best_model_checkpoint)


class LoramixTrainer(LoramixTrainerMixin, Trainer):
    """Hugging Face `Trainer` for a model with loramix adapters; see :class:`LoramixTrainerMixin`.

    Example:
        >>> trainer = loramix.LoramixTrainer(model=model, args=TrainingArguments("out"), train_dataset=rows)
    """
