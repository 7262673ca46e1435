"""The run configuration: what `loramix train` reads from YAML. Flat, typed, validated before any work.

Every field is documented once, here; a wrong key or value names the key and what is allowed.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from loramix.config import BlockIndices, format_validation_error
from loramix.errors import ConfigError, did_you_mean
from loramix.remote import REPO_ID
from loramix.train.config_files import (
    CONFIG_FILE,
    apply_overrides,
    continued_settings,
    model_is_path,
    path_slots,
    read_config_file,
    resolve_paths,
)

__all__ = ["BOOKKEEPING_KEYS", "CONFIG_FILE", "MAX_LR", "RunConfig"]

Tracker = Literal["tensorboard", "wandb", "mlflow"]  # `report_to` (train/trackers.py)

# Keys that change how a run is watched, saved or held in memory, not what it computes (gradient checkpointing
# gives the same gradients, tests/test_recompute.py): a resumed run may change them freely, and everything else must
# match the run it resumes (`loramix train --resume --allow-config-change` overrides that).
BOOKKEEPING_KEYS = frozenset(
    {
        "progress",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "keep_task_states",
        "threads",
        "eval_batch_size",
        "gradient_checkpointing",
        "eval_every",
        "eval_split",
        "eval_metric",
        "report_to",
        "push_to_hub",
        "hub_private",
    }
)


# AdamW's learning rates above this are typing slips (`5e4` for `5e-4`); far above it its step overflows float32
MAX_LR = 1e3


class RunConfig(BaseModel):
    """One training run: model, data, method and optimisation.

    Example:
        >>> run = RunConfig(method="mola-grad", model="minilm", tasks_dir="data", tasks=["sst2", "trec"])
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a float is finite: `lr: .inf` stops here
    # the paths (see `path_slots`) written relative in a YAML file or a `--set`, resolved since: a saved run keeps
    # them relative (see to_saved_dict)
    _written_relative: frozenset[str] = PrivateAttr(frozenset())

    # what to train
    method: str = Field(
        "mola-grad",
        description="The method (one of loramix.methods.METHODS); see the README's table of methods.",
    )
    model: str = Field(
        "minilm", description="'minilm' (offline all-MiniLM-L6-v2), a local path or a hub name."
    )
    tasks_dir: str | None = Field(
        None, description="A directory laid out like shared/data (one folder per task)."
    )
    tasks: list[str] | list[dict[str, Any]] = Field(
        default_factory=list,
        description="Task names in tasks_dir, or full task specs (name, train, test, ...).",
    )
    max_train_examples: int | None = Field(
        None, ge=1, description="Subsample each task's train split to this."
    )
    max_eval_examples: int | None = Field(
        None,
        ge=1,
        description="Evaluate on at most this many per task (a fixed-seed sample, the same every run).",
    )
    # adapters
    rank: int = Field(8, ge=1, description="Rank r of every expert (lora-wide uses E*r).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; scale alpha/r (alpha*E for lora-wide).")
    num_experts: int | None = Field(None, ge=1, description="E; default: one per task (elrea: the clusters).")
    task_to_expert: list[int] | None = Field(None, description="mola-grad: the expert of each task.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Adapter dropout (on the r-dimensional hidden).")
    targets: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules to adapt.")
    layers_to_transform: BlockIndices = Field(
        None,
        description="Adapt only the targets inside these transformer blocks (from 0; one index or a list), as "
        "PEFT's option. A continual run's auto-selector routes inside the inference pass when no block before the "
        "one it reads is adapted: [3, 4, 5] on a 6-block model with `ddas_layer` or `ddas_accept_layer` 3.",
    )
    share: Literal["none", "A", "B"] = Field(
        "none", description="Share A or B across experts (MoSLD, HydraLoRA)."
    )
    shared_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the shared matrix.")
    top_k: int | None = Field(None, ge=1, description="Top-k routing (token-router default 2).")
    train_backbone: bool = Field(False, description="Train the base model jointly (MoLA does).")
    quantize: Literal["8bit", "4bit"] | None = Field(
        None,
        description="Load the backbone quantized by bitsandbytes (CUDA, or its CPU backend; pip install "
        "'loramix[quantize]'): '8bit' LLM.int8, '4bit' NF4. The experts stay in float; not with train_backbone.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations in backward (transformers' non-reentrant activation "
        "checkpointing): less memory for about a third more compute; routing is unchanged.",
    )
    compile: bool = Field(
        False,
        description="Run the adapted model's forward through torch.compile while it trains and is scored (one "
        "graph for every router; the first steps compile). Not for generation tasks, elrea or the continual "
        "methods.",
    )
    pooling: Literal["mean", "cls"] = Field("mean", description="How heads read the encoder output.")
    head: Literal["classification", "label-prompt"] = Field(
        "classification",
        description="'classification': a weight row per class; 'label-prompt': cosine to each class's encoded text "
        "(the default for a continual sequence, `steps_per_task` set: tasks not learned yet are answered zero-shot).",
    )
    label_template: str = Field(
        "{label}", description="label-prompt: the class text of a label ({label}, optionally {task})."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Label smoothing: the share of each classification target spread evenly over its task's own "
        "classes (both heads; regression and generation tasks have none).",
    )
    label_texts_follow_route: bool = Field(
        True,
        description="label-prompt: a sample routed explicitly (by an auto-selector) has its class texts encoded "
        "along its own route; false: by its task's id (the base for tasks not learned yet).",
    )
    label_texts_noise: bool = Field(
        True,
        description="label-prompt: noisy routers (moe-adapters) route the class texts with their training noise, "
        "as the inputs; false: by their clean logits, as at inference.",
    )
    # auxiliary losses (weighted in train/step.py only)
    twd_weight: float = Field(1.0, ge=0, description="mola-router: weight of the TwD loss; 0 turns it off.")
    twd_space: Literal["gates", "logits"] = Field(
        "gates",
        description="TwD: compare the router's gate probabilities (tasks pushed apart take different experts) or "
        "its logits (MoLA's code: scale-blind, so gates may stay uniform).",
    )
    twd_temperature: float = Field(0.1, gt=0, description="TwD: temperature tau of the similarities.")
    twd_projection: bool = Field(
        False, description="TwD: project router logits with a trainable Linear(E, 32) (twd_space 'logits')."
    )
    router_input: str | None = Field(
        None,
        description="mola-router: the module whose output the router pools; null: the input embeddings.",
    )
    balance_weight: float | None = Field(
        None, ge=0, description="Load balance weight (token-router default 0.01)."
    )
    z_loss_weight: float = Field(0.0, ge=0, description="Router z-loss weight.")
    # ELREA
    elrea_base_fraction: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="elrea: share of steps for the base adapter; the rest train the cluster experts (0.25: the "
        "ten-task quality benchmark's choice at 800 steps, see README).",
    )
    elrea_clusters: int | None = Field(
        None, ge=2, description="elrea: clusters; default: chosen by silhouette."
    )
    elrea_feature_dim: int = Field(2048, ge=16, description="elrea: random projection dimension.")
    elrea_feature_examples: int | None = Field(
        None,
        ge=10,
        description="elrea: train examples featurised, clustered and used to train the experts; default: as many "
        "as the expert phase draws (its steps x batch_size x grad_accum).",
    )
    elrea_sign_invariant: bool = Field(
        True,
        description="elrea: cluster and route by gradient axis, not direction (a feature and its negation agree); "
        "the self-label gradient of a classifier flips sign with the predicted class.",
    )
    elrea_top_labels: int = Field(
        3,
        ge=1,
        description="elrea: features averaged over the model's most likely labels, weighted by probability (one "
        "backward pass each; needs elrea_sign_invariant); 1: the predicted label alone.",
    )
    elrea_expert_lr: float | None = Field(
        None, gt=0, le=MAX_LR, description="elrea: learning rate of the experts' phase; default: lr."
    )
    elrea_precondition: bool = Field(
        False, description="elrea: precondition the features by the base run's Adam state (as LESS does)."
    )
    elrea_temperature: float = Field(
        1.0, gt=0, description="elrea: softmax temperature of the ensemble weights."
    )
    elrea_mode: Literal["ensemble", "top1"] = Field("ensemble", description="elrea inference mode.")
    # continual learning (tasks learned in the order of `tasks`, without the earlier tasks' data)
    steps_per_task: int | None = Field(
        None,
        ge=1,
        description="Continual methods: optimizer steps on each task in turn (joint: times the tasks).",
    )
    continue_from: str | None = Field(
        None,
        description="Continual methods: a finished continual run whose learned tasks are kept (experts, routers, "
        "selector, class texts); this config's tasks are learned after them, without the earlier tasks' data. "
        "Every setting a config file leaves out is that run's (its config.yaml).",
    )
    expert_init: Literal["fresh", "previous"] = Field(
        "fresh",
        description="continual-mola-grad: a new task's expert starts adding nothing (fresh), or as a copy of the "
        "previous task's trained expert (previous: what the sequence learned carries forward; earlier experts stay "
        "frozen, so nothing is forgotten by it).",
    )
    moe_experts: int = Field(22, ge=2, description="moe-adapters: experts per block.")
    moe_freeze: int = Field(
        2, ge=0, description="moe-adapters: most-used experts per block frozen after a task."
    )
    adapter_width: int = Field(64, ge=1, description="moe-adapters: bottleneck width of each expert.")
    moe_route_frozen: bool = Field(
        True,
        description="moe-adapters: a new task's routers may choose the experts earlier tasks froze (as published); "
        "false: only the experts still training, while at least top_k are left.",
    )
    ddas_hidden: int = Field(
        64, ge=1, description="Auto-selector (whiten, l2): width of each task's autoencoder."
    )
    ddas_percentile: float = Field(
        95.0,
        gt=0,
        le=100,
        description="Auto-selector: a task accepts inputs up to this percentile of its held-out errors (of all "
        "learned tasks' together with `ddas_threshold: pooled`).",
    )
    ddas_examples: int = Field(
        1000, ge=10, description="Auto-selector: training inputs each task's model is fitted on."
    )
    ddas_features: Literal["hidden", "embeddings", "encoder"] = Field(
        "hidden",
        description="Auto-selector: the base model's hidden state after `ddas_layer` blocks, mean-pooled and "
        "L2-normalised, with the log token count and a sentence pair's segment lengths; or its pooled input "
        "embeddings; or its "
        "pooled encoder output.",
    )
    ddas_layer: int = Field(
        0,
        ge=0,
        description="Auto-selector (`ddas_features: hidden`): transformer blocks run for the feature; 0 reads "
        "the embeddings' output (free at inference), 3 selects better at about 1.5x the cost of a given task id "
        "(free with the experts in blocks 3 and later only: `layers_to_transform`).",
    )
    ddas_accept_layer: int | None = Field(
        None,
        ge=0,
        description="Auto-selector (`ddas_features: hidden`, `ddas_normalize: gaussian`): a second block whose "
        "features alone decide whether an input is familiar to some learned task (else it goes to the base); the "
        "task is then chosen on both blocks' features. 3 sends more unseen inputs to the base at the inference "
        "cost of running 3 blocks. null: block `ddas_layer` decides both.",
    )
    ddas_accept_state: Literal["base", "route"] = Field(
        "base",
        description="Auto-selector with a `ddas_accept_layer`: acceptance reads the base model's state entering "
        "that block, and the task is chosen on both blocks (base); or the task is chosen on block `ddas_layer` "
        "alone and acceptance reads the state entering `ddas_accept_layer` of the pass along the chosen task's "
        "route, compared with that task's training inputs taken through its own experts (route: no base pass "
        "before the routed one when experts sit in every block; rejected inputs are answered again on the base).",
    )
    ddas_tokens: int | None = Field(
        None,
        ge=1,
        description="Auto-selector (`ddas_features: hidden` or `encoder`): its own base pass runs the blocks on "
        "each input's first `ddas_tokens` tokens only, when fitted and when choosing (block 0's state and the token "
        "statistics still read the whole input). 24, with the example configs' selector: about half the pass's "
        "cost, rates within half a point on the selector benchmark. null: the whole input.",
    )
    ddas_precision: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Auto-selector: the precision of its own base pass, when fitted and when choosing (bfloat16: "
        "under autocast, about half the time of float32 on a CPU with bfloat16 instructions; the features are "
        "pooled in float32). The answer pass keeps the model's precision.",
    )
    ddas_normalize: Literal["gaussian", "whiten", "l2"] = Field(
        "gaussian",
        description="Auto-selector: each task's Gaussian of its features' mean and shrunk covariance, the most "
        "likely accepting task (gaussian); an autoencoder per task on features whitened by those, the lowest "
        "z-scored log error (whiten); or the paper's autoencoders on L2-normalised features, error/threshold (l2).",
    )
    ddas_threshold: Literal["task", "pooled"] = Field(
        "task",
        description="Auto-selector: each task accepts up to the `ddas_percentile` of its own held-out errors "
        "(task), or every task up to that percentile of all learned tasks' held-out errors together (pooled, "
        "gaussian only: sends more unseen inputs to the base with block-3 features).",
    )
    ddas_neighbours: int = Field(
        0,
        ge=0,
        description="Auto-selector (gaussian): 0: each task's Gaussian of the acceptance features decides whether "
        "it accepts an input; k: the input's distance to its k-th nearest among the task's fitting features does "
        "(the threshold a percentile of held-out inputs' distances; the Gaussians still choose the task). 5, with "
        "`ddas_accept_layer: 3` and `ddas_threshold: pooled`, sends the most unseen inputs to the base; each task "
        "then keeps its fitting features with the adapters.",
    )
    ddas_choice: Literal["own", "shared"] = Field(
        "own",
        description="Auto-selector (gaussian): the task is the likeliest under each task's own Gaussian (own), or "
        "the nearest mean under one covariance shared by the learned tasks (shared: linear discriminant analysis; "
        "tells alike tasks apart more often).",
    )
    ddas_mix: Literal["none", "posterior", "blend"] = Field(
        "none",
        description="Auto-selector (gaussian), at inference: an input of a given task that some learned task "
        "accepts is answered through the route the selector chose (none), or by its answers through every learned "
        "task's route, mixed by the selector's posterior over the tasks (posterior: one more pass for each task "
        "whose weight is not negligible), or in one pass whose every adapted layer mixes the tasks' experts by that "
        "posterior (blend: continual-mola-grad; one row per input, a little slower than the hard route). Inputs kept "
        "on the base and inputs of no given task are answered as by none.",
    )
    ddas_shrinkage: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Auto-selector (whiten, gaussian): covariance shrinkage towards its mean variance.",
    )
    lae_decay: float = Field(
        0.9999, gt=0, lt=1, description="lae: EMA decay of the offline adapter, per step."
    )
    steps: int = Field(500, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Samples per step (before accumulation).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps per optimizer step.")
    max_length: int = Field(
        128,
        ge=8,
        description="Tokens per input (pairs together; a generation task's prompt and response together).",
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="Generation tasks: tokens generated per answer at evaluation; default: the task's longest "
        "reference plus 8.",
    )
    lr: float = Field(5e-4, gt=0, le=MAX_LR, description="Learning rate of the adapters.")
    router_lr: float = Field(
        1e-3, gt=0, le=MAX_LR, description="Learning rate of routers (and the TwD projection)."
    )
    head_lr: float = Field(2e-3, gt=0, le=MAX_LR, description="Learning rate of the task heads.")
    backbone_lr: float = Field(
        2e-5, gt=0, le=MAX_LR, description="Learning rate of the backbone when trained."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="Linear warm-up share of steps, then lr_schedule's decay."
    )
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="After the warm-up, every learning rate follows a cosine to 0 at the last step, a straight "
        "line to 0, or stays constant.",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null turns it off.")
    sampling: Literal["proportional", "uniform", "temperature"] = Field(
        "temperature", description="Task mixing."
    )
    sampling_temperature: float = Field(2.0, gt=0, description="T of temperature sampling (p ~ n^(1/T)).")
    sampling_weights: dict[str, float] | None = Field(
        None,
        description="Task name -> a factor on how often the task is drawn, applied to `sampling`'s shares before "
        "they are renormalised (tasks not named: 1). With sampling: uniform, the shares are the factors' own.",
    )
    single_task_batches: bool = Field(False, description="One task per batch instead of mixed batches.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast through accelerate.")
    seed: int = Field(0, ge=0, description="Seed for data order, initialisation and dropout.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice.")
    # evaluation during training (eval_every, eval_split and eval_metric are bookkeeping unless keep_best or eval_patience
    # make the evaluations decide where the run ends)
    eval_every: int = Field(
        0,
        ge=0,
        description="Steps between evaluations during training, each task scored on `eval_split` (at most "
        "max_eval_examples each), logged to metrics.jsonl and TensorBoard and drawn in the report; the last step "
        "is evaluated too. 0: only the evaluation at the end. Training itself is unchanged.",
    )
    keep_best: bool = Field(
        False,
        description="With eval_every: end the run with the weights of the evaluation with the best mean "
        "eval_metric (the earliest of equal ones), not the last step's; the final evaluation and the saved adapter are "
        "that state's, and metrics.json's `best_eval` names its step.",
    )
    eval_patience: int | None = Field(
        None,
        ge=1,
        description="With eval_every: stop training early once this many evaluations in a row have not beaten the "
        "best mean eval_metric; the run then evaluates and saves as at its end (with keep_best, the best "
        "evaluation's weights). None: train every step.",
    )
    eval_metric: Literal["accuracy", "macro_f1", "f1", "exact_match", "mse"] = Field(
        "accuracy",
        description="With eval_every: the score whose mean over the tasks that have it ranks the evaluations, for "
        "keep_best, eval_patience and best_eval: accuracy (classification and generation), macro_f1 "
        "(classification), f1 or exact_match (generation), mse (regression; lower is better).",
    )
    eval_split: Literal["validation", "test"] = Field(
        "validation",
        description="The split of the evaluations during training (`eval_every`); tasks without it are left out "
        "of them, and a run where no task has it stops before training.",
    )
    # bookkeeping
    eval_batch_size: int = Field(64, ge=1, description="Batch size for evaluation.")
    log_every: int = Field(10, ge=1, description="Steps between metric lines.")
    checkpoint_every: int = Field(0, ge=0, description="Steps between checkpoints; 0: only at the end.")
    keep_checkpoints: int = Field(
        2, ge=1, description="Newest checkpoints kept: a resume falls back to an older one if one is damaged."
    )
    keep_task_states: int | None = Field(
        None,
        ge=1,
        description="Continual methods: the newest states after a task kept (after-task-<t>/; 129-173 MB "
        "each for the MoE-Adapters example); None: every one, the record of the model after each task. A resume "
        "needs only the newest.",
    )
    progress: bool = Field(True, description="Show a progress bar.")
    report_to: list[Tracker] | None = Field(
        None,
        description="Experiment trackers that each logged step and evaluation go to, through accelerate: "
        "tensorboard, wandb, mlflow (each must be installed). None: TensorBoard where it is installed; []: none.",
    )
    push_to_hub: str | None = Field(
        None,
        description="A Hugging Face Hub repository, owner/name, that the finished run is uploaded to (as `loramix "
        "push` does: config, adapters, metrics, report and a model card; created if needed). None: not uploaded.",
    )
    hub_private: bool | None = Field(
        None, description="With push_to_hub: create the repository private (None: the Hub's default)."
    )

    @field_validator("push_to_hub")
    @classmethod
    def _repository(cls, value: str | None) -> str | None:
        if value is not None and not REPO_ID.fullmatch(value):
            raise ValueError(f"{value!r} is no Hub repository: one is named owner/name")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if not self.tasks:
            raise ValueError("tasks is empty: list task names (with tasks_dir) or task specs")
        names_only = all(isinstance(t, str) for t in self.tasks)
        if names_only and self.tasks_dir is None:
            raise ValueError("tasks lists names but tasks_dir is not set")
        if not names_only and not all(isinstance(t, dict) for t in self.tasks):
            raise ValueError("tasks must be all names or all specs, not a mix")
        names = [t if isinstance(t, str) else t.get("name") for t in self.tasks]
        for name, factor in (self.sampling_weights or {}).items():
            if name not in names:
                raise ValueError(
                    f"sampling_weights names {name!r}, not a task of this run; its tasks are: "
                    f"{', '.join(map(str, names))}{did_you_mean(name, map(str, names))}"
                )
            if not factor > 0:
                raise ValueError(
                    f"sampling_weights gives {name!r} the factor {factor}; a factor must be above 0"
                )
        if not _plain_template(self.label_template):
            raise ValueError(
                f"label_template must contain {{label}} and no field but {{task}}, without format specs or "
                f"conversions (got {self.label_template!r})"
            )
        for key in ("keep_best", "eval_patience", "eval_metric"):
            if getattr(self, key) not in (False, None, "accuracy") and not self.eval_every:
                raise ValueError(f"{key} reads the evaluations during training: set eval_every too")
        if self.quantize is not None and self.train_backbone:
            raise ValueError("quantize cannot go with train_backbone: quantized weights do not train")
        if "head" not in self.model_fields_set and self.steps_per_task is not None:
            # a continual sequence scores classes by their texts unless told otherwise
            self.head = "label-prompt"
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "run config") -> RunConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where, cls.model_fields)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        """Read a YAML file and apply `key=value` overrides (values parsed as YAML)."""
        path = Path(path)
        data = read_config_file(path)
        relative = resolve_paths(data, path.parent)  # the file's paths, against its folder
        data = apply_overrides(data, overrides or [])
        replaced = {item.partition("=")[0].strip() for item in overrides or []}
        relative = {slot for slot in relative if slot.split(".")[0] not in replaced}
        relative |= resolve_paths(data, Path.cwd())  # a `--set` path, against the folder it was typed in
        where = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
        data, relative, earlier = continued_settings(data, relative, cls.model_fields)
        if earlier is not None:
            where += f" (the settings it leaves out from {earlier})"
        run = cls.from_dict(data, where=where)
        run._written_relative = frozenset(relative)
        return run

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def sampling_factors(self, names: list[str]) -> list[float]:
        """Each task's `sampling_weights` factor (1 where it names none), for the tasks `names` in order."""
        return [float((self.sampling_weights or {}).get(name, 1.0)) for name in names]

    def __eq__(self, other: object) -> bool:
        """Configs with the same settings are equal; how a path was written (relative to which file) does not
        count, only what it names."""
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def to_saved_dict(self, folder: str | Path) -> dict[str, Any]:
        """What a run's `config.yaml` in `folder` stores: :meth:`to_dict` with every path that was written
        relative (`path_slots`) rewritten relative to `folder`. A config file's relative paths are read against
        its own folder; the path the user wrote was relative to theirs, so the saved copy names the same files
        from the run directory, holds no absolute path of this machine, and stays valid when the run and its data
        move together. An absolute path is kept as written."""
        data = self.to_dict()
        for slot, (holder, key) in path_slots(data).items():
            value = Path(holder[key])
            if slot in self._written_relative or not value.is_absolute():
                try:
                    relative = os.path.relpath(value.resolve(), Path(folder).resolve())
                except ValueError:  # no relative path between them (another drive): keep it absolute
                    holder[key] = str(value.resolve())
                    continue
                # a model below the run folder written `./tiny`, not `tiny`, which would read as a hub name
                holder[key] = relative if slot != "model" or model_is_path(relative) else f"./{relative}"
        return data


def _plain_template(template: str) -> bool:
    """Whether `template` names `{label}` (and maybe `{task}`) and nothing else: no other field, no format spec
    or conversion (a width such as `{label:>9999999999}` would build a string of that size when filled)."""
    try:
        fields = [
            (name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
        ]
    except ValueError:  # an unmatched brace
        return False
    named = [name for name, _, _ in fields if name is not None]
    plain = all(not spec and conversion is None for name, spec, conversion in fields if name is not None)
    return plain and "label" in named and set(named) <= {"label", "task"}
