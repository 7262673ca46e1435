"""The method interface: what a method plugs into the shared parts, and the registry of methods.

A method gives its adapter config, its auxiliary loss terms, and its schedule (`train`: one phase by default;
ELREA's phases; a task-by-task sequence), and says how a finished run is evaluated and exported. The CLI runs
whatever method the config names through :func:`get_method`, without branching on it; `loramix.train` knows no
method by name.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ValidationError

from loramix.config import AdapterConfig, format_validation_error
from loramix.data import MultiTaskData, TextCollator
from loramix.errors import ConfigError, did_you_mean
from loramix.io.checkpoint import CONFIG_FILE
from loramix.io.files import read_json
from loramix.kinds import check_kinds
from loramix.models import resolve_model_path
from loramix.preflight import select_tasks
from loramix.train.aux_losses import AuxLoss
from loramix.train.config import RunConfig
from loramix.train.evaluate import eval_options, evaluate
from loramix.train.model import MultiTaskModel
from loramix.train.plan import plan_lines
from loramix.train.predict import RoutedPredictor
from loramix.train.resume import CHANGES_FILE
from loramix.train.run import BEST_FOLDER, eval_split, prepare_run, task_specs, train_one_phase
from loramix.train.serve_export import export_tasks
from loramix.train.task_export import fixed_gate_note


class Method:
    """Base of methods. A subclass sets `name` and overrides what differs."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    continual: ClassVar[bool] = False  # learns tasks one after another (`steps_per_task`, `continue_from`)
    uses_selector: ClassVar[bool] = False  # an auto-selector (DDAS, `ddas_*`) routes at inference
    # its training can be scored on the way (`eval_every`)
    evaluates_during_training: ClassVar[bool] = True
    # its model may run compiled (`compile`): one forward per step, without hooks or transforms of its own
    compiles: ClassVar[bool] = True

    def validate(self, run: RunConfig) -> None:
        """Raise ConfigError, naming the key, when `run` asks for something this method cannot do. Runs at the door,
        before any data or model is read: the adapter settings are built here once, for as many tasks as the
        config lists."""
        if run.task_to_expert is not None:
            raise ConfigError(f"task_to_expert is only used by method mola-grad, not {self.name}")
        self.check_sequence_and_adapters(run)

    def check_sequence_and_adapters(self, run: RunConfig) -> None:
        """What every method checks: `compile` and `eval_every` only where the method can run them;
        `continue_from`, `keep_task_states`, `steps_per_task` and `ddas_*` only for continual methods; the adapter
        config this method builds, as any is checked."""
        if run.compile and not self.compiles:
            raise ConfigError(
                f"compile: method {self.name} runs its model in ways torch.compile is not tested with here "
                "(gradient transforms, hooks inside blocks); remove compile"
            )
        if run.eval_every and not self.evaluates_during_training:
            raise ConfigError(
                f"eval_every: method {self.name} is scored only as its own schedule scores it (every task after "
                "each task it learns), not during training; remove eval_every"
            )
        for key in ("continue_from", "keep_task_states"):
            if getattr(run, key) is not None and not self.continual:
                raise ConfigError(f"{key}: method {self.name} does not learn tasks one after another")
        if run.steps_per_task is not None and not self.continual:
            continual = ", ".join(name for name, method in METHODS.items() if method.continual)
            raise ConfigError(
                f"steps_per_task: method {self.name} trains on every task at once for `steps`; steps per task are "
                f"for the methods that learn tasks one after another ({continual})"
            )
        selector = [
            k
            for k, f in RunConfig.model_fields.items()
            if k.startswith("ddas_") and getattr(run, k) != f.default
        ]
        if selector and not self.continual:  # a continual baseline may share its config with a DDAS method
            users = ", ".join(name for name, method in METHODS.items() if method.uses_selector)
            raise ConfigError(
                f"{selector[0]}: method {self.name} has no auto-selector; the ddas_* settings are for {users}"
            )
        where = f"adapter settings of method {self.name}"
        try:
            adapters = check_kinds(self.adapter_config(run, len(run.tasks)), where)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where, AdapterConfig.model_fields)) from None
        if run.router_input is not None and adapters.router_input is None:
            raise ConfigError(
                f"router_input: method {self.name} has no router that reads it (mola-router's does); remove it"
            )

    def adapter_config(self, run: RunConfig, num_tasks: int) -> AdapterConfig:
        raise NotImplementedError

    def plan(self, run: RunConfig, data: MultiTaskData, model: Any) -> list[str]:
        """The run's plan (:mod:`loramix.train.plan`): every task trained together for `steps`."""
        return plan_lines(run, data, model, run.steps)

    def resume_state(self, output_dir: Path) -> list[Path]:
        """What `--resume` reads in `output_dir`: a fresh run there removes it first, so that a later resume cannot
        continue an earlier run's checkpoints."""
        return [output_dir / "checkpoints", output_dir / BEST_FOLDER]

    def resume_checkpoints(self, output_dir: Path) -> Path:
        """The checkpoint folder `--resume` will load from (its trainer's refusals are checked before anything is
        written)."""
        return output_dir / "checkpoints"

    def outputs(self, output_dir: Path) -> list[Path]:
        """What a finished run leaves in `output_dir` besides its config: a fresh run there removes an earlier run's
        first, so that nothing of it (its adapters, metrics, evaluations, report) passes for this run's."""
        names = (
            "adapter",
            "metrics.json",
            "metrics.jsonl",
            "report.md",
            "plots",
            "tensorboard",
            CHANGES_FILE,
        )
        return [*(output_dir / n for n in names), *sorted(output_dir.glob("eval-*.json"))]

    def aux_losses(self, run: RunConfig, adapters: AdapterConfig) -> list[AuxLoss]:
        """The auxiliary terms the trainer adds to the task loss (weighted in the step)."""
        return []

    def train(
        self, run: RunConfig, output_dir: Path, *, resume: bool = False, replaces: Sequence[Path] = ()
    ) -> dict[str, Any]:
        """The whole run into `output_dir`; returns its metrics. One phase unless the method says otherwise.
        `replaces`: an earlier run's files in `output_dir`, removed once this run's data has been read."""
        data = prepare_run(run, output_dir, replaces=replaces)
        adapters = self.adapter_config(run, data.num_tasks)
        return train_one_phase(
            run,
            data,
            output_dir,
            adapters=adapters,
            make_aux_losses=lambda: self.aux_losses(run, adapters),
            resume=resume,
        )

    def evaluate(
        self,
        run_dir: Path,
        run: RunConfig,
        model: MultiTaskModel,
        data: MultiTaskData,
        collator: TextCollator,
        split: str,
    ) -> dict[str, Any]:
        """A finished run's metrics on `split`."""
        check_eval_tasks(run_dir, data)
        return evaluate(model, data, collator, split=split, **eval_options(run))

    def predictor(
        self, run_dir: Path, run: RunConfig, model: MultiTaskModel, collator: Any, tasks: list[dict]
    ) -> RoutedPredictor:
        """How a finished run answers new inputs (`loramix predict`), routed as `evaluate` routes them; `tasks` is
        the saved task metadata, every task the model knows."""
        return RoutedPredictor(model, collator, tasks, max_new_tokens=run.max_new_tokens)

    def export(
        self, run: RunConfig, model: MultiTaskModel, tasks: list[dict], args: argparse.Namespace
    ) -> str:
        """Write the tasks `args` asks for (`--task`, repeatable, or `--all-tasks`) into `args.out`: one task as a PEFT
        LoRA adapter with its head rows and a note, several as a folder each with a serving manifest, and each
        task's merged model under `--merged` (`loramix.train.serve_export`); returns what was written, and for a
        router that decides per input, that the adapters are mean gates and how far they are from the routed model."""
        all_tasks = getattr(args, "all_tasks", False)
        if getattr(args, "expert", None) is not None:
            raise ConfigError(
                f"--expert: a {self.name} run's experts are its tasks; export them with --task (its tasks are: "
                f"{', '.join(t['name'] for t in tasks)})"
            )
        names = select_tasks([t["name"] for t in tasks], args.task, all_tasks)

        def load_data() -> tuple[MultiTaskData, TextCollator, str]:
            from transformers import AutoTokenizer

            data = MultiTaskData(task_specs(run))
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(run.model))
            return data, TextCollator(tokenizer, max_length=run.max_length), eval_split(data)

        written = export_tasks(
            run,
            model,
            tasks,
            names,
            args.out,
            load_data=load_data,
            method=self.name,
            several=all_tasks or len(names) > 1,
            merged=getattr(args, "merged", False),
            gate_note=self.gate_note,
        )
        return written.summary()

    def gate_note(self, model: MultiTaskModel, task: int) -> str:
        """What the export of a task with a fixed gate is, in words (see `loramix.train.task_export`)."""
        return fixed_gate_note(model, task)


def check_eval_tasks(run_dir: Path, data: MultiTaskData, *, last_ones: bool = False) -> int:
    """A run is evaluated on the tasks it learned, in its order: its experts and heads are the tasks' by position,
    so a config for `loramix eval` that lists other tasks, or the same in another order, is refused by name. With
    `last_ones` (a continual run) the config may list only the last ones; returns how many it leaves out."""
    try:
        metadata = read_json(Path(run_dir) / "adapter" / CONFIG_FILE)["metadata"]["tasks"]
        learned = [str(t["name"]) for t in metadata]
    except (KeyError, TypeError):
        return 0  # a record without task names: the loader has already refused it
    offset = len(learned) - data.num_tasks if last_ones else 0
    if offset >= 0 and learned[offset:] == list(data.task_names):
        for meta, task in zip(metadata[offset:], data.tasks):
            kind = meta.get("task_type") if isinstance(meta, dict) else None
            if kind is not None and kind != task.task_type:
                raise ConfigError(
                    f"tasks: {run_dir} learned task {task.name!r} as a {kind} task; the evaluation config gives it "
                    f"as a {task.task_type} task"
                )
            saved = meta.get("labels") if isinstance(meta, dict) else None
            if isinstance(saved, list) and saved != list(task.label_names):
                raise ConfigError(
                    f"tasks: {run_dir} learned task {task.name!r} with the labels {_listed(saved)}, in this order; "
                    f"the evaluation config gives it {_listed(task.label_names)}. A task's classes are scored by "
                    "position: declare the run's labels in its order"
                )
        return offset
    unknown = [name for name in data.task_names if name not in learned]
    missing = [name for name in learned if name not in data.task_names]
    given = list(data.task_names)
    if unknown:
        why = f"{', '.join(unknown)} not among them"
    elif missing and (not last_ones or learned[: len(given)] == given):
        why = f"{', '.join(missing)} missing"
    else:
        why = "it lists them in another order"
    which = "them all, or its last ones," if last_ones else "exactly those,"
    raise ConfigError(
        f"tasks: {run_dir} learned {', '.join(learned)} in this order; a config for its evaluation lists {which} "
        f"in that order ({why})"
    )


def _listed(names: list, limit: int = 10) -> str:
    return "[" + ", ".join(map(str, names[:limit])) + (", ..." if len(names) > limit else "") + "]"


METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to run configs by its `name`."""
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The registered method of this name; a ConfigError names the key and lists the methods."""
    try:
        return METHODS[name]
    except KeyError:
        allowed = ", ".join(repr(m) for m in METHODS)
        raise ConfigError(
            f"method: {name!r} is not a method; the methods are: {allowed}{did_you_mean(name, METHODS)}"
        ) from None
