"""The training loop: short enough to read top to bottom and copy. Logging, progress and checkpoints are callbacks.

`accelerate` sits underneath, so `accelerate launch` or `torchrun` run it on several GPUs or processes unchanged.
"""

from __future__ import annotations

import atexit
import functools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import gather_object, send_to_device
from torch.utils.data import DataLoader

from loramix.data import MultiTaskData, TaskBalancedSampler
from loramix.errors import CheckpointError, TrainingError
from loramix.roles import parameters_by_role
from loramix.train.aux_losses import AuxLoss
from loramix.train.batches import EpochBatches
from loramix.train.checkpoint import (
    load_training_checkpoint,
    newest_good_checkpoint,
    remove_unfinished,
    rng_state,
    save_training_checkpoint,
)
from loramix.train.config import RunConfig
from loramix.train.model import MultiTaskModel, route_of
from loramix.train.step import StepResult, compute_loss


class Callback:
    """Override what you need; every hook is optional."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_batch_end(self, trainer: Trainer, batch: dict[str, Any], result: StepResult) -> None:
        """After each (micro-)batch's backward: `result.state.records` holds every gate the routers chose."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        """What a resumed run needs back (JSON-able), saved with every checkpoint; None: nothing."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def warmup_schedule(step: int, total: int, warmup: int, decay: str = "cosine") -> float:
    """The learning rate's factor at `step` (from 0) of `total`: a linear warm-up to 1 over `warmup` steps, then a
    cosine or a straight line to 0 at the last step, or 1 throughout (`decay`: cosine, linear or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(1, total - warmup), 1.0)
    if decay == "constant":
        return 1.0
    if decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(run: RunConfig, model: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups by parameter role: experts, routers, heads, method-owned modules (at the routers' rate) and,
    when trained, the backbone."""
    lrs = {
        "expert": run.lr,
        "router": run.router_lr,
        "method": run.router_lr,
        "head": run.head_lr,
        "backbone": run.backbone_lr,
    }
    groups = parameters_by_role(model)
    return [{"params": ps, "lr": lrs[role], "name": role} for role, ps in groups.items() if ps]


def processes() -> PartialState:
    """This process's place among those `accelerate launch` or `torchrun` started (one, without them). CPU-only
    machines must say so: without `cpu=True` accelerate leaves several CPU processes unaware of each other. Among
    several, the process group is ended when the process exits."""
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1:
        _end_group_at_exit()
    return state


@functools.cache
def _end_group_at_exit() -> None:
    """Destroy the process group before the interpreter tears down: left to the group's destructor, its threads
    may still be joinable then, and a process can abort ("terminate called without an active exception")."""

    def end() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(end)


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed element-wise over every training process (itself when there is one), on its own device.
    A collective: every process calls it at the same point, with a tensor of the same shape."""
    state = processes()
    if state.num_processes == 1:
        return tensor
    total = tensor.to(state.device).clone()
    torch.distributed.all_reduce(total)
    return total.to(tensor.device)


class Trainer:
    """Trains a :class:`MultiTaskModel` on :class:`MultiTaskData` as `run` says."""

    def __init__(
        self,
        run: RunConfig,
        model: MultiTaskModel,
        data: MultiTaskData,
        collator: Any,
        *,
        output_dir: Path,
        aux_losses: Sequence[AuxLoss] = (),
        callbacks: Sequence[Callback] = (),
        train_examples: Sequence[Any] | None = None,
        sampler_ids: Sequence[int] | None = None,
    ) -> None:
        """`aux_losses` are the method's auxiliary terms (those that are modules are trained and checkpointed with
        the model). `train_examples` and `sampler_ids` replace the data's train split and the ids that balance it
        (a method may train experts on groups other than tasks)."""
        self.run, self.data, self.output_dir = run, data, Path(output_dir)
        self.callbacks = list(callbacks)
        # Several processes: an adapter whose output no head reads (a pooler's) gets no gradient, which DDP must know.
        self.accelerator = Accelerator(
            mixed_precision=run.mixed_precision,
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.aux_losses = list(aux_losses)
        self.aux_modules = torch.nn.ModuleDict(
            {term.name: term for term in self.aux_losses if isinstance(term, torch.nn.Module)}
        )
        groups = parameter_groups(run, torch.nn.ModuleDict({"model": model, "aux": self.aux_modules}))
        self.optimizer = torch.optim.AdamW(groups, weight_decay=run.weight_decay)
        warmup = max(1, int(run.warmup_ratio * run.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_schedule(s, run.steps, warmup, run.lr_schedule)
        )
        self.sampler = TaskBalancedSampler(
            data.task_ids("train") if sampler_ids is None else sampler_ids,
            batch_size=run.batch_size,
            mode=run.sampling,
            temperature=run.sampling_temperature,
            single_task_batches=run.single_task_batches,
            seed=run.seed,
            # the factors are the tasks'; ids given in their place (a phase's own partition) draw as they are
            weights=run.sampling_factors(data.task_names) if sampler_ids is None else None,
        )
        examples = data.split("train") if train_examples is None else train_examples
        # One batch per process per step, in an order a resumed run can enter part-way (see train/batches.py).
        self.batch_order = EpochBatches(self.sampler, self.accelerator.num_processes)
        # Its own generator: a new DataLoader iterator draws a seed, which must not come from the global RNG that
        # dropout uses (a resumed run creates its iterator after restoring that RNG, an uninterrupted one before).
        loader = DataLoader(
            examples,
            batch_sampler=self.batch_order,
            collate_fn=collator,
            generator=torch.Generator().manual_seed(run.seed),
        )
        if run.compile:  # in place: the parameters and their names stay the module's, for checkpoints
            model.backbone.compile()
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        # batches stay on the host until the step moves them: their route ids are read there first, so that a
        # one-task batch (`single_task_batches`) runs its expert as one LoRA without waiting for the device
        self.loader = self.accelerator.prepare_data_loader(loader, device_placement=False)
        self.aux_modules.to(self.accelerator.device)
        self.step, self.history, self.last_checkpoint = 0, [], None
        # seconds callbacks spent outside training (evaluations), left out of samples_per_s
        self.untimed = 0.0
        self.stop_requested = False  # a callback ends training before `run.steps` (early stopping)

    @property
    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"model": self.accelerator.unwrap_model(self.model)}
        modules.update(self.aux_modules.items())
        return modules

    def callback_states(self) -> dict[str, Any]:
        """The JSON-able state of callbacks that keep one (counts across steps), saved with each checkpoint."""
        return {type(cb).__name__: state for cb in self.callbacks if (state := cb.state_dict()) is not None}

    def save_checkpoint(self) -> None:
        """Every process takes part, handing in its random state (dropout draws differ between processes); the main
        process writes."""
        states = [rng_state()]
        if self.accelerator.num_processes > 1:
            states = gather_object(states)
        root = self.output_dir / "checkpoints"
        if self.accelerator.is_main_process:
            self.last_checkpoint = save_training_checkpoint(
                root,
                self.step,
                self.checkpoint_modules,
                self.optimizer,
                {"history": self.history, "callbacks": self.callback_states()},
                rng_states=states,
                keep=self.run.keep_checkpoints,
            )
        else:
            self.last_checkpoint = root / f"step-{self.step:06d}"

    def resume(self) -> bool:
        """Continue from the newest checkpoint in the output directory that verifies; False when there is none.
        Checkpoints that do not verify are skipped, each named with the reason."""
        root = self.output_dir / "checkpoints"
        main = self.accelerator.is_main_process
        if main:
            remove_unfinished(root)
        path, skipped = newest_good_checkpoint(root)
        if main:
            for reason in skipped:
                print(f"loramix: warning: skipping a checkpoint: {reason}", file=sys.stderr)
        if path is None:
            return False
        state = load_training_checkpoint(
            path,
            self.checkpoint_modules,
            self.optimizer,
            process_index=self.accelerator.process_index,
            processes=self.accelerator.num_processes,
            verified=True,
        )
        self.step, self.history, self.last_checkpoint = int(state["step"]), state.get("history", []), path
        if self.step > self.run.steps:
            raise CheckpointError(
                f"{path}: a checkpoint at step {self.step}, past this run's {self.run.steps} steps, was left by another "
                f"run in {self.output_dir}; train without --resume to start over"
            )
        if main:
            verified = "the newest checkpoint that verifies, " if skipped else ""
            print(
                f"loramix: resuming at step {self.step} of {self.run.steps} from {verified}{path}",
                file=sys.stderr,
            )
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if type(cb).__name__ in saved:
                cb.load_state_dict(saved[type(cb).__name__])
        # the optimizer state restored each group's learning rate; the schedule only needs to know the step
        self.scheduler.last_epoch = self.step
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # type: ignore[attr-defined]
        self.batch_order.resume(self.step * self.run.grad_accum)
        return True

    def average_aux_gradients(self) -> None:
        """Average the gradients of the method's own modules (a TwD projection) over the processes, as the wrapper
        does the model's. They sit outside it: unsynchronised, each process's copy would drift from the others, and
        a checkpoint (which holds the main process's) could not restore the rest."""
        params = [p for p in self.aux_modules.parameters() if p.requires_grad]
        if not params:
            return
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype)
        flat = torch.cat(
            [has_grad.to(params[0].device)]
            + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        flat = self.accelerator.reduce(flat, reduction="sum")
        present = (flat[: len(params)] > 0).tolist()  # some process has a gradient for it (one read)
        offset = len(params)
        for p, has in zip(params, present):
            grad = flat[offset : offset + p.numel()].view_as(p) / self.accelerator.num_processes
            offset += p.numel()
            if has:
                p.grad = grad.to(p.dtype).clone()

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # the sampler moves to its next epoch by itself
            yield from self.loader

    def train(self) -> list[dict[str, Any]]:
        run, model = self.run, self.model
        model.train()
        batches = self.batches()
        for cb in self.callbacks:
            cb.on_train_start(self)
        started, seen = time.perf_counter(), 0
        while self.step < run.steps and not self.stop_requested:
            # each micro-batch's loss and its parts, read from the device once a step
            recorded: list[tuple[str, torch.Tensor]] = []
            for micro in range(run.grad_accum):
                collated = next(batches)
                batch = send_to_device(collated, self.accelerator.device)
                result = compute_loss(model, batch, self.aux_losses, route_of(collated))
                if micro < run.grad_accum - 1:
                    with self.accelerator.no_sync(model):
                        self.accelerator.backward(result.loss / run.grad_accum)
                else:
                    self.accelerator.backward(result.loss / run.grad_accum)
                recorded += [
                    (key, part.detach()) for key, part in {"loss": result.loss, **result.parts}.items()
                ]
                seen += batch["task_ids"].shape[0]
                for cb in self.callbacks:
                    cb.on_batch_end(self, batch, result)
            sums: dict[str, float] = {}
            values = torch.stack([part.float().reshape(()) for _, part in recorded]).tolist()
            for (key, _), value in zip(recorded, values):
                sums[key] = sums.get(key, 0.0) + value / run.grad_accum
            if not math.isfinite(sums["loss"]):
                last = self.last_checkpoint or "none written yet"
                raise TrainingError(
                    f"loss is {sums['loss']} at step {self.step + 1}; last good checkpoint: {last}"
                )
            if self.accelerator.num_processes > 1:
                self.average_aux_gradients()
            if run.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            logs: dict[str, Any] = {"step": self.step}
            if self.step % run.log_every == 0 or self.step == run.steps:
                elapsed = time.perf_counter() - started - self.untimed
                logs.update(
                    loss=sums["loss"], lr=self.scheduler.get_last_lr()[0], samples_per_s=seen / elapsed
                )
                logs.update({f"{k}_loss": v for k, v in sums.items() if k != "loss"})
                self.history.append(logs)
            for cb in self.callbacks:
                cb.on_step_end(self, logs)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history
