"""The parts of a `loramix train` run that every method shares: data, model, one training phase, evaluation, the
saved run and its reload. A method (`loramix.methods`) composes them into its schedule."""

from __future__ import annotations

import random
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from loramix.config import AdapterConfig
from loramix.data import MultiTaskData, TextCollator, load_task_specs, tasks_from_directory
from loramix.data.generation import GenerationCollator
from loramix.data.readers import integer_names
from loramix.data.spec import TaskSpec
from loramix.errors import CheckpointError, ConfigError, DataError, InjectionError
from loramix.heads import Head, LabelPromptHead, LanguageModelHead, TaskHeads
from loramix.heads.label_prompt import prompt_texts
from loramix.inject import inject
from loramix.io.checkpoint import load, read_checkpoint, save
from loramix.io.files import atomic_write_bytes, atomic_write_json
from loramix.models import check_model_path, check_positions, load_backbone
from loramix.preflight import check_output_dir, finished_adapter
from loramix.report import write_report
from loramix.train.aux_losses import AuxLoss
from loramix.train.callbacks import (
    METRIC_TASKS,
    Checkpointer,
    JsonlLogger,
    PeriodicEvaluation,
    ProgressBar,
)
from loramix.train.config import CONFIG_FILE, RunConfig
from loramix.train.evaluate import eval_options, evaluate
from loramix.train.loop import Trainer, processes
from loramix.train.model import MultiTaskModel
from loramix.train.plan import announce, plan_lines
from loramix.train.resume import DATA_FILE, data_files
from loramix.train.routing_log import RoutingLog
from loramix.train.trackers import Trackers, chosen_trackers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def task_specs(run: RunConfig) -> list[TaskSpec]:
    if all(isinstance(t, str) for t in run.tasks):
        assert run.tasks_dir is not None
        return tasks_from_directory(
            run.tasks_dir, list(run.tasks), max_train_examples=run.max_train_examples, seed=run.seed
        )  # type: ignore[arg-type]
    specs = load_task_specs(run.tasks)  # type: ignore[arg-type]
    if run.max_train_examples is not None:
        specs = [s.model_copy(update={"max_train_examples": run.max_train_examples}) for s in specs]
    return specs


def is_generative(run: RunConfig, task_types: Sequence[str]) -> bool:
    """Whether the run trains generation tasks (on a causal LM); a run does not mix them with classifiers."""
    generation = [t == "generation" for t in task_types]
    if any(generation) and not all(generation):
        raise ConfigError(
            "tasks: a run's tasks are all generation tasks or none are (a causal LM answers in text, a classifier "
            "in classes); a classification task can become a generation task whose responses are its label words "
            "(scorer: label)"
        )
    if any(generation) and run.head != "classification":
        raise ConfigError(
            f"head: {run.head!r} is for classification; generation tasks use the causal LM's head"
        )
    return any(generation)


def build_model(run: RunConfig, data: MultiTaskData, adapters: AdapterConfig) -> tuple[MultiTaskModel, Any]:
    """The backbone with these adapters, plus the run's head (`run.head`) over every task; and the tokenizer.
    A run of generation tasks loads the causal LM, whose own output layer is the head."""
    generative = is_generative(run, [t.task_type for t in data.tasks])
    if generative and run.compile:
        raise ConfigError(
            "compile: generation tasks decode with `generate`, which is not compiled here; remove it"
        )
    if generative and run.label_smoothing:
        raise ConfigError(
            "label_smoothing: generation tasks train on their answers' next-token loss, which it does not change; "
            "remove it"
        )
    backbone, tokenizer = load_backbone(
        run.model,
        causal_lm=generative,
        quantize=run.quantize,
        gradient_checkpointing=run.gradient_checkpointing,
    )
    check_positions(backbone, run.max_length, run.model)
    try:
        inject(backbone, adapters)
    except InjectionError as exc:  # the targets came from the run config: a config error, named as one
        raise ConfigError(
            f"the run config's adapter settings do not fit model {run.model!r}: {exc} (set `{exc.setting}` in the "
            "run config)"
        ) from None
    heads: Head
    if generative:
        heads = LanguageModelHead(data.num_tasks)
    elif run.head == "label-prompt":
        numbered = [
            t.name
            for t, spec in zip(data.tasks, data.specs)
            if not spec.label_prompts and integer_names(t.label_names)
        ]
        if numbered:
            print(
                f"loramix: warning: the labels of {', '.join(numbered)} are numbers ('0', '1', ...), which the "
                "label-prompt head encodes as the classes' texts; name them (`labels` in the task spec) or give "
                "`label_prompts`",
                file=sys.stderr,
            )
        heads = label_prompt_head(run, label_prompts(run, data), tokenizer)
    else:
        hidden = backbone.config.hidden_size
        regression = [t.task_type == "regression" for t in data.tasks]
        heads = TaskHeads(hidden, data.num_labels, regression, label_smoothing=run.label_smoothing)
    return MultiTaskModel(backbone, heads, pooling=run.pooling), tokenizer


def collator_of(
    run: RunConfig, task_types: Sequence[str], tokenizer: Any
) -> TextCollator | GenerationCollator:
    """The batches of tasks of these types: tokenized texts, or prompts with responses for a causal LM."""
    if "generation" in task_types:
        return GenerationCollator(tokenizer, max_length=run.max_length)
    return TextCollator(tokenizer, max_length=run.max_length)


def make_collator(run: RunConfig, data: MultiTaskData, tokenizer: Any) -> TextCollator | GenerationCollator:
    """The batches of this run's tasks (:func:`collator_of`); a causal LM's rows are checked against `max_length`
    here: an error names a prompt with no room for its response, a warning counts cut responses."""
    collator = collator_of(run, [task.task_type for task in data.tasks], tokenizer)
    if not isinstance(collator, GenerationCollator):
        return collator
    splits = dict.fromkeys(["train", eval_split(data)] + ([run.eval_split] if run.eval_every else []))
    for task in data.tasks:
        for split in splits:
            collator.check(data.examples(split, task.task_id), f"{task.name} ({split})")
    return collator


def label_prompts(run: RunConfig, data: MultiTaskData) -> list[list[str]]:
    """Each task's class texts: its spec's `label_prompts`, else its label names through `run.label_template`."""
    return [
        prompt_texts(
            task.name,
            task.label_names,
            template=run.label_template,
            prompts=spec.label_prompts,
            task_type=task.task_type,
        )
        for task, spec in zip(data.tasks, data.specs)
    ]


def label_prompt_head(run: RunConfig, texts: list[list[str]], tokenizer: Any) -> LabelPromptHead:
    return LabelPromptHead(
        texts,
        tokenizer=tokenizer,
        label_smoothing=run.label_smoothing,
        max_length=run.max_length,
        texts_follow_route=run.label_texts_follow_route,
        texts_noise=run.label_texts_noise,
    )


def eval_split(data: MultiTaskData) -> str:
    """The split a run is scored on unless told otherwise: `test`, or `validation` where more tasks have one.
    Tasks with no example in it are left out of the scores (`MultiTaskData.scored_tasks`)."""
    return max(("test", "validation"), key=lambda split: len(data.tasks) - len(data.missing(split)))


def prepare_run(run: RunConfig, output_dir: Path, *, replaces: Sequence[Path] = ()) -> MultiTaskData:
    """Threads and seeds set, the data read, the output directory made and the config written. The model path
    and the output folder are checked first, so that neither fails after the data was read. `replaces`: an
    earlier run's files in the output directory, removed once the data has been read and before the config is
    written, so that a config whose data fails leaves the earlier run whole."""
    check_model_path(run.model)
    check_output_dir(output_dir)
    if run.threads:
        torch.set_num_threads(run.threads)
    seed_everything(run.seed)
    data = MultiTaskData(task_specs(run))
    if len(data.missing(eval_split(data))) == data.num_tasks:  # found now, not after training
        raise DataError(
            f"no task has a 'test' or 'validation' split, and a run is scored on one when it ends (tasks: "
            f"{', '.join(data.task_names)}); give at least one task a `test:` file"
        )
    if run.eval_every and len(data.missing(run.eval_split)) == data.num_tasks:
        raise DataError(
            f"eval_every: no task has a {run.eval_split!r} split to evaluate on during training (tasks: "
            f"{', '.join(data.task_names)}); give tasks a `{run.eval_split}:` file, or set eval_split"
        )
    if run.eval_every and not any(task.task_type in METRIC_TASKS[run.eval_metric] for task in data.tasks):
        kinds = sorted({task.task_type for task in data.tasks})
        raise ConfigError(
            f"eval_metric: {run.eval_metric} is a score of {' and '.join(METRIC_TASKS[run.eval_metric])} tasks, "
            f"and the tasks here are {' and '.join(kinds)}; choose one of theirs"
            + (" (mse for regression)" if "regression" in kinds else "")
        )
    for path in replaces:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    saved = yaml.safe_dump(run.to_saved_dict(output_dir), sort_keys=False).encode()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # first: the config marks a run begun
        atomic_write_json(output_dir / DATA_FILE, data_files(data.specs))
        atomic_write_bytes(output_dir / CONFIG_FILE, saved)
    except OSError as exc:
        raise ConfigError(
            f"output folder {output_dir}: cannot write there ({exc.strerror or exc}); pass another --output-dir"
        ) from None
    return data


def callbacks_for(
    run: RunConfig,
    output_dir: Path,
    *,
    phase: str | None = None,
    evaluation: PeriodicEvaluation | None = None,
    task_names: list[str] | None = None,
) -> list:
    """The callbacks of one training phase: the learned routers' choices on the training batches, the log,
    checkpoints, the experiment trackers (`report_to`; a phase's tracker run is named by the run's folder and the
    phase's) and a progress bar labelled by the method and `phase` (such as `task 2/10 trec`); `evaluation` first,
    so that the others see its scores. `task_names`: the name of each task id in the batches, where they are not
    the trainer's data's tasks (:class:`RoutingLog`)."""
    name = output_dir.name if phase is None else f"{output_dir.parent.name}/{output_dir.name}"
    trackers = Trackers(chosen_trackers(run.report_to), name, output_dir, run.to_dict())
    callbacks = [
        RoutingLog(output_dir, task_names),
        JsonlLogger(output_dir / "metrics.jsonl"),
        trackers,
        Checkpointer(run.checkpoint_every),
    ]
    if run.progress:
        callbacks.insert(1, ProgressBar(f"{run.method}: {phase}" if phase else None))
    return ([evaluation] if evaluation is not None else []) + callbacks


BEST_FOLDER = "best"  # `keep_best`: the best evaluation's weights, kept beside the checkpoints for a resume


def periodic_evaluation(
    run: RunConfig, data: MultiTaskData, collator: Any, output_dir: Path
) -> PeriodicEvaluation | None:
    """The evaluations during training that `eval_every` asks for (None: none), scored as the final one is."""
    if not run.eval_every:
        return None
    options = {**eval_options(run), "progress": False}
    return PeriodicEvaluation(
        run.eval_every,
        run.eval_split,
        lambda model: evaluate(model, data, collator, split=run.eval_split, **options),
        keep_best_in=output_dir / BEST_FOLDER if run.keep_best else None,
        patience=run.eval_patience,
        metric=run.eval_metric,
    )


def train_one_phase(
    run: RunConfig,
    data: MultiTaskData,
    output_dir: Path,
    *,
    adapters: AdapterConfig,
    make_aux_losses: Callable[[], Sequence[AuxLoss]] = list,
    prepare_model: Callable[[MultiTaskModel], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Build, train, evaluate and save one run with these adapters and the auxiliary losses `make_aux_losses()`
    makes (after the model, so that seeded initialisation runs in one order); returns its metrics.
    `prepare_model` may change the built model before training (freeze experts, say)."""
    model, tokenizer = build_model(run, data, adapters)
    if prepare_model is not None:
        prepare_model(model)
    if run.progress:
        announce(plan_lines(run, data, model, run.steps))
    collator = make_collator(run, data, tokenizer)
    evaluation = periodic_evaluation(run, data, collator, output_dir)
    trainer = Trainer(
        run,
        model,
        data,
        collator,
        output_dir=output_dir,
        aux_losses=make_aux_losses(),
        callbacks=callbacks_for(run, output_dir, evaluation=evaluation),
    )
    if resume and not trainer.resume():
        print(
            f"loramix: no checkpoint in {output_dir / 'checkpoints'}; starting from step 0", file=sys.stderr
        )
    history = trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    split = eval_split(data)
    metrics = evaluate(
        model,
        data,
        collator,
        split=split,
        **{**eval_options(run), "progress": run.progress and trainer.accelerator.is_main_process},
    )
    metrics = {"method": run.method, "seed": run.seed, "split": split, **metrics, "history": history}
    if evaluation is not None and evaluation.best is not None:
        metrics["best_eval"] = {**evaluation.best, "split": run.eval_split, "kept": run.keep_best}
        if evaluation.stopped_at is not None:
            metrics["best_eval"]["stopped_at"] = evaluation.stopped_at
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:  # one writer when several processes train
        save_run(output_dir, run, data, model, metrics)
    return metrics


def save_run(
    output_dir: Path,
    run: RunConfig,
    data: MultiTaskData,
    model: MultiTaskModel,
    metrics: dict,
    extra: dict[str, torch.Tensor] | None = None,
    prior_tasks: list[dict] | None = None,
) -> None:
    """Adapters (with the heads and task metadata), metrics.json and the report. `prior_tasks`: the metadata of
    tasks the model learned in an earlier run (a continued continual run), recorded before this run's."""
    tasks_meta = [
        {
            "name": t.name,
            "labels": t.label_names,
            "task_type": t.task_type,
            "input_fields": spec.input_fields(),
            **({"scorer": spec.scorer} if spec.is_generation else {}),
        }
        for t, spec in zip(data.tasks, data.specs)
    ]
    if run.head == "label-prompt":  # the class texts the head encodes; the reload tokenizes them again
        for meta, texts in zip(tasks_meta, label_prompts(run, data)):
            meta["label_prompts"] = texts
    tasks_meta = list(prior_tasks or []) + tasks_meta
    save(
        model.backbone,
        output_dir / "adapter",
        metadata={"tasks": tasks_meta, "run": run.to_dict(), "pooling": run.pooling},
        extra_tensors={**{f"heads.{k}": v for k, v in model.heads.state_dict().items()}, **(extra or {})},
    )
    atomic_write_json(output_dir / "metrics.json", metrics, sort_keys=False)  # tasks in config order
    write_report(output_dir, [metrics])


def on_inference_device(run: RunConfig, model: MultiTaskModel) -> MultiTaskModel:
    """`loramix eval` and `predict` answer on the GPU when there is one (this process's, where `torchrun` or
    `accelerate launch` started several), as the trainer's own evaluation does; a quantized base was placed there
    when it loaded. `CUDA_VISIBLE_DEVICES=` keeps them on the CPU."""
    if torch.cuda.is_available() and run.quantize is None:
        model.to(processes().device)
    return model


def load_trained(
    run_dir: str | Path, config_path: str | Path | None = None
) -> tuple[RunConfig, MultiTaskModel, Any, list[dict]]:
    """A finished run's config, model (backbone + adapters + heads), tokenizer and task metadata."""
    run_dir = Path(run_dir)
    run = RunConfig.from_yaml(config_path or run_dir / CONFIG_FILE)
    record, tensors = read_checkpoint(finished_adapter(run_dir))
    trained_with = (record["metadata"].get("run") or {}).get("method")
    if config_path is not None and trained_with not in (None, run.method):
        raise ConfigError(
            f"method: {run_dir} was trained with method {trained_with}, and {config_path} names {run.method}; a "
            f"run is evaluated by the method that trained it: set method: {trained_with}"
        )
    tasks_meta = record["metadata"].get("tasks")
    if not tasks_meta:
        raise CheckpointError(f"{run_dir / 'adapter'}: no task metadata; was it written by loramix train?")
    generative = is_generative(run, [t["task_type"] for t in tasks_meta])
    backbone, tokenizer = load_backbone(run.model, causal_lm=generative, quantize=run.quantize)
    check_positions(backbone, run.max_length, run.model)
    load(backbone, run_dir / "adapter")
    heads: Head
    if generative:
        heads = LanguageModelHead(len(tasks_meta))
    elif run.head == "label-prompt":
        missing = [t["name"] for t in tasks_meta if not t.get("label_prompts")]
        if missing:
            raise CheckpointError(
                f"{run_dir / 'adapter'}: a label-prompt run, but tasks {missing} have no label_prompts in the "
                "task metadata"
            )
        heads = label_prompt_head(run, [t["label_prompts"] for t in tasks_meta], tokenizer)
    else:
        num_labels = [1 if t["task_type"] == "regression" else len(t["labels"]) for t in tasks_meta]
        heads = TaskHeads(
            backbone.config.hidden_size, num_labels, [t["task_type"] == "regression" for t in tasks_meta]
        )
    heads.load_state_dict(
        {k.removeprefix("extra.heads."): v for k, v in tensors.items() if k.startswith("extra.heads.")}
    )
    return run, MultiTaskModel(backbone, heads, pooling=run.pooling), tokenizer, tasks_meta
