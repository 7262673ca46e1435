"""Learning tasks one after another, without the earlier tasks' data: the schedule every continual method shares,
the accuracy matrix and its metrics (the ZSCL / MTIL protocol).

A run trains the tasks of `tasks` in their order, `steps_per_task` optimizer steps each, on that task's training
data alone, and after each task evaluates every task of the sequence, learned or not. Row 0 of the accuracy matrix
is the model before any training; row i is after task i. A method says what happens before and after each task
(grow, freeze, fit the auto-selector) and how inputs are routed at inference (by the auto-selector, by the true
task id, or not at all). Classes are scored by the label-prompt head, so a task not learned yet is answered by the
base model from its label names.

Resuming: after each task the model's state is saved (`after-task-<t>/`, atomically; :mod:`.state`; only the newest
`keep_task_states` of them are kept when it is set); a run that
dies inside task t reloads the state after task t - 1 and resumes task t from its newest checkpoint
(`task-<t>/checkpoints`, removed once the state after task t is saved). Scoring (the accuracy rows, the selector's
confusion) is in :mod:`.scoring`, the ways of answering an evaluation batch (by the auto-selector, mixed or blended)
in :mod:`.answer`.

Legend: T tasks, n samples, d feature width.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from loramix.data import MultiTaskData, TextCollator
from loramix.errors import ConfigError
from loramix.inject import get_info
from loramix.io import read_checkpoint
from loramix.io.files import atomic_write_json
from loramix.methods.base import Method, check_eval_tasks
from loramix.methods.continual.answer import Answer, answer
from loramix.methods.continual.decided import Decided, from_logits
from loramix.methods.continual.learner import (
    Learner,
    cheaper_pass,
    check_continued_settings,
    new_selector,
    saved_selector,
)
from loramix.methods.continual.report import continual_metrics, sequence_history, write_continual_report
from loramix.methods.continual.scoring import accuracy_row, selector_confusion
from loramix.methods.continual.state import continued_learner, extra_tensors, restore, snapshot
from loramix.train.callbacks import Callback
from loramix.train.config import RunConfig
from loramix.train.loop import Trainer, processes
from loramix.train.model import MultiTaskModel
from loramix.train.plan import announce, plan_lines
from loramix.train.predict import RoutedPredictor
from loramix.train.run import (
    build_model,
    callbacks_for,
    eval_split,
    prepare_run,
    save_run,
    seed_everything,
)
from loramix.train.step import routed as routing_block


def task_folder(output_dir: Path, task: int) -> Path:
    """Where task `task` trains: its log and its checkpoints (`checkpoints/`) while it is unfinished."""
    return output_dir / f"task-{task}"


class Continual(Method):
    """Base of continual methods; subclasses give the adapters and override the hooks they need."""

    continual = True
    evaluates_during_training = False  # every task is scored after each task instead (the accuracy matrix)
    compiles = False  # the auto-selector hooks blocks and passes the model several ways
    base_for_unlearned: ClassVar[bool] = (
        True  # tasks not learned yet (inputs, class texts) go to the base model
    )
    per_task_steps: ClassVar[bool] = True  # False: one joint phase on all tasks (the upper bound)
    # `ddas_mix: blend` needs each task to have one expert of its own in every adapted layer
    blends_experts: ClassVar[bool] = False

    def resume_state(self, output_dir: Path) -> list[Path]:
        """The tasks' checkpoints and the state after each task, with the record of how far the sequence got."""
        numbered = [p for p in output_dir.glob("*task-*") if p.name.split("task-")[-1].isdigit()]
        return [output_dir / "progress.json", output_dir / "joint", *numbered]

    def resume_checkpoints(self, output_dir: Path) -> Path:
        """The first task not finished (the joint phase for a method without tasks in turn)."""
        if not self.per_task_steps:
            return output_dir / "joint" / "checkpoints"
        progress = output_dir / "progress.json"
        done = json.loads(progress.read_text())["done"] if progress.is_file() else -1
        return task_folder(output_dir, done + 1) / "checkpoints"

    def outputs(self, output_dir: Path) -> list[Path]:
        names = ("continual.md", "accuracy_matrix.png", "selector_confusion.png")
        pictures = sorted(output_dir.glob("expert_use_*.png"))
        return [*super().outputs(output_dir), *(output_dir / n for n in names), *pictures]

    @staticmethod
    def _check_own_pass(run: RunConfig) -> None:
        """`ddas_tokens` and `ddas_precision` make the selector's own base pass cheaper: refused where it has none."""
        last = max(run.ddas_layer, run.ddas_accept_layer or 0)
        if run.ddas_features == "embeddings":
            why = "reads the input embeddings, which no pass computes"
        elif run.ddas_features == "hidden" and (
            last == 0 or (run.layers_to_transform and min(run.layers_to_transform) >= last)
        ):
            why = f"reads the answer pass itself at no cost, with no expert before block {last}"
        else:
            return
        raise ConfigError(
            f"ddas_tokens, ddas_precision: the auto-selector {why}, and these settings would give it a pass of "
            "its own; remove them"
        )

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        if run.continue_from is not None:
            if not self.per_task_steps:
                raise ConfigError(
                    f"continue_from: method {self.name} trains every task at once, so it has no earlier run to go "
                    "on from; train it on all the tasks"
                )
            if not (Path(run.continue_from) / "adapter").is_dir():
                raise ConfigError(
                    f"continue_from: {run.continue_from} holds no finished run (no adapter/ folder)"
                )
            check_continued_settings(run, Path(run.continue_from), self.uses_selector)
        if run.steps_per_task is None:
            raise ConfigError(
                f"steps_per_task: method {self.name} learns the tasks in turn; set the steps per task"
            )
        if run.ddas_accept_layer not in (None, run.ddas_layer) and (
            run.ddas_features != "hidden" or run.ddas_normalize != "gaussian"
        ):
            raise ConfigError(
                "ddas_accept_layer: a second block for the auto-selector needs ddas_features: hidden and "
                "ddas_normalize: gaussian; set ddas_accept_layer: null"
            )
        if run.ddas_accept_state == "route" and run.ddas_accept_layer in (None, run.ddas_layer):
            raise ConfigError(
                "ddas_accept_state: route accepts by the state entering ddas_accept_layer along the chosen route "
                f"and needs a ddas_accept_layer other than ddas_layer ({run.ddas_layer}); set ddas_accept_layer "
                "(3, say) or ddas_accept_state: base"
            )
        if cheaper_pass(run):
            self._check_own_pass(run)
        if run.ddas_neighbours and run.ddas_normalize != "gaussian":
            raise ConfigError(
                "ddas_neighbours: acceptance by nearest neighbours leaves the choice of task to the tasks' "
                f"Gaussians and needs ddas_normalize: gaussian (got {run.ddas_normalize}); set ddas_neighbours: 0"
            )
        if run.ddas_choice == "shared" and run.ddas_normalize != "gaussian":
            raise ConfigError(
                "ddas_choice: shared measures distances under the tasks' Gaussian covariances and needs "
                f"ddas_normalize: gaussian (got {run.ddas_normalize}); set ddas_choice: own"
            )
        if run.ddas_mix != "none" and run.ddas_normalize != "gaussian":
            raise ConfigError(
                f"ddas_mix: {run.ddas_mix} weighs the routes by the tasks' Gaussian likelihoods and needs "
                f"ddas_normalize: gaussian (got {run.ddas_normalize}); set ddas_mix: none"
            )
        if run.ddas_mix == "blend" and not self.blends_experts:
            raise ConfigError(
                f"ddas_mix: blend mixes each task's own expert in every adapted layer, and method {self.name} routes "
                "a task through experts its router picks; set ddas_mix: posterior (or none)"
            )
        if run.ddas_threshold == "pooled" and run.ddas_normalize != "gaussian":
            raise ConfigError(
                "ddas_threshold: pooled compares the tasks' Gaussian log-likelihoods on one scale and needs "
                f"ddas_normalize: gaussian (got {run.ddas_normalize}); set ddas_threshold: task"
            )
        if run.head != "label-prompt":
            raise ConfigError(
                f"head: method {self.name} scores classes by their label texts so that tasks not learned yet are "
                "answered zero-shot by the base model; set head: label-prompt (its default here) or leave head out"
            )

    # ---- hooks ----------------------------------------------------------------------------------------------
    def begin_task(self, learner: Learner, task: int) -> None:
        """Before task `task` trains: grow, set what trains."""

    def end_task(self, learner: Learner, task: int) -> None:
        """After task `task` trained: freeze, record."""
        if self.uses_selector:
            assert learner.selector is not None
            learner.selector.add_task(self.task_features(learner, task), seed=learner.run.seed)

    def task_callbacks(self, learner: Learner, task: int) -> list[Callback]:
        return []

    def gate_note(self, model: MultiTaskModel, task: int) -> str:
        if not self.uses_selector:
            return super().gate_note(model, task)
        return (
            "the task's own expert, chosen by task id: exact for inputs known to be this task's; the run itself "
            "routes each input by its auto-selector, which may send it to another task's expert or to the base "
            "model (its confusion matrix is in metrics.json)"
        )

    def route(self, learner: Learner, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """`(route ids, keep-base mask)` of an evaluation batch: by the auto-selector when the method has one."""
        task_ids = batch["task_ids"]
        if self.uses_selector:
            return learner.select(batch)
        if not self.base_for_unlearned:
            return task_ids, torch.zeros_like(task_ids, dtype=torch.bool)
        known = torch.tensor(learner.learned, device=task_ids.device)[task_ids]
        return torch.where(known, task_ids, torch.zeros_like(task_ids)), ~known

    def mark_learned(self, learner: Learner, training: int | None = None) -> None:
        """Tell the head which tasks' class texts the adapters encode (the others': the base model): the learned
        tasks', and those of task `training` while it trains, through the experts that learn it, as they will be
        encoded once it is learned (its inputs and its classes are fitted in one embedding space)."""
        if not self.base_for_unlearned:
            learner.model.heads.set_learned(None)
            return
        learned = list(learner.learned)
        if training is not None:
            learned[training] = True
        learner.model.heads.set_learned(learned)

    def predict(self, learner: Learner, batch: dict[str, Tensor], route: Tensor, keep: Tensor) -> Decided:
        """Label indices within each sample's task and their probabilities, each `(n,)`, routed by `route` with
        `keep` on the base."""
        routed = {**batch, "route_ids": route, "keep_base": keep}
        with routing_block(learner.model, routed):
            logits = learner.model(routed)
        return from_logits(learner.model.heads, logits, batch["task_ids"])

    def answer(self, learner: Learner, batch: dict[str, Tensor]) -> Answer:
        """`(route ids, keep-base mask, task ids, (label indices within them, their probabilities))` of an
        evaluation batch, routed by the auto-selector (or the task ids) in the way the run's settings call for
        (:mod:`.answer`)."""
        return answer(self, learner, batch)

    def task_features(self, learner: Learner, task: int) -> Tensor:
        """What the auto-selector fits task `task` on: its training inputs' base features, or with routed
        acceptance those of the choice block and the acceptance block's along the task's own route."""
        batches = learner.batches(self.task_examples(learner, task), 64)
        if learner.routed_acceptance:
            return torch.cat([learner.routed_task_features(b, task) for b in batches]).cpu()
        return torch.cat([learner.base_features(b) for b in batches]).cpu()

    def task_examples(self, learner: Learner, task: int) -> list:
        """The training inputs the auto-selector fits task `task` on: `ddas_examples` of them, seeded."""
        own = [e for e in learner.data.split("train") if e.task == task - learner.offset]
        rng = np.random.default_rng(learner.run.seed)
        chosen = rng.choice(len(own), size=min(len(own), learner.run.ddas_examples), replace=False)
        return [own[i] for i in sorted(chosen)]

    def plan(self, run: RunConfig, data: MultiTaskData, model: Any) -> list[str]:
        """Each task alone for `steps_per_task` steps (the joint baseline: all of them together, as many in all)."""
        if self.per_task_steps:
            return plan_lines(run, data, model, run.steps_per_task, one_at_a_time=True)  # type: ignore[arg-type]
        return plan_lines(run, data, model, run.steps_per_task * data.num_tasks)  # type: ignore[operator]

    # ---- the schedule ---------------------------------------------------------------------------------------
    def train(
        self, run: RunConfig, output_dir: Path, *, resume: bool = False, replaces: Sequence[Path] = ()
    ) -> dict[str, Any]:
        if run.steps != RunConfig.model_fields["steps"].default and processes().is_main_process:
            print(
                f"loramix: warning: steps ({run.steps}) is not used by method {self.name}: each task trains "
                f"steps_per_task ({run.steps_per_task}) steps",
                file=sys.stderr,
            )
        data = prepare_run(run, output_dir, replaces=replaces)
        if run.continue_from:
            learner = self.continued(run, data)
        else:
            model, tokenizer = build_model(run, data, self.adapter_config(run, data.num_tasks))
            learner = Learner(run, data, model, TextCollator(tokenizer, max_length=run.max_length))
        if run.progress:  # the bank's parameters before the first task (the experts still free)
            announce(self.plan(run, data, learner.model))
        group = processes()
        learner.model.to(group.device)  # row 0 is evaluated where the tasks will train
        self.mark_learned(learner)
        if self.uses_selector and learner.selector is None:
            learner.selector = new_selector(run, learner.backbone)
        progress = output_dir / "progress.json"
        done = json.loads(progress.read_text())["done"] if resume and progress.is_file() else -1
        matrix: list[list[float]] = []
        if done >= 0:
            learner = restore(learner, output_dir / f"after-task-{done}")
            self.mark_learned(learner)
            matrix = json.loads(progress.read_text())["matrix"]
            if group.is_main_process and done + 1 < data.num_tasks:
                finished = (
                    f"task 1 of {data.num_tasks} is"
                    if done == 0
                    else f"tasks 1-{done + 1} of {data.num_tasks} are"
                )
                print(
                    f"loramix: {finished} done; resuming with task {done + 2} ({data.task_names[done + 1]})",
                    file=sys.stderr,
                )
        else:
            if resume and group.is_main_process:
                print(f"loramix: no task of {output_dir} was finished; starting with task 1", file=sys.stderr)
            matrix.append(accuracy_row(learner, self.answer))
        tasks = range(data.num_tasks) if self.per_task_steps else [None]
        for task in tasks:
            if task is not None and task <= done:
                continue
            history = self.train_task(learner, task, output_dir, resume)
            if task is None:  # the joint phase: the one row of the matrix after it, its log the run's history
                learner.records["joint_history"] = history
                matrix.append(accuracy_row(learner, self.answer))
                break
            self.end_task(learner, learner.offset + task)
            learner.learned[learner.offset + task] = True
            self.mark_learned(learner)
            learner.records.setdefault("history", {})[str(learner.offset + task)] = history
            # first: its selector row goes into the snapshot
            matrix.append(accuracy_row(learner, self.answer))
            if group.is_main_process:  # one writer when several processes train
                snapshot(learner, output_dir / f"after-task-{task}")
                atomic_write_json(progress, {"done": task, "matrix": matrix})
                # a resume now starts from the snapshot, so the task's own checkpoints (weights and optimizer
                # state, hundreds of MB for a MiniLM) are dead weight
                shutil.rmtree(task_folder(output_dir, task) / "checkpoints", ignore_errors=True)
                if run.keep_task_states is not None:  # only the newest few, when asked
                    for older in range(task + 1 - run.keep_task_states):
                        shutil.rmtree(output_dir / f"after-task-{older}", ignore_errors=True)
            group.wait_for_everyone()
        metrics = self.report(learner, matrix)
        if group.is_main_process:
            save_run(
                output_dir,
                run,
                data,
                learner.model,
                metrics,
                extra=extra_tensors(learner),
                prior_tasks=learner.prior_tasks,
            )
            write_continual_report(output_dir, metrics)
        group.wait_for_everyone()
        return metrics

    def continued(self, run: RunConfig, data: MultiTaskData) -> Learner:
        """A learner that goes on from the finished continual run `run.continue_from`
        (:func:`.state.continued_learner`)."""
        return continued_learner(run, data, selector=self.uses_selector)

    def train_task(self, learner: Learner, task: int | None, output_dir: Path, resume: bool) -> list:
        run, data = learner.run, learner.data
        seed_everything(run.seed + (0 if task is None else task))
        if task is None:  # every task at once, as many steps as the sequence has
            phase = run.model_copy(update={"steps": run.steps_per_task * data.num_tasks})
            examples, ids, folder = data.split("train"), None, output_dir / "joint"
        else:
            self.begin_task(learner, learner.offset + task)
            self.mark_learned(learner, training=learner.offset + task)
            phase = run.model_copy(update={"steps": run.steps_per_task})
            examples = [e for e in data.split("train") if e.task == task]
            ids, folder = [task] * len(examples), task_folder(output_dir, task)
        label = "all tasks" if task is None else f"task {task + 1}/{data.num_tasks} {data.task_names[task]}"
        callbacks = callbacks_for(phase, folder, phase=label, task_names=learner.task_names)
        callbacks += self.task_callbacks(learner, task)
        trainer = Trainer(
            phase,
            learner.model,
            data,
            learner.collator,
            output_dir=folder,
            aux_losses=self.aux_losses(run, get_info(learner.backbone).config),
            callbacks=callbacks,
            train_examples=examples,
            sampler_ids=ids,
        )
        if resume:
            trainer.resume()
        history = trainer.train()
        learner.model = trainer.accelerator.unwrap_model(trainer.model)
        return history

    def evaluate(
        self,
        run_dir: Path,
        run: RunConfig,
        model: MultiTaskModel,
        data: MultiTaskData,
        collator: TextCollator,
        split: str,
    ) -> dict[str, Any]:
        """`loramix eval` of a finished continual run: every task routed as the method routes at inference (by the
        saved auto-selector, or by task id), the selector's confusion matrix with it."""
        offset = check_eval_tasks(run_dir, data, last_ones=True)
        record, tensors = read_checkpoint(Path(run_dir) / "adapter")
        learner = Learner(run, data, model, collator, offset=offset)
        learner.learned = [True] * (offset + data.num_tasks)
        learner.prior_tasks = record["metadata"]["tasks"][:offset]
        self.mark_learned(learner)
        if self.uses_selector:
            learner.selector = saved_selector(tensors, Path(run_dir), run)
        row = accuracy_row(learner, self.answer, split)
        metrics: dict[str, Any] = {
            "tasks": {
                name: {**learner.scores[name], "accuracy": acc} for name, acc in zip(data.task_names, row)
            },
            "mean_accuracy": float(np.mean(row)),
            "routing": {},
        }
        if learner.selector is not None:
            metrics["selector"] = selector_confusion(learner, self.answer, split)
        return metrics

    def predictor(
        self, run_dir: Path, run: RunConfig, model: MultiTaskModel, collator: Any, tasks: list[dict]
    ) -> RoutedPredictor:
        """Answers routed as `evaluate` routes them; with an auto-selector each answer says where it sent the input
        (`route`: a learned task's name, or `base` for the untouched base model)."""
        learner = Learner(run, None, model, collator, offset=len(tasks))
        learner.prior_tasks = tasks
        self.mark_learned(learner)
        if self.uses_selector:
            tensors = read_checkpoint(Path(run_dir) / "adapter")[1]
            learner.selector = saved_selector(tensors, Path(run_dir), run)
        names = [meta["name"] for meta in tasks]
        predictor = RoutedPredictor(model, collator, tasks)

        def values(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, list]]:
            route, keep, chosen, (labels, scores) = self.answer(learner, batch)
            extra = {"score": scores.tolist()} if predictor.scores else {}
            if self.uses_selector:
                extra["task_ids"] = chosen.tolist()
                extra["route"] = ["base" if k else names[r] for r, k in zip(route.tolist(), keep.tolist())]
            return labels, extra

        predictor.values = values
        return predictor

    # ---- the report ---------------------------------------------------------------------------------------------
    def report(self, learner: Learner, matrix: list[list[float]]) -> dict[str, Any]:
        names = learner.data.task_names
        metrics: dict[str, Any] = {"method": self.name, "seed": learner.run.seed, "tasks_in_order": names}
        metrics["split"] = eval_split(learner.data)  # what every row of the matrix scored
        metrics["accuracy_matrix"] = matrix
        metrics.update(
            continual_metrics(np.array(matrix))
            if self.per_task_steps
            else {"Last": float(np.mean(matrix[-1]))}
        )
        metrics["tasks"] = learner.scores or {n: {"accuracy": a} for n, a in zip(names, matrix[-1])}
        metrics["mean_accuracy"] = float(np.mean(matrix[-1]))
        metrics["history"] = learner.records.get("joint_history") or sequence_history(
            learner.records.get("history", {})
        )
        metrics["routing"] = {}
        if learner.selector is not None:
            metrics["selector"] = selector_confusion(learner, self.answer)
        records = {k: v for k, v in learner.records.items() if k != "joint_history"}  # `history` above
        metrics["continual"] = {**records, "task_names": learner.task_names}
        return metrics
