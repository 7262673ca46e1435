"""Continual learning on the tiny tasks: every method runs the sequence and writes its accuracy matrix; MoE-Adapters
keeps exactly k experts per routed sample, selects routers by task, freezes the most-used experts, and leaves frozen
experts and old routers bit-identical through later tasks (its adapters trained through their gathers or their
grouped form); DDAS-rejected samples get the base output; resuming inside a task equals an uninterrupted run; a task's class texts go through its experts while it trains; continual
MoLA-Grad starts a new expert fresh or as the previous one; the metrics follow their definitions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import loramix
from loramix import adapter_state
from loramix.errors import ConfigError
from loramix.inject import get_info
from loramix.methods import get_method, run_training
from loramix.methods.continual import Learner, continual_metrics
from loramix.train.config import RunConfig
from tests.train import toys


def specs(tasks_dir: Path) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "train": str(tasks_dir / name / "train.jsonl"),
            "test": str(tasks_dir / name / "test.jsonl"),
            "labels": toys.TASKS[name][2],
            **({"label_prompts": ["bad", "good"]} if name == "sentiment" else {}),
        }
        for name in toys.TASK_NAMES
    ]


def continued_after_two(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, method: str, **overrides: Any
) -> RunConfig:
    """A finished run of `method` on the first two tasks in `tmp_path / "first"`; returns the config that continues
    it with the third."""
    every = specs(tasks_dir)
    first = continual_run(model_dir, tasks_dir, method, **overrides)
    first = RunConfig.from_dict({**first.to_dict(), "tasks": every[:2]})
    run_training(first, tmp_path / "first")
    return RunConfig.from_dict(
        {**first.to_dict(), "tasks": every[2:], "continue_from": str(tmp_path / "first")}
    )


def continual_run(model_dir: Path, tasks_dir: Path, method: str, **overrides: Any) -> RunConfig:
    settings = {**toys.settings(model_dir, tasks_dir), "tasks_dir": None, "tasks": specs(tasks_dir)}
    return RunConfig.from_dict(
        {
            **settings,
            "method": method,
            "head": "label-prompt",
            "label_smoothing": 0.2,
            "steps_per_task": 12,
            "lr": 1e-2,
            "router_lr": 1e-2,
            "moe_experts": 6,
            "adapter_width": 8,
            "ddas_hidden": 8,
            "ddas_examples": 40,
            "log_every": 1,
            **overrides,
        }
    )


def trained_learner(run: RunConfig, output_dir: Path) -> tuple[Learner, dict[str, Any]]:
    """Train `run`; its learner as it is after its last task, and the run's metrics."""
    method = get_method(run.method)
    kept: list[Learner] = []
    original_end = type(method).end_task

    def keep_learner(self, learner: Learner, task: int) -> None:
        original_end(self, learner, task)
        kept.append(learner)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(method), "end_task", keep_learner)
        metrics = run_training(run, output_dir)
    return kept[-1], metrics


def same_answers(got, want, rows=slice(None)) -> None:
    """Two answers `(labels, scores)` agree at `rows`: the same labels, and the same probabilities up to the order
    of sums; every score a probability."""
    assert torch.equal(got.labels[rows], want.labels[rows])
    torch.testing.assert_close(got.scores[rows], want.scores[rows].to(got.scores), atol=1e-6, rtol=1e-5)
    assert ((got.scores > 0) & (got.scores <= 1 + 1e-6)).all()


@torch.no_grad()
def experts_far_apart(
    backbone: torch.nn.Module, scale: float = 1.0, generator: torch.Generator | None = None
) -> None:
    """Add noise of standard deviation `scale` to every adapter weight (from `generator`, by default one seeded 0),
    so that every route, and a wrong one, shows in the outputs."""
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    for param in adapter_state(backbone).values():
        param.add_(torch.randn(param.shape, generator=generator) * scale)


def test_metrics_follow_their_definitions():
    matrix = np.array([[0.5, 0.4, 0.3], [0.9, 0.45, 0.35], [0.8, 0.95, 0.3], [0.7, 0.9, 0.99]])
    metrics = continual_metrics(matrix)
    assert metrics["Transfer"] == pytest.approx(
        np.mean([0.5, np.mean([0.4, 0.45]), np.mean([0.3, 0.35, 0.3])])
    )
    assert metrics["Average"] == pytest.approx(matrix[1:].mean())
    assert metrics["Last"] == pytest.approx(np.mean([0.7, 0.9, 0.99]))
    assert metrics["BWT"] == pytest.approx(np.mean([0.7 - 0.9, 0.9 - 0.95]))


def test_a_continual_method_needs_steps_per_task_and_label_prompts_by_default(
    model_dir: Path, tasks_dir: Path
):
    run = continual_run(model_dir, tasks_dir, "moe-adapters", steps_per_task=None)
    with pytest.raises(ConfigError, match="steps_per_task"):
        get_method(run.method).validate(run)
    run = continual_run(model_dir, tasks_dir, "moe-adapters", head="classification", label_smoothing=0.0)
    with pytest.raises(ConfigError, match="head: method moe-adapters"):
        get_method(run.method).validate(run)
    settings = continual_run(model_dir, tasks_dir, "moe-adapters").to_dict()
    del settings["head"]  # left out, a continual sequence scores classes by their texts
    run = RunConfig.from_dict(settings)
    assert run.head == "label-prompt"
    get_method(run.method).validate(run)


def test_the_selector_feature_stops_at_its_block_and_equals_the_full_forward(model_dir: Path):
    from loramix.methods.continual.features import base_hidden_states, encoder_blocks, selector_features
    from loramix.models import load_backbone

    backbone, tokenizer = load_backbone(str(model_dir))
    backbone.eval()
    inputs = dict(tokenizer(["a b c", "a"], ["d e", "f g h"], return_tensors="pt", padding=True))
    with torch.no_grad():
        reference = backbone(**inputs, output_hidden_states=True).hidden_states
    for layer in (0, 1, 2, None):
        torch.testing.assert_close(
            base_hidden_states(backbone, inputs, [layer])[0], reference[-1 if layer is None else layer]
        )
    assert not any(module._forward_pre_hooks for module in backbone.modules())
    features = selector_features(backbone, inputs, "hidden", 1)
    assert features.shape == (2, backbone.config.hidden_size + 3)
    # the log token count, then the log lengths of a pair's segments: [CLS] a b c [SEP] | d e [SEP], and
    # [CLS] a [SEP] | f g h [SEP] (padded by one)
    expected = torch.tensor([[8.0, 5.0, 3.0], [7.0, 3.0, 4.0]]).log()
    torch.testing.assert_close(features[:, -3:], expected)
    single = dict(tokenizer(["a b c"], return_tensors="pt"))
    torch.testing.assert_close(
        selector_features(backbone, single, "hidden", 1)[0, -3:], torch.tensor([5.0, 1.0, 1.0]).log()
    )
    old = selector_features(backbone, inputs, "hidden", 1, stats=2)  # as selectors fitted before segments
    torch.testing.assert_close(
        old[:, -2:], torch.stack([expected[:, 0], torch.ones(2)], 1)
    )  # count, pair flag
    # two blocks from one pass: block 0's pooled state, then block 1's, then the statistics
    width = backbone.config.hidden_size
    both = selector_features(backbone, inputs, "hidden", 0, accept_layer=1)
    torch.testing.assert_close(both[:, :width], selector_features(backbone, inputs, "hidden", 0)[:, :width])
    torch.testing.assert_close(both[:, width:], features)
    ran = []
    last_block = encoder_blocks(backbone)[-1].register_forward_hook(lambda *args: ran.append(1))
    selector_features(backbone, inputs, "hidden", 1, accept_layer=0)
    last_block.remove()
    assert not ran  # the pass stopped at block 1


def test_a_run_whose_selector_reads_two_token_statistics_is_still_evaluated_on_them(
    moe_run: dict[str, Any], model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A selector fitted before the segments' lengths joined its feature reads the log token count and the pair
    flag it was fitted on; a selector of any other width is refused by name."""
    import shutil

    from loramix.cli import main
    from loramix.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint
    from loramix.io.files import atomic_save_tensors, atomic_write_json, read_json
    from loramix.methods.continual import features
    from loramix.models import load_backbone
    from loramix.routers.selector import AutoSelector

    run = tmp_path / "run"
    shutil.copytree(moe_run["dir"], run)
    record, tensors = read_checkpoint(run / "adapter")
    width = tensors["extra.selector.center"].shape[1]
    old = AutoSelector(width - 1)  # the pooled state, the log token count and the pair flag
    for task in range(len(toys.TASK_NAMES)):
        old.add_task(torch.randn(40, width - 1, generator=torch.Generator().manual_seed(task)))
    tensors = {k: v for k, v in tensors.items() if not k.startswith("extra.selector.")}
    tensors.update({f"extra.selector.{k}": v for k, v in old.state().items()})
    record["weights_sha256"] = atomic_save_tensors(run / "adapter" / WEIGHTS_FILE, tensors)
    record["tensors"] = sorted(tensors)
    atomic_write_json(run / "adapter" / CONFIG_FILE, record)
    read = []
    original = features.hidden_features
    monkeypatch.setattr(features, "hidden_features", lambda *a: read.append(a[-1]) or original(*a))
    assert main(["eval", str(run)]) == 0
    assert read and set(read) == {2}
    assert read_json(run / "eval-test.json")["selector"]["confusion"]
    backbone = load_backbone(str(model_dir))[0]
    with pytest.raises(ConfigError, match="reads 7 features"):
        features.selector_stats(7, backbone, False)


def moe_training(run: RunConfig, output: Path) -> dict[str, Any]:
    """Train a moe-adapters `run` into `output`, keeping a snapshot of its first adapted layer after each task."""
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    method = get_method("moe-adapters")
    original_end = type(method).end_task

    def record_end(self, learner: Learner, task: int) -> None:
        original_end(self, learner, task)
        layer = get_info(learner.backbone).layers[0]
        snapshots[task] = {
            "experts": {k: v.detach().clone() for k, v in layer.experts.effective().items()},
            "frozen": layer.experts.frozen_experts,
            "router": layer.router.effective()["weight"].detach().clone(),
        }

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(method), "end_task", record_end)
        metrics = run_training(run, output)
    return {"metrics": metrics, "dir": output, "snapshots": snapshots, "run": run}


@pytest.fixture(scope="module")
def moe_run(model_dir: Path, tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return moe_training(continual_run(model_dir, tasks_dir, "moe-adapters"), tmp_path_factory.mktemp("moe"))


def grouped_model_dir(factory: pytest.TempPathFactory) -> Path:
    """The tiny model with an intermediate width of 40: the adapters after its MLPs read rows of 160 bytes, which
    the grouped GEMM runs (`loramix.experts.adapter.prefers_grouped`), as on real models; with the adapters at
    least as wide as the inputs are long (`adapter_width` 16 = `max_length`), they train and answer through it."""
    return toys.model_dir(factory, intermediate_size=40)


def test_moe_adapters_writes_the_accuracy_matrix_and_its_metrics(moe_run: dict[str, Any]):
    metrics, tasks = moe_run["metrics"], len(toys.TASK_NAMES)
    matrix = np.array(metrics["accuracy_matrix"])
    assert metrics["split"] == "test"  # what every row scored
    for name, accuracy in zip(toys.TASK_NAMES, matrix[-1]):  # the last row, with macro-F1 and n as other runs
        scores = metrics["tasks"][name]
        assert set(scores) == {"accuracy", "macro_f1", "n"} and scores["accuracy"] == accuracy
    steps = [entry["step"] for entry in metrics["history"]]  # every task's steps, in the order learned
    assert steps == list(range(1, 12 * tasks + 1)) and metrics["history"][-1]["task"] == tasks - 1
    summary = (Path(moe_run["dir"]) / "report.md").read_text()
    assert "No training history" not in summary and "[continual.md](continual.md)" in summary
    assert "No routing statistics" not in summary and "Routing per task: see [continual.md]" in summary
    assert matrix.shape == (tasks + 1, tasks)
    assert set(continual_metrics(matrix)) <= set(metrics)
    assert ((matrix >= 0) & (matrix <= 1)).all()
    confusion = np.array(metrics["selector"]["confusion"])
    assert confusion.shape == (tasks, tasks + 1) and confusion.sum() > 0
    assert (Path(moe_run["dir"]) / "after-task-2" / "adapter" / "adapters.safetensors").is_file()
    report = (Path(moe_run["dir"]) / "continual.md").read_text()
    for picture in ("accuracy_matrix.png", "selector_confusion.png"):
        assert picture in report and (Path(moe_run["dir"]) / picture).is_file()
    assert "expert use" in report and "experts frozen" in report


def test_frozen_experts_and_old_routers_stay_bit_identical_through_later_tasks(moe_run: dict[str, Any]):
    check_frozen_snapshots(moe_run["snapshots"])


def check_frozen_snapshots(snaps: dict[int, dict[str, Any]]) -> None:
    first, last = snaps[0], snaps[max(snaps)]
    assert len(first["frozen"]) == 2 and set(first["frozen"]) <= set(last["frozen"])
    for name, value in first["experts"].items():
        if value.shape[0] == len(first["frozen"]) or name in ("down", "down_bias", "up", "up_bias"):
            assert torch.equal(last["experts"][name][first["frozen"]], value[first["frozen"]]), name
    assert torch.equal(last["router"][0], first["router"][0])  # task 0's router never changed again
    assert not torch.equal(last["router"][-1], torch.zeros_like(last["router"][-1]))  # the last one trained


def test_adapters_that_train_through_the_grouped_form_freeze_and_evaluate_as_the_gathered_ones(
    tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    """On a model whose widths suit the grouped GEMM, MoE-Adapters trains and answers through it (autograd on and
    off): frozen experts and old routers still stay bit-identical through later tasks, and `loramix eval` gives
    back the run's last row."""
    import loramix.experts.adapter as adapter
    from loramix.cli import main

    calls = {True: 0, False: 0}
    grouped = adapter.AdapterExperts._grouped

    def counted(*args: Any) -> torch.Tensor:
        calls[torch.is_grad_enabled()] += 1
        return grouped(*args)

    monkeypatch.setattr(adapter.AdapterExperts, "_grouped", staticmethod(counted))
    model = grouped_model_dir(tmp_path_factory)
    run = continual_run(model, tasks_dir, "moe-adapters", adapter_width=toys.MAX_LENGTH, dropout=0.1)
    trained = moe_training(run, tmp_path_factory.mktemp("moe-grouped"))
    assert calls[True] > 0 and calls[False] > 0  # training and evaluation both ran it
    check_frozen_snapshots(trained["snapshots"])
    assert main(["eval", str(trained["dir"])]) == 0
    evaluated = json.loads((trained["dir"] / "eval-test.json").read_text())
    last_row = trained["metrics"]["accuracy_matrix"][-1]
    assert [evaluated["tasks"][n]["accuracy"] for n in toys.TASK_NAMES] == last_row


def test_the_most_used_experts_are_the_ones_frozen(moe_run: dict[str, Any], capsys: pytest.CaptureFixture):
    """After each task a block's frozen set gains that task's two most used experts (those already frozen stay so):
    `continual.frozen` holds every expert frozen so far."""
    records = moe_run["metrics"]["continual"]
    before: dict[str, set[int]] = {}
    for task, layers in records["frozen"].items():
        for name, frozen in layers.items():
            use = torch.tensor(records["expert_use"][task][name])
            top = set(use.argsort(descending=True, stable=True)[:2].tolist())
            assert frozen == sorted(before.get(name, set()) | top)
            before[name] = set(frozen)
    last = records["frozen"]["2"]
    count = sum(len(frozen) for frozen in last.values())
    from loramix.cli import main

    assert main(["inspect", str(moe_run["dir"])]) == 0
    assert f"after task 2 (colors): {count} experts frozen over {len(last)} blocks" in capsys.readouterr().out


def test_without_routing_to_frozen_experts_a_new_task_trains_only_experts_still_training(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """`moe_route_frozen: false`: no input of task t picks an expert frozen before t, and the saved routers keep that
    rule for `loramix eval` (their `allowed` rows are the experts still training when each task began)."""
    from loramix.cli import main
    from loramix.routers import PerTaskRouter
    from loramix.train.run import load_trained

    run = continual_run(
        model_dir, tasks_dir, "moe-adapters-task-id", steps_per_task=8, moe_route_frozen=False
    )
    metrics = run_training(run, tmp_path)
    records = metrics["continual"]
    _, model, _, _ = load_trained(tmp_path)
    routers = {
        name: module.router for name, module in model.backbone.named_modules() if hasattr(module, "router")
    }
    masked = 0
    for task in range(1, len(toys.TASK_NAMES)):
        for name, frozen in records["frozen"][str(task - 1)].items():
            use = records["expert_use"][str(task)][name]
            assert sum(use) > 0 and all(use[e] == 0 for e in frozen), (task, name)
            router = routers[name]
            assert isinstance(router, PerTaskRouter)
            assert router.allowed[task].tolist() == [e not in frozen for e in range(router.num_experts)]
            masked += len(frozen)
        assert router.allowed[0].all()  # the first task had every expert
    assert masked > 0
    assert main(["eval", str(tmp_path)]) == 0
    evaluated = json.loads((tmp_path / "eval-test.json").read_text())
    assert [evaluated["tasks"][n]["accuracy"] for n in toys.TASK_NAMES] == metrics["accuracy_matrix"][-1]


@pytest.mark.parametrize(
    "method", ["continual-mola-grad", "sequential-lora", "lae", "zero-shot", "moe-adapters-task-id", "joint"]
)
def test_every_continual_method_runs_the_sequence(
    method: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    metrics = run_training(continual_run(model_dir, tasks_dir, method, steps_per_task=6), tmp_path)
    matrix = np.array(metrics["accuracy_matrix"])
    tasks = len(toys.TASK_NAMES)
    if method == "joint":  # every task at once: one row after it, the phase's log the run's history
        assert matrix.shape == (2, tasks) and metrics["history"][-1]["step"] == 6 * tasks
        assert (tmp_path / "continual.md").read_text().startswith("# joint: every task at once")
        return
    assert matrix.shape == (tasks + 1, tasks)
    if method == "zero-shot":
        assert (matrix == matrix[0]).all()


def test_lae_answers_by_the_larger_of_its_two_adapters_probabilities_and_scores_with_it(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """LAE's answer is the class with the highest probability under either adapter (the online, expert 0, or the
    offline EMA, expert 1), and its score is that probability: each adapter's softmax computed here by routing every
    sample to it."""
    method = get_method("lae")
    learner, _ = trained_learner(
        continual_run(model_dir, tasks_dir, "lae", steps_per_task=6), tmp_path / "run"
    )
    model = learner.model.eval()
    experts_far_apart(learner.backbone)  # the two adapters answer differently
    examples = [e for t in range(len(toys.TASK_NAMES)) for e in learner.data.eval_examples("test", t, 8)]
    batch = next(learner.batches(examples, 24))
    n = batch["task_ids"].shape[0]
    with torch.no_grad():
        answer = method.predict(learner, batch, batch["task_ids"], torch.zeros(n, dtype=torch.bool))
        router = get_info(learner.backbone).model_router
        mapping, adapters = router.task_to_expert.clone(), []
        for expert in (0, 1):  # every task to this adapter
            router.task_to_expert.fill_(expert)
            with loramix.routing(learner.backbone, task_ids=batch["task_ids"]):
                adapters.append(torch.softmax(model(batch).float(), -1))  # (n, L), zero outside each task
        router.task_to_expert.copy_(mapping)
    either = torch.maximum(*adapters)
    offsets = model.heads.offsets[batch["task_ids"]]
    assert torch.equal(answer.labels, (either.argmax(-1) - offsets).float())
    torch.testing.assert_close(answer.scores, either.amax(-1))
    chosen = either.argmax(-1, keepdim=True)
    per_adapter = torch.cat([p.gather(1, chosen) for p in adapters], 1)  # (n, 2)
    assert (per_adapter.argmax(-1) == 0).any() and (per_adapter.argmax(-1) == 1).any()  # each wins somewhere


@pytest.mark.parametrize("method", ["continual-mola-grad-task-id", "moe-adapters-task-id"])
def test_learned_tasks_keep_their_accuracy_exactly_when_routed_by_task(
    method: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """With the true task id (the selector aside), a task's accuracy never moves once it is learned: its expert (or
    its routers and their frozen experts) never train again and later experts are other tasks'."""
    metrics = run_training(continual_run(model_dir, tasks_dir, method, steps_per_task=8), tmp_path)
    matrix = np.array(metrics["accuracy_matrix"])
    for task in range(matrix.shape[1]):
        assert np.all(matrix[task + 1 :, task] == matrix[task + 1, task])


@pytest.mark.parametrize("expert_init", ["fresh", "previous"])
def test_continual_mola_grad_starts_a_new_expert_fresh_or_as_the_previous_tasks_and_keeps_earlier_ones(
    expert_init: str, model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """At the start of task t (t > 0) expert t adds nothing (fresh) or equals expert t-1 as trained (previous);
    either way experts 0..t-1 stay bit-identical through every later task."""
    from loramix.methods.continual.mola_grad import ContinualMolaGrad

    starts: dict[int, list[dict[str, torch.Tensor]]] = {}
    begin = ContinualMolaGrad.begin_task

    def recording(self: ContinualMolaGrad, learner: Learner, task: int) -> None:
        begin(self, learner, task)
        starts[task] = [
            {name: value.detach().clone() for name, value in layer.experts.effective().items()}
            for layer in get_info(learner.backbone).layers
        ]

    monkeypatch.setattr(ContinualMolaGrad, "begin_task", recording)
    run = continual_run(
        model_dir, tasks_dir, "continual-mola-grad", steps_per_task=4, expert_init=expert_init
    )
    run_training(run, tmp_path)
    last = len(toys.TASK_NAMES) - 1
    assert sorted(starts) == list(range(last + 1))
    for task in range(1, last + 1):
        trained = False
        for layer, earlier in zip(starts[task], starts[task - 1], strict=True):
            for name, value in layer.items():
                if expert_init == "previous":
                    assert torch.equal(value[task], value[task - 1]), name
                trained |= not torch.equal(value[task - 1], earlier[name][task - 1])
                assert torch.equal(value[: task - 1], earlier[name][: task - 1]), name  # frozen before
            if expert_init == "fresh":
                assert not layer["B"][task].any()  # a new LoRA expert adds nothing
        assert trained  # expert t-1 learned its task between the two starts


@pytest.mark.parametrize("method", ["continual-mola-grad", "moe-adapters"])
def test_a_task_s_class_texts_go_through_the_experts_that_learn_it_while_it_trains(
    method: str, model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """In training the class texts are encoded as evaluation encodes them once the task is learned: along the
    task's own route, not by the base (which would fit the inputs to classes the run never scores with)."""
    from loramix.train.model import MultiTaskModel

    calls: list[tuple[list[int], list[bool]]] = []
    encode = MultiTaskModel.encode

    def recording(self: MultiTaskModel, inputs: dict, route_ids: torch.Tensor, keep_base=None, **kw: Any):
        if self.training:
            keep = torch.zeros_like(route_ids, dtype=torch.bool) if keep_base is None else keep_base
            calls.append((route_ids.tolist(), keep.tolist()))
        return encode(self, inputs, route_ids, keep_base, **kw)

    monkeypatch.setattr(MultiTaskModel, "encode", recording)
    run_training(continual_run(model_dir, tasks_dir, method, steps_per_task=2), tmp_path)
    assert calls  # every training batch encodes its task's class texts
    routes = {route for ids, _ in calls for route in ids}
    assert routes == set(range(len(toys.TASK_NAMES)))  # each task's texts, along its own route
    assert not any(keep for _, kept in calls for keep in kept)  # never by the base


class Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    "method, extra, crash_step",
    [
        ("moe-adapters", {}, 2),
        ("continual-mola-grad", {"expert_init": "previous"}, 4),
        ("moe-adapters", {"adapter_width": toys.MAX_LENGTH, "grouped": True}, 4),
    ],
    ids=[
        "moe-adapters-before-a-checkpoint",
        "continual-mola-grad-copied-expert-after-a-checkpoint",
        "moe-adapters-grouped-after-a-checkpoint",
    ],
)
def test_a_run_that_dies_inside_a_task_resumes_there_and_ends_as_an_uninterrupted_one(
    method: str,
    extra: dict[str, Any],
    crash_step: int,
    model_dir: Path,
    tasks_dir: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    from safetensors.torch import load_file

    from loramix.train import callbacks

    extra = dict(extra)
    if extra.pop("grouped", False):  # adapters trained through the grouped form
        model_dir = grouped_model_dir(tmp_path_factory)
    settings = {"steps_per_task": 6, "dropout": 0.1, **extra}
    straight = run_training(continual_run(model_dir, tasks_dir, method, **settings), tmp_path / "straight")
    run = continual_run(model_dir, tasks_dir, method, checkpoint_every=3, keep_task_states=1, **settings)
    longer = RunConfig.from_dict({**run.to_dict(), "steps_per_task": 9})
    run_training(longer, tmp_path / "resumed")  # an earlier run in the same folder: a resume must not read it
    checkpoint_step = callbacks.Checkpointer.on_step_end

    def crash_inside_task_one(self, trainer, logs):
        checkpoint_step(self, trainer, logs)
        if trainer.output_dir.name == "task-1" and trainer.step == crash_step:
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.Checkpointer, "on_step_end", crash_inside_task_one)
        with pytest.raises(Interrupted):
            run_training(run, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "after-task-0").is_dir() and not (
        tmp_path / "resumed" / "after-task-1"
    ).exists()
    # a finished task's checkpoints give way to the state after it; the dying task's stay for the resume
    assert not (tmp_path / "resumed" / "task-0" / "checkpoints").exists()
    assert (tmp_path / "resumed" / "task-1" / "checkpoints").is_dir() == (crash_step >= 3)
    capsys.readouterr()
    resumed = run_training(run, tmp_path / "resumed", resume=True)
    said = capsys.readouterr().err
    assert f"task 1 of 3 is done; resuming with task 2 ({toys.TASK_NAMES[1]})" in said
    if crash_step < 3:  # task 1 died before its first checkpoint: it starts again
        assert "resuming at step" not in said
    else:  # it goes on from its checkpoint, which holds the trained copy, not the copy it began as
        assert "resuming at step 3 of 6" in said
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
    assert not list((tmp_path / "resumed").glob("task-*/checkpoints"))
    # every state after a task is kept by default; with keep_task_states 1, only the newest
    assert sorted(p.name for p in (tmp_path / "straight").glob("after-task-*")) == [
        f"after-task-{t}" for t in range(len(toys.TASK_NAMES))
    ]
    assert [p.name for p in (tmp_path / "resumed").glob("after-task-*")] == [
        f"after-task-{len(toys.TASK_NAMES) - 1}"
    ]
    rows = straight["continual"]["selector_rows"]
    assert len(rows) == len(toys.TASK_NAMES) + 1 and resumed["continual"]["selector_rows"] == rows
    assert (tmp_path / "resumed" / "continual.md").read_text() == (
        tmp_path / "straight" / "continual.md"
    ).read_text()
    a = load_file(tmp_path / "straight" / "adapter" / "adapters.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapters.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_new_task_later_without_the_old_data_leaves_the_old_tasks_outputs_unchanged(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """The user story: a finished run learns one more task from a config that names only that task; with their
    experts frozen, the earlier tasks' outputs (routed by their task ids) are bit-identical afterwards."""
    import yaml

    import loramix
    from loramix.cli import main
    from loramix.train.run import load_trained

    every = specs(tasks_dir)
    later = continued_after_two(model_dir, tasks_dir, tmp_path, "continual-mola-grad", steps_per_task=6)
    config = tmp_path / "more.yaml"  # the new task alone; every other setting is the continued run's
    config.write_text(yaml.safe_dump({"tasks": every[2:]}))
    continued = ["--continue-from", str(tmp_path / "first")]  # or `continue_from: first` in the file
    assert main(["train", str(config), *continued, "--output-dir", str(tmp_path / "later")]) == 0
    later = RunConfig.from_dict({**later.to_dict(), "continue_from": str((tmp_path / "first").resolve())})
    assert RunConfig.from_yaml(tmp_path / "later" / "config.yaml") == later
    metrics = json.loads((tmp_path / "later" / "metrics.json").read_text())
    assert np.array(metrics["accuracy_matrix"]).shape == (2, 1)
    assert len(metrics["selector"]["confusion"][0]) == 3 + 1  # three autoencoders and the base
    names = [spec["name"] for spec in every]
    rows = metrics["continual"]["selector_rows"]  # the first run's three, then this run's two
    assert [row["after"] for row in rows] == [None, names[0], names[1], names[1], names[2]]
    assert metrics["continual"]["frozen"] == {"0": [0], "1": [0, 1], "2": [0, 1, 2]}  # after each task
    report = (tmp_path / "later" / "continual.md").read_text()
    assert f"| {names[2]} | " in report and f"| {names[0]} | " in report
    assert f"| {names[1]} | " in report and f"| {names[1]}, this run's tasks | " in report
    assert main(["inspect", str(tmp_path / "later")]) == 0
    shown = capsys.readouterr().out
    assert (
        f"1 task in order {names[2]}, after {names[0]}, {names[1]} learned by the runs it continued" in shown
    )
    assert f"after task 2 ({names[2]})" in shown

    def outputs(run_dir: Path) -> torch.Tensor:
        _, model, tokenizer, tasks = load_trained(run_dir)
        texts = ["the film was good", "a dog near the tree", "a cat in the yard", "the plot is bad"]
        inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        with torch.no_grad(), loramix.routing(model.backbone, task_ids=torch.tensor([0, 1, 1, 0])):
            return model.pooled(inputs), [t["name"] for t in tasks]

    before, names_before = outputs(tmp_path / "first")
    after, names_after = outputs(tmp_path / "later")
    assert names_after == names_before + [every[2]["name"]]
    assert torch.equal(before, after)
    with pytest.raises(ConfigError, match="continue_from"):
        get_method("mola-grad").validate(RunConfig.from_dict({**later.to_dict(), "method": "mola-grad"}))
    with pytest.raises(ConfigError, match="set method: continual-mola-grad"):  # before any model loads
        get_method("moe-adapters").validate(
            RunConfig.from_dict({**later.to_dict(), "method": "moe-adapters"})
        )


def test_loramix_eval_of_a_continued_run_scores_the_tasks_it_learned_by_name(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """A config listing every task learned, in order, scores them all (the last as the run itself did, with
    macro-F1 and n); one that reorders them or names a task never learned is refused by name."""
    import yaml

    from loramix.cli import main

    every = specs(tasks_dir)
    first = continual_run(model_dir, tasks_dir, "continual-mola-grad", steps_per_task=4)
    run_training(RunConfig.from_dict({**first.to_dict(), "tasks": every[:2]}), tmp_path / "first")
    later = {**first.to_dict(), "tasks": every[2:], "continue_from": str(tmp_path / "first")}
    metrics = run_training(RunConfig.from_dict(later), tmp_path / "later")

    def evaluate(tasks: list[dict[str, Any]]) -> int:
        config = tmp_path / "eval.yaml"
        config.write_text(yaml.safe_dump({**later, "tasks": tasks}))
        return main(["eval", str(tmp_path / "later"), "--config", str(config)])

    assert evaluate(every) == 0
    scores = json.loads((tmp_path / "later" / "eval-test.json").read_text())["tasks"]
    assert sorted(scores) == sorted(t["name"] for t in every)
    last = every[2]["name"]
    assert scores[last] == metrics["tasks"][last]  # accuracy, macro-F1 and n, as the run scored it
    assert set(scores[every[0]["name"]]) == {"accuracy", "macro_f1", "n"}
    capsys.readouterr()
    assert evaluate([every[1], every[0], every[2]]) == 2
    assert "learned " + ", ".join(t["name"] for t in every) + " in this order" in capsys.readouterr().err
    assert evaluate([every[0], {**every[2], "name": "unseen"}]) == 2


def test_a_two_stage_pooled_neighbour_selector_run_evaluates_and_continues_only_with_the_settings_it_was_fitted_with(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    from loramix.cli import main
    from loramix.io import read_checkpoint

    every = specs(tasks_dir)
    first = continual_run(
        model_dir,
        tasks_dir,
        "continual-mola-grad",
        steps_per_task=6,
        ddas_accept_layer=1,
        ddas_threshold="pooled",
        ddas_neighbours=2,
        ddas_choice="shared",
    )
    first = RunConfig.from_dict({**first.to_dict(), "tasks": every[:2]})
    metrics = run_training(first, tmp_path / "first")
    _, tensors = read_checkpoint(tmp_path / "first" / "adapter")
    width = tensors["extra.selector.center"].shape[1]
    assert (
        int(tensors["extra.selector.accept_columns"]) == (width - 3) // 2 + 3
    )  # block 1's state and statistics
    assert float(tensors["extra.selector.pooled_level"]) == pytest.approx(0.95)
    assert (
        int(tensors["extra.selector.neighbours"]) == 2
    )  # block 1's columns of each task's fitting inputs kept
    assert tensors["extra.selector.bank"].shape[::2] == (2, (width - 3) // 2 + 3)
    assert int(tensors["extra.selector.choice_rule"]) == 1  # the task named under one shared covariance
    assert main(["eval", str(tmp_path / "first")]) == 0
    evaluated = json.loads((tmp_path / "first" / "eval-test.json").read_text())
    assert [evaluated["tasks"][t["name"]]["accuracy"] for t in every[:2]] == metrics["accuracy_matrix"][-1]
    later = {**first.to_dict(), "tasks": every[2:], "continue_from": str(tmp_path / "first")}
    with pytest.raises(ConfigError, match="ddas_accept_layer: 1"):
        run_training(RunConfig.from_dict({**later, "ddas_accept_layer": None}), tmp_path / "other")
    with pytest.raises(ConfigError, match="ddas_threshold: pooled"):
        run_training(RunConfig.from_dict({**later, "ddas_threshold": "task"}), tmp_path / "other")
    with pytest.raises(ConfigError, match="ddas_neighbours: 2"):
        run_training(RunConfig.from_dict({**later, "ddas_neighbours": 0}), tmp_path / "other")
    with pytest.raises(ConfigError, match="ddas_choice: shared"):
        run_training(RunConfig.from_dict({**later, "ddas_choice": "own"}), tmp_path / "other")
    for key, value in (
        ("moe_experts", 10),
        ("adapter_width", 32),
        ("pooling", "cls"),
        ("ddas_shrinkage", 0.5),
    ):
        with pytest.raises(ConfigError, match=f"continue_from: .* other settings: set {key}: "):
            run_training(RunConfig.from_dict({**later, key: value}), tmp_path / "other")
    from loramix.methods.continual.learner import check_continued_settings

    written_otherwise = RunConfig.from_dict({**later, "model": os.path.relpath(later["model"])})
    check_continued_settings(written_otherwise, tmp_path / "first", selector=True)  # the same model folder
    before = {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="also the output folder"):  # it would replace the run it continues
        run_training(RunConfig.from_dict(later), tmp_path / "first")
    assert {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file()} == before
    metrics = run_training(RunConfig.from_dict(later), tmp_path / "later")
    assert len(metrics["selector"]["confusion"][0]) == 3 + 1
    whiten = RunConfig.from_dict({**first.to_dict(), "ddas_normalize": "whiten"})
    with pytest.raises(ConfigError, match="ddas_accept_layer"):
        get_method("moe-adapters").validate(whiten)
    whiten = RunConfig.from_dict({**whiten.to_dict(), "ddas_accept_layer": None})
    with pytest.raises(ConfigError, match="ddas_neighbours: .*needs ddas_normalize: gaussian"):
        get_method("moe-adapters").validate(whiten)
    whiten = RunConfig.from_dict({**whiten.to_dict(), "ddas_neighbours": 0})
    with pytest.raises(ConfigError, match="ddas_choice: shared .*needs ddas_normalize: gaussian"):
        get_method("moe-adapters").validate(whiten)
    whiten = RunConfig.from_dict({**whiten.to_dict(), "ddas_choice": "own", "ddas_mix": "posterior"})
    with pytest.raises(ConfigError, match="ddas_mix: posterior .*needs ddas_normalize: gaussian"):
        get_method("moe-adapters").validate(whiten)
    whiten = RunConfig.from_dict({**whiten.to_dict(), "ddas_mix": "none"})
    with pytest.raises(ConfigError, match="ddas_threshold: pooled"):
        get_method("moe-adapters").validate(whiten)


def test_a_selector_on_a_cut_bfloat16_base_pass_is_fitted_and_chooses_on_that_pass_and_continues_only_with_it(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """`ddas_tokens` and `ddas_precision` make the selector's own base pass cheaper: it is fitted on that pass, the
    saved run chooses by it again (its evaluation gives the last row), and a continued run keeps both settings."""
    from loramix.cli import main
    from loramix.methods.continual.features import selector_features
    from loramix.methods.continual.learner import new_selector

    every = specs(tasks_dir)
    cheap = {"ddas_layer": 1, "ddas_tokens": 3, "ddas_precision": "bfloat16"}
    first = continual_run(model_dir, tasks_dir, "continual-mola-grad", steps_per_task=6, **cheap)
    first = RunConfig.from_dict({**first.to_dict(), "tasks": every[:2]})
    learner, metrics = trained_learner(first, tmp_path / "first")
    examples = [e for t in range(2) for e in learner.data.eval_examples("test", t, 8)]
    batch = next(learner.batches(examples, 16))
    own = selector_features(learner.backbone, batch, "hidden", 1, tokens=3, precision="bfloat16")
    assert torch.equal(learner.base_features(batch), own)
    assert not torch.allclose(own, selector_features(learner.backbone, batch, "hidden", 1), atol=1e-3)
    refit = new_selector(first, learner.backbone)
    method = get_method(first.method)
    for task in range(2):
        refit.add_task(method.task_features(learner, task), seed=first.seed)
    for key, value in learner.selector.state().items():
        assert torch.equal(refit.state()[key], value), key
    assert main(["eval", str(tmp_path / "first")]) == 0
    evaluated = json.loads((tmp_path / "first" / "eval-test.json").read_text())
    assert [evaluated["tasks"][t["name"]]["accuracy"] for t in every[:2]] == metrics["accuracy_matrix"][-1]
    later = {**first.to_dict(), "tasks": every[2:], "continue_from": str(tmp_path / "first")}
    for key, value in (("ddas_tokens", None), ("ddas_precision", "float32")):
        with pytest.raises(ConfigError, match=f"other settings: set {key}: "):
            run_training(RunConfig.from_dict({**later, key: value}), tmp_path / "other")
    for no_pass, why in (
        ({"layers_to_transform": [1]}, "reads the answer pass itself .* no expert before block 1"),
        ({"ddas_layer": 0}, "reads the answer pass itself .* no expert before block 0"),
        ({"ddas_features": "embeddings"}, "reads the input embeddings"),
    ):
        with pytest.raises(ConfigError, match=f"ddas_tokens, ddas_precision: the auto-selector {why}"):
            get_method("moe-adapters").validate(RunConfig.from_dict({**first.to_dict(), **no_pass}))


def test_a_resume_is_checked_against_the_checkpoints_it_will_load_only(tmp_path: Path):
    """The first unfinished task's (a finished task's checkpoints are never read again), or the joint phase's."""
    (tmp_path / "progress.json").write_text(json.dumps({"done": 1, "matrix": []}))
    assert get_method("moe-adapters").resume_checkpoints(tmp_path) == tmp_path / "task-2" / "checkpoints"
    assert get_method("joint").resume_checkpoints(tmp_path) == tmp_path / "joint" / "checkpoints"
    (tmp_path / "progress.json").unlink()
    assert get_method("lae").resume_checkpoints(tmp_path) == tmp_path / "task-0" / "checkpoints"


def test_lae_continues_with_a_new_task_slot_and_joint_cannot_continue(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """LAE's every task routes to the online adapter: a continued run gives its new tasks that slot too."""
    later = continued_after_two(model_dir, tasks_dir, tmp_path, "lae", steps_per_task=3)
    metrics = run_training(later, tmp_path / "later")
    assert np.array(metrics["accuracy_matrix"]).shape == (2, 1)
    record = json.loads((tmp_path / "later" / "adapter" / "loramix_config.json").read_text())
    assert record["config"]["num_tasks"] == 3 and record["config"]["task_to_expert"] == [0, 0, 0]
    joint = RunConfig.from_dict({**later.to_dict(), "method": "joint"})
    with pytest.raises(ConfigError, match="continue_from: method joint trains every task at once"):
        get_method("joint").validate(joint)


@pytest.mark.parametrize(
    ("key", "value"), [("steps_per_task", 5), ("ddas_layer", 3), ("ddas_threshold", "pooled")]
)
def test_continual_settings_on_a_method_that_trains_every_task_at_once_are_refused_by_name(
    model_dir: Path, tasks_dir: Path, key: str, value: Any
):
    run = RunConfig.from_dict({**toys.settings(model_dir, tasks_dir), "method": "mola-grad", key: value})
    with pytest.raises(ConfigError, match=f"{key}: method mola-grad .*moe-adapters"):
        get_method("mola-grad").validate(run)
    run = RunConfig.from_dict({**toys.settings(model_dir, tasks_dir), "keep_task_states": 1})
    with pytest.raises(
        ConfigError, match="keep_task_states: method lora does not learn tasks one after another"
    ):
        get_method("lora").validate(run)
    # a continual baseline without a selector takes the same config as the methods with one
    get_method("moe-adapters-task-id").validate(continual_run(model_dir, tasks_dir, "moe-adapters-task-id"))


def test_a_selector_block_past_the_model_s_last_is_refused_by_name(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    for key in ("ddas_layer", "ddas_accept_layer"):
        run = continual_run(model_dir, tasks_dir, "continual-mola-grad", steps_per_task=1, **{key: 99})
        with pytest.raises(ConfigError, match=f"{key}: 99 is past the model's 2 blocks"):
            run_training(run, tmp_path / key)


def test_loramix_eval_of_a_continual_run_routes_by_the_saved_selector(moe_run: dict[str, Any]):
    from loramix.cli import main

    assert main(["eval", str(moe_run["dir"])]) == 0
    evaluated = json.loads((Path(moe_run["dir"]) / "eval-test.json").read_text())
    last_row = moe_run["metrics"]["accuracy_matrix"][-1]
    assert [evaluated["tasks"][n]["accuracy"] for n in toys.TASK_NAMES] == last_row
    assert evaluated["selector"]["confusion"] == moe_run["metrics"]["selector"]["confusion"]
    free = evaluated["selector"]["task_free_accuracy"]
    assert free == moe_run["metrics"]["selector"]["task_free_accuracy"]
    # an input answered right without its task is answered right with it: its route is the same, and on the base
    # the nearest class among every task's that is one of its own task's is the nearest of its own task's
    assert all(free[n] <= acc for n, acc in zip(toys.TASK_NAMES, last_row)) and sum(free.values()) > 0


def test_loramix_inspect_shows_a_continual_runs_metrics(
    moe_run: dict[str, Any], capsys: pytest.CaptureFixture
):
    from loramix.cli import main

    assert main(["inspect", str(moe_run["dir"])]) == 0
    shown = capsys.readouterr().out
    assert "continual: 3 tasks in order sentiment, animals, colors" in shown
    assert "Transfer" in shown and "BWT" in shown and "auto-selector" in shown and "after task 0" in shown
    free = moe_run["metrics"]["selector"]["task_free_mean"]
    assert f"; with no task given, {100 * free:.1f}% answered right" in shown
    rows = [r for r in moe_run["metrics"]["continual"]["selector_rows"] if r["own_task_rate"] is not None]
    own = sum(r["own_task_rate"] for r in rows) / len(rows)
    unseen = [r["base_rate_unlearned"] for r in rows if r["base_rate_unlearned"] is not None]
    assert len(rows) == 3 and len(unseen) == 2  # after each task; unseen ones after the first two only
    assert f"over the sequence: {100 * own:.1f}% of learned tasks' inputs to their own task" in shown
    assert f", {100 * sum(unseen) / len(unseen):.1f}% of not yet learned tasks' inputs to the base" in shown
    report = (Path(moe_run["dir"]) / "continual.md").read_text()
    assert f"Given no input's task (the selector chooses it), {100 * free:.2f}% of the test inputs" in report
    assert (
        f"Over the sequence: {own:.3f} of learned tasks' inputs to their own task, "
        f"{sum(unseen) / len(unseen):.3f} of not yet learned tasks' inputs to the base." in report
    )


@pytest.mark.parametrize("method_name", ["moe-adapters", "continual-mola-grad"])
def test_the_selector_routes_inside_the_pass_exactly_as_in_a_base_pass_of_its_own(
    method_name: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """Per-layer routers (MoE-Adapters') and a model-wide one (continual MoLA-Grad's, decided again once the
    selector has chosen) alike."""
    from loramix.cli import main
    from loramix.methods.continual.features import first_adapted_block, routed_by_selector

    method = get_method(method_name)
    run = continual_run(
        model_dir, tasks_dir, method_name, steps_per_task=6, layers_to_transform=[1], ddas_accept_layer=1
    )
    learner, metrics = trained_learner(run, tmp_path / "run")
    assert (
        main(["eval", str(tmp_path / "run")]) == 0
    )  # the saved run places its experts and selects as it did
    evaluated = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    assert [evaluated["tasks"][n]["accuracy"] for n in toys.TASK_NAMES] == metrics["accuracy_matrix"][-1]
    assert first_adapted_block(learner.backbone) == 1  # block 0 runs as the base model
    assert learner.in_pass_layers() == [0, 1]
    model = learner.model.eval()
    experts_far_apart(learner.backbone)
    learner.selector.thresholds[
        1
    ] = -1.0  # the second task accepts nothing: its inputs go elsewhere or to the base
    examples = [e for t in range(3) for e in learner.data.eval_examples("test", t, 8)]
    batch = next(learner.batches(examples, 24))
    with torch.no_grad():
        route, keep, _, predicted = method.answer(learner, batch)
        reference_route, reference_keep = learner.select(batch)  # a base pass of its own, then the model's
        reference = method.predict(learner, batch, reference_route, reference_keep)
        with routed_by_selector(learner.backbone, batch, learner.selector, [0, 1]) as chosen:
            pooled = model.pooled(batch)
        expected = model.encode(batch, route_ids=reference_route, keep_base=reference_keep)
        base = model.encode(batch, route_ids=reference_route, keep_base=torch.ones_like(keep))
    assert torch.equal(route, reference_route) and torch.equal(keep, reference_keep)
    assert keep.any() and not keep.all()
    assert torch.equal(chosen["route"], route) and torch.equal(pooled, expected)
    assert torch.equal(chosen["features"], learner.base_features(batch))  # what ddas_mix weighs routes by
    assert (
        torch.equal(pooled[keep], base[keep]) and not torch.isclose(pooled[~keep], base[~keep]).all(-1).any()
    )
    same_answers(predicted, reference)
    # with the selector reading a block after an adapted one, routing needs its own pass
    default = continual_run(model_dir, tasks_dir, "moe-adapters", steps_per_task=2, ddas_layer=1)
    every_block, _ = trained_learner(default, tmp_path / "default")
    assert every_block.in_pass_layers() is None
    with pytest.raises(ConfigError, match="first adapted block is 0"):
        with routed_by_selector(every_block.backbone, batch, every_block.selector, [1]):
            pass


@pytest.mark.parametrize(
    ("method", "says"),
    [
        ("lae", "the online adapter alone (expert 0)"),
        ("continual-mola-grad", "routes each input by its auto-selector"),
        ("sequential-lora", "one adapter shared by every task (no router): exact"),
    ],
)
def test_a_continual_export_says_how_far_one_lora_is_from_what_the_run_predicts(
    method: str, says: str, model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    from loramix.cli import main

    run = continual_run(model_dir, tasks_dir, method, steps_per_task=2)
    run = RunConfig.from_dict({**run.to_dict(), "tasks": specs(tasks_dir)[:2]})
    run_training(run, tmp_path / "run")
    name = toys.TASK_NAMES[1]
    assert main(["export", str(tmp_path / "run"), "--task", name, "--out", str(tmp_path / "out")]) == 0
    note = json.loads((tmp_path / "out" / "loramix_export.json").read_text())
    assert says in note["gate"]["note"]


def test_a_run_whose_experts_do_not_fold_into_a_lora_is_refused_by_export_as_a_usage_error(
    moe_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    from loramix.cli import main
    from loramix.train import run

    def no_load(*args: Any) -> None:
        raise AssertionError("refused only after the model loaded")

    argv = ["export", str(moe_run["dir"]), "--task", toys.TASK_NAMES[0], "--out", str(tmp_path / "out")]
    monkeypatch.setattr(run, "load_trained", no_load)
    assert main(argv) == 2
    assert "'adapter' experts do not fold into a LoRA" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_progress_bars_name_each_task_of_the_sequence(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    run = continual_run(model_dir, tasks_dir, "sequential-lora", steps_per_task=1, progress=True)
    run_training(run, tmp_path)
    err = capsys.readouterr().err
    for i, name in enumerate(toys.TASK_NAMES):
        assert f"sequential-lora: task {i + 1}/{len(toys.TASK_NAMES)} {name}" in err
