"""The loop stops on a non-finite loss with a message that names the step and the last good checkpoint, and its
learning rates follow the warm-up and the schedule the run names."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from loramix.cli import main
from loramix.data import MultiTaskData, TextCollator
from loramix.errors import ConfigError, TrainingError
from loramix.heads import TaskHeads
from loramix.methods import get_method, run_training
from loramix.train.callbacks import Callback
from loramix.train.config import RunConfig
from loramix.train.loop import Trainer, warmup_schedule
from loramix.train.run import build_model, task_specs
from tests.train import toys


def poison_loss_from_call(monkeypatch: pytest.MonkeyPatch, first_bad_call: int) -> None:
    """Make the task loss NaN from its `first_bad_call`-th call on (one call per step here)."""
    original, calls = TaskHeads.loss, [0]

    def loss(self, outputs, batch):
        calls[0] += 1
        value = original(self, outputs, batch)
        return value * float("nan") if calls[0] >= first_bad_call else value

    monkeypatch.setattr(TaskHeads, "loss", loss)


def test_a_nan_loss_names_the_step_and_the_last_checkpoint(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    poison_loss_from_call(monkeypatch, 7)
    run = RunConfig.from_dict(
        toys.settings(model_dir, tasks_dir, method="mola-grad", steps=10, checkpoint_every=4)
    )
    with pytest.raises(TrainingError) as error:
        run_training(run, tmp_path)
    message = str(error.value)
    assert "loss is nan at step 7" in message
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step-000004'}" in message
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000004"
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()


def test_a_nan_loss_before_any_checkpoint_says_so(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    poison_loss_from_call(monkeypatch, 1)
    run = RunConfig.from_dict(toys.settings(model_dir, tasks_dir, method="lora", steps=3))
    with pytest.raises(TrainingError, match=r"at step 1; last good checkpoint: none written yet"):
        run_training(run, tmp_path)


def test_a_diverging_run_exits_with_code_5(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """No patching: the largest learning rate with a weight decay of 100 and no clipping multiplies the weights by
    about -1e5 a step, which overflows them within a few steps."""
    config = tmp_path / "diverge.yaml"
    settings = toys.settings(model_dir, tasks_dir, method="lora", steps=6, checkpoint_every=1)
    config.write_text(
        yaml.safe_dump({**settings, "lr": 1e3, "head_lr": 1e3, "weight_decay": 100.0, "max_grad_norm": None})
    )
    code = main(["train", str(config), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 5, err
    match = re.search(
        r"loramix: error: loss is (nan|inf|-inf) at step (\d+); last good checkpoint: (\S+)", err
    )
    assert match, err
    step = int(match.group(2))
    assert 2 <= step <= 6
    assert match.group(3).endswith(f"step-{step - 1:06d}")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("decay", "after"),
    [
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
        ("linear", lambda p: 1 - p),
        ("constant", lambda p: 1.0),
    ],
)
def test_the_schedule_warms_up_then_decays_as_named(decay: str, after):
    total, warmup = 20, 4
    assert [warmup_schedule(s, total, warmup, decay) for s in range(warmup)] == [0.25, 0.5, 0.75, 1.0]
    for step in range(warmup, total + 3):  # past the last step it stays at the end's value
        progress = min((step - warmup) / (total - warmup), 1.0)
        assert warmup_schedule(step, total, warmup, decay) == pytest.approx(after(progress))


@pytest.mark.parametrize("decay", ["linear", "constant"])
def test_a_run_logs_the_learning_rate_of_its_schedule(
    decay: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    settings = toys.settings(
        model_dir, tasks_dir, method="lora", steps=8, warmup_ratio=0.25, log_every=1, lr_schedule=decay
    )
    history = run_training(RunConfig.from_dict(settings), tmp_path)["history"]
    # the rate logged after step s is the one step s + 1 will use
    expected = [settings["lr"] * warmup_schedule(step, 8, 2, decay) for step in range(1, 9)]
    assert [h["lr"] for h in history] == pytest.approx(expected)
    assert expected[-1] == (0.0 if decay == "linear" else settings["lr"])


class TaskCounts(Callback):
    """How many samples of each task the trainer's batches held."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def on_batch_end(self, trainer, batch, result) -> None:
        self.counts.update(batch["task_ids"].tolist())


def test_sampling_weights_set_how_often_each_task_is_drawn(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    weights = {"colors": 6.0}  # uniform sampling: colors 6/8 of the samples, the other two 1/8 each
    run = RunConfig.from_dict(
        toys.settings(
            model_dir, tasks_dir, steps=25, batch_size=16, sampling="uniform", sampling_weights=weights
        )
    )
    data = MultiTaskData(task_specs(run))
    model, tokenizer = build_model(run, data, get_method("lora").adapter_config(run, data.num_tasks))
    counter = TaskCounts()
    trainer = Trainer(run, model, data, TextCollator(tokenizer), output_dir=tmp_path, callbacks=[counter])
    np.testing.assert_allclose(trainer.sampler.probabilities, [1 / 8, 1 / 8, 6 / 8])
    trainer.train()
    share = counter.counts[toys.TASK_NAMES.index("colors")] / (25 * 16)
    assert abs(share - 6 / 8) < 0.07  # 400 draws: a standard deviation of 0.022 (against 1/3 unweighted)


def test_sampling_weights_must_name_the_runs_tasks(model_dir: Path, tasks_dir: Path):
    with pytest.raises(
        ConfigError, match=r"names 'colours', not a task of this run.*Did you mean 'colors'\?"
    ):
        RunConfig.from_dict(toys.settings(model_dir, tasks_dir, sampling_weights={"colours": 2}))
    with pytest.raises(ConfigError, match="gives 'colors' the factor 0.0; a factor must be above 0"):
        RunConfig.from_dict(toys.settings(model_dir, tasks_dir, sampling_weights={"colors": 0}))


def test_a_compiled_run_trains_as_the_eager_one(
    tasks_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    """Without dropout (a compiled graph draws its own random numbers), the same losses and scores."""
    model_dir = toys.model_dir(tmp_path_factory, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings = toys.settings(model_dir, tasks_dir, method="mola-router", steps=6, log_every=1, dropout=0.0)
    from torch._dynamo.utils import counters

    eager = run_training(RunConfig.from_dict(settings), tmp_path / "eager")
    counters.clear()
    compiled = run_training(RunConfig.from_dict({**settings, "compile": True}), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1  # it did run compiled
    losses = [[entry["loss"] for entry in metrics["history"]] for metrics in (eager, compiled)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)  # inductor's kernels round otherwise, no more
    assert compiled["tasks"] == eager["tasks"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "elrea"}, "compile: method elrea runs its model in ways torch.compile"),
        ({"method": "moe-adapters", "steps_per_task": 2}, "compile: method moe-adapters"),
    ],
)
def test_compile_is_refused_where_it_is_not_tested(
    model_dir: Path, tasks_dir: Path, tmp_path, overrides, message
):
    run = RunConfig.from_dict({**toys.settings(model_dir, tasks_dir), "compile": True, **overrides})
    with pytest.raises(ConfigError, match=message):
        run_training(run, tmp_path / "run")


def test_compile_is_refused_for_generation_tasks(gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path):
    run = RunConfig.from_dict({**toys.gen_settings(gpt2_dir, gen_tasks_dir, steps=2), "compile": True})
    with pytest.raises(ConfigError, match="compile: generation tasks decode with `generate`"):
        run_training(run, tmp_path / "run")


def test_the_methods_own_gradients_are_averaged_over_the_processes_where_some_process_has_one():
    """`Trainer.average_aux_gradients` with a stand-in for two processes whose sum is twice this one's: a parameter
    with a gradient gets the mean, one without a gradient in any process keeps none."""
    from types import SimpleNamespace

    import torch

    from loramix.train.loop import Trainer

    aux = torch.nn.ModuleList([torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)])
    aux[0].weight.grad = torch.ones(2, 3)
    aux[0].bias.grad = torch.full((2,), 3.0)
    stand_in = SimpleNamespace(
        aux_modules=aux,
        accelerator=SimpleNamespace(reduce=lambda flat, reduction: flat * 2, num_processes=2),
    )
    Trainer.average_aux_gradients(stand_in)
    assert torch.equal(aux[0].weight.grad, torch.ones(2, 3)) and torch.equal(
        aux[0].bias.grad, torch.full((2,), 3.0)
    )
    assert aux[1].weight.grad is None and aux[1].bias.grad is None


def test_each_logged_loss_is_the_mean_of_its_steps_micro_batch_losses_and_parts(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With gradient accumulation, every step's logged loss and TwD part are the means of its micro-batches' (read
    from the device once a step)."""
    from loramix.train import loop

    seen: list[dict[str, float]] = []
    original = loop.compute_loss

    def recording(model, batch, aux_losses=(), host_ids=None):
        result = original(model, batch, aux_losses, host_ids)
        parts = {"loss": result.loss, **result.parts}
        seen.append({k: float(v.detach()) for k, v in parts.items()})
        return result

    monkeypatch.setattr(loop, "compute_loss", recording)
    settings = toys.settings(model_dir, tasks_dir, method="mola-router", steps=3, grad_accum=2, log_every=1)
    history = run_training(RunConfig.from_dict(settings), tmp_path)["history"]
    logged = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3] and len(seen) == 6
    for entry, first, second in zip(logged, seen[0::2], seen[1::2]):
        assert entry["loss"] == 0.0 + first["loss"] / 2 + second["loss"] / 2
        assert entry["twd_loss"] == 0.0 + first["twd"] / 2 + second["twd"] / 2


def test_a_training_batch_is_routed_by_its_ids_as_collated_so_a_one_task_batch_runs_one_expert(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The trainer reads each batch's route ids on the host before it moves the batch to the device, so that with
    `single_task_batches` every step's routing knows its one task (on a GPU, ids moved first could not be read
    without waiting for the device). On a CPU the move is replaced by one whose ids claim to be on an accelerator."""
    from loramix.train import loop, step

    class OnAccelerator(torch.Tensor):
        @property
        def device(self) -> torch.device:  # type: ignore[override]
            return torch.device("cuda")

    move = loop.send_to_device

    def to_accelerator(batch, device):
        batch = move(batch, device)  # on a GPU, the real move
        if batch["task_ids"].device.type == "cpu":
            batch["task_ids"] = batch["task_ids"].as_subclass(OnAccelerator)
        return batch

    monkeypatch.setattr(loop, "send_to_device", to_accelerator)
    states = toys.host_routed_states(monkeypatch, step)
    settings = toys.settings(model_dir, tasks_dir, method="mola-grad", steps=4, single_task_batches=True)
    run_training(RunConfig.from_dict(settings), tmp_path)
    training = states[:4]  # then the final evaluation's batches
    assert len(training) == 4 and all(state.one_task is not None for state in training)
