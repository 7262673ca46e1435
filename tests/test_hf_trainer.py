"""LoramixTrainer: Hugging Face `Trainer` on a model with loramix adapters, its losses equal to a hand-written step,
its saves the adapters alone, a resume equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

import loramix
from loramix import ConfigError, DataError, LoramixTrainer, RoutingError, TrainingError
from loramix.inject import adapter_state, get_info
from loramix.losses import twd_loss
from loramix.methods.mola import TwD
from loramix.models import load_backbone
from loramix.tiny_lm import char_tokenizer, write_tiny_lm
from loramix.train.aux_losses import LoadBalance, ZLoss
from tests import models

NUM_TASKS = 3


def classifier(router: str | None = "sample", **settings: Any) -> nn.Module:
    """A tiny BERT classifier without dropout (the same weights at every call), with adapters routed by `router`
    (None: none)."""
    model = models.tiny_bert(num_labels=3)
    if router is None:
        return model
    if router == "task":
        settings = {"num_tasks": NUM_TASKS, **settings}
    loramix.inject(
        model,
        {
            "num_experts": NUM_TASKS,
            "rank": 4,
            "router": router,
            "modules_to_save": ["classifier"],
            **settings,
        },
    )
    return model


def rows(n: int = 48, tasks: int = NUM_TASKS, labels: bool = True) -> list[dict[str, Any]]:
    """Rows as a dataset gives them: the model's inputs, the task id, and a text column the model takes no input
    for (the trainer must drop it and keep `task_ids`)."""
    out = []
    for i in range(n):
        task = i % tasks
        row = {
            "input_ids": [2, 5 + task * 15 + i % 7, 9 + task * 15 + i % 5, 3],
            "attention_mask": [1, 1, 1, 1],
            "task_ids": task,
            "text": f"row {i}",
        }
        if labels:
            row["labels"] = (i // tasks) % 3
        out.append(row)
    return out


def arguments(folder: Path, **kwargs: Any) -> TrainingArguments:
    settings = {
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "max_steps": 6,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "logging_steps": 2,
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
        **kwargs,
    }
    return TrainingArguments(str(folder), **settings)


def batch_of(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([row[key] for row in items]) for key in items[0] if key != "text"}


def routed_logits(model: nn.Module) -> torch.Tensor:
    """The model's logits on six rows, each routed by its task, in evaluation."""
    batch = batch_of(rows(6))
    ids = batch.pop("task_ids")
    with torch.no_grad(), loramix.routing(model.eval(), task_ids=ids):
        return model(**batch).logits


def pushing(folder: Path, strategy: str) -> TrainingArguments:
    """Arguments that checkpoint every 3 steps and push to the Hub repository `me/run` as `strategy` says."""
    return arguments(
        folder,
        save_strategy="steps",
        save_steps=3,
        push_to_hub=True,
        hub_model_id="me/run",
        hub_strategy=strategy,
    )


def test_the_loss_and_gradients_equal_a_hand_written_mola_router_step(tmp_path: Path) -> None:
    model = classifier("sample")
    trainer = LoramixTrainer(model=model, args=arguments(tmp_path))
    batch = batch_of(rows(8))
    ids = batch["task_ids"]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "task_ids"}
    with loramix.routing(model, task_ids=ids) as state:  # MoLA-Router's TwD with the run config's defaults
        out = model(**inputs)
    expected = out.loss + 1.0 * twd_loss(state.model_gate.logits, ids, space="gates", tau=0.1)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    router = [name for name in got if ".model_router." in name]
    assert router and any(got[name].abs().sum() > 0 for name in router)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(got[name], param.grad, atol=1e-6), name


def test_training_drops_unused_columns_keeps_task_ids_and_logs_each_loss(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    model = classifier("sample")
    trainer = LoramixTrainer(model=model, args=arguments(tmp_path), train_dataset=rows())
    trainer.train()
    assert not [w for w in recwarn if "auxiliary loss" in str(w.message)]  # the trainer adds it
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert {"task_loss", "twd_loss"} <= set(entry)
        assert entry["loss"] == pytest.approx(entry["task_loss"] + entry["twd_loss"], abs=1e-3)


def test_task_routed_training_leaves_an_unused_task_s_expert_untouched(tmp_path: Path) -> None:
    model = classifier("task")
    before = {name: value.clone() for name, value in adapter_state(model).items()}
    trainer = LoramixTrainer(model=model, args=arguments(tmp_path), train_dataset=rows(tasks=2))
    assert trainer.aux_losses == []
    trainer.train()
    experts = {name: value for name, value in adapter_state(model).items() if name.endswith(".experts.B")}
    assert experts
    for name, value in experts.items():
        assert torch.equal(value[2], before[name][2]), name  # task 2 had no rows
        assert not torch.equal(value[0], before[name][0]) and not torch.equal(value[1], before[name][1]), name


def test_evaluate_and_predict_route_each_row_by_its_task(tmp_path: Path) -> None:
    model = classifier("task")
    trainer = LoramixTrainer(model=model, args=arguments(tmp_path), train_dataset=rows())
    trainer.train()
    test = rows(12)
    metrics = trainer.evaluate(test)
    predictions = trainer.predict(rows(12, labels=False)).predictions
    model.eval()
    batches = [batch_of(test[i : i + 8]) for i in (0, 8)]
    losses, logits = [], []
    with torch.no_grad():
        for batch in batches:
            with loramix.routing(model, task_ids=batch.pop("task_ids")):
                out = model(**batch)
            losses.append(out.loss * len(batch["labels"]))
            logits.append(out.logits)
    assert metrics["eval_loss"] == pytest.approx(float(sum(losses) / 12), abs=1e-5)
    assert torch.allclose(torch.as_tensor(predictions), torch.cat(logits), atol=1e-5)


def test_checkpoints_hold_the_adapters_alone_and_a_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = classifier("sample")
    LoramixTrainer(
        model=whole,
        args=arguments(tmp_path / "whole", save_strategy="steps", save_steps=3),
        train_dataset=rows(),
    ).train()
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert {"loramix_config.json", "adapters.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "model.safetensors").exists()
    saved = load_file(str(checkpoint / "adapters.safetensors"))
    assert saved and not any("encoder.layer.0.attention.self.query.weight" == name for name in saved)
    assert all(".experts." in name or "router" in name or "classifier" in name for name in saved)

    resumed = classifier("sample")  # the same base model, other adapters: the checkpoint must replace them
    with torch.no_grad():
        for value in adapter_state(resumed).values():
            value.add_(0.1)
    trainer = LoramixTrainer(
        model=resumed, args=arguments(tmp_path / "whole", save_strategy="no"), train_dataset=rows()
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for name, value in adapter_state(whole).items():
        assert torch.allclose(adapter_state(resumed)[name], value, atol=1e-6), name

    final = tmp_path / "final"
    trainer.save_model(str(final))
    loaded = loramix.load(classifier(None), final)
    assert torch.allclose(routed_logits(loaded), routed_logits(resumed), atol=1e-6)


def test_pushes_hold_the_newest_adapters_under_a_loramix_card(tmp_path: Path, hub: Any) -> None:
    model = classifier("task")
    trainer = LoramixTrainer(model=model, args=pushing(tmp_path / "out", "every_save"), train_dataset=rows())
    trainer.train()
    # each checkpoint was pushed from the output folder, which Trainer fills with the model files it knows by name
    assert hub.uploads == [("me/run", None)] * 2
    newest = load_file(str(tmp_path / "out" / "checkpoint-6" / "adapters.safetensors"))
    pushed = load_file(str(hub.root / "me" / "run" / "adapters.safetensors"))
    assert pushed.keys() == newest.keys() and all(torch.equal(pushed[k], newest[k]) for k in newest)

    trainer.push_to_hub()
    card = (hub.root / "me" / "run" / "README.md").read_text()
    assert "library_name: loramix" in card and "- loramix" in card
    assert "model = loramix.load(base_model, 'me/run')" in card and "## Training hyperparameters" in card
    loaded = loramix.load(classifier(None), "me/run")
    assert torch.equal(routed_logits(loaded), routed_logits(model))


def test_a_run_resumes_from_the_last_checkpoint_it_pushed(tmp_path: Path, hub: Any) -> None:
    whole = classifier("sample")
    args = arguments(tmp_path / "whole", save_strategy="steps", save_steps=3)
    LoramixTrainer(model=whole, args=args, train_dataset=rows()).train()

    class Stop(TrainerCallback):  # the run dies after its first checkpoint
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            control.should_training_stop = state.global_step == 3

    args = pushing(tmp_path / "pushed", "checkpoint")
    LoramixTrainer(model=classifier("sample"), args=args, train_dataset=rows(), callbacks=[Stop()]).train()
    last = hub.root / "me" / "run" / "last-checkpoint"  # the checkpoint folder, pushed whole beside the model
    assert {"adapters.safetensors", "loramix_config.json", "trainer_state.json"} <= {
        p.name for p in last.iterdir()
    }
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 3

    resumed = classifier("sample")  # elsewhere: a fresh model, the run's settings, the pushed checkpoint
    trainer = LoramixTrainer(model=resumed, args=arguments(tmp_path / "resumed"), train_dataset=rows())
    trainer.train(resume_from_checkpoint=str(last))
    for name, value in adapter_state(whole).items():
        assert torch.allclose(adapter_state(resumed)[name], value, atol=1e-6), name


def test_model_init_trains_as_the_model_passed_in_and_a_trial_s_model_brings_its_own_terms(
    tmp_path: Path,
) -> None:
    transformers.set_seed(0)  # as `Trainer` seeds before each `model_init` call
    passed = classifier("sample")
    LoramixTrainer(model=passed, args=arguments(tmp_path / "passed"), train_dataset=rows()).train()
    trainer = LoramixTrainer(
        model_init=lambda trial: classifier(trial or "sample"),
        args=arguments(tmp_path / "init"),
        train_dataset=rows(),
    )
    trainer.train()  # `Trainer` makes the model again here
    assert [t.name for t in trainer.aux_losses] == ["twd"] and not trainer.model_accepts_loss_kwargs
    for name, value in adapter_state(passed).items():
        assert torch.allclose(adapter_state(trainer.injected)[name], value, atol=1e-6), name

    task_routed = trainer.call_model_init(
        "task"
    )  # a search's trial: its model and its terms replace the last
    assert task_routed.model is trainer.injected and get_info(trainer.injected).config.router == "task"
    assert trainer.aux_losses == [] and trainer.model_accepts_loss_kwargs
    with pytest.raises(ConfigError, match="model_init"):
        LoramixTrainer(args=arguments(tmp_path / "none"))


def test_a_hyperparameter_search_gives_each_trial_its_model_and_terms(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")  # not a dependency: run where it is installed
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    routers: list[tuple[str, tuple[str, ...]]] = []

    def pick(
        trial: Any,
    ) -> str:  # the trial's router (asked here, as `Trainer` builds the model before hp_space)
        return trial.suggest_categorical("router", ["task", "sample"])

    class Seen(TrainerCallback):  # each trial's router and terms, as its training starts
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            routers.append(
                (get_info(trainer.injected).config.router, tuple(t.name for t in trainer.aux_losses))
            )

    trainer = LoramixTrainer(
        model_init=lambda trial: classifier("task" if trial is None else pick(trial)),
        args=arguments(tmp_path, eval_strategy="no"),
        train_dataset=rows(),
        eval_dataset=rows(12),
        callbacks=[Seen()],
    )
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"router": pick(trial)},
        backend="optuna",
        n_trials=4,
        direction="minimize",
        sampler=optuna.samplers.GridSampler({"router": ["task", "sample"]}),
    )
    assert sorted(set(routers)) == [("sample", ("twd",)), ("task", ())]
    assert (
        best.hyperparameters["router"] in ("task", "sample") and best.objective == best.objective
    )  # not NaN


@pytest.mark.parametrize("router", ["task", "sample"])
def test_torch_compile_trains_the_adapters_eager_training_does(tmp_path: Path, router: str) -> None:
    trained = {}
    for compiled in (False, True):
        transformers.set_seed(0)
        model = classifier(router)
        start = {name: value.clone() for name, value in adapter_state(model).items()}
        args = arguments(tmp_path / str(compiled), torch_compile=compiled, max_steps=3)
        LoramixTrainer(model=model, args=args, train_dataset=rows(48, tasks=2)).train()
        trained[compiled] = adapter_state(model)
        assert any(not torch.equal(trained[compiled][name], value) for name, value in start.items())
    for name, value in trained[False].items():  # compiled kernels round differently: 6e-5 after three steps
        assert torch.allclose(trained[True][name], value, atol=2e-4), name


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path: Path) -> None:
    model = classifier("task")
    args = arguments(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    trainer = LoramixTrainer(model=model, args=args, train_dataset=rows(), eval_dataset=rows(12))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    saved = load_file(str(best / "adapters.safetensors"))
    for name, value in adapter_state(model).items():
        assert torch.equal(value, saved[name]), name


def test_aux_losses_for_each_router() -> None:
    twd, balance, z = loramix.aux_losses_for(classifier("sample"))
    assert isinstance(twd, TwD) and (twd.weight, twd.space, twd.temperature) == (1.0, "gates", 0.1)
    assert isinstance(balance, LoadBalance) and balance.weight == 0.0
    assert isinstance(z, ZLoss) and z.weight == 0.0
    twd = loramix.aux_losses_for(classifier("sample"), twd_weight=0.5, twd_temperature=0.2)[0]
    assert (twd.weight, twd.temperature) == (0.5, 0.2)
    balance = loramix.aux_losses_for(classifier("token", top_k=1))[0]
    assert isinstance(balance, LoadBalance) and balance.weight == 0.01
    assert loramix.aux_losses_for(classifier("task")) == []


def test_bad_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="twd_wieght: not a setting .* Did you mean 'twd_weight'"):
        LoramixTrainer(model=classifier("sample"), args=arguments(tmp_path), aux_settings={"twd_wieght": 1})
    with pytest.raises(ConfigError, match="twd_temperature: .*greater than 0.*got -1"):
        loramix.aux_losses_for(classifier("sample"), twd_temperature=-1)
    with pytest.raises(ConfigError, match="balance_weight: router 'task' trains with no auxiliary loss"):
        loramix.aux_losses_for(classifier("task"), balance_weight=0.1)
    with pytest.raises(ConfigError, match="aux_losses given"):
        LoramixTrainer(
            model=classifier("sample"),
            args=arguments(tmp_path),
            aux_losses=[],
            aux_settings={"twd_weight": 1},
        )
    projection = TwD(1.0, NUM_TASKS, projection=True, space="logits")
    with pytest.raises(ConfigError, match="twd .*parameters of their own"):
        LoramixTrainer(model=classifier("sample"), args=arguments(tmp_path), aux_losses=[projection])
    with pytest.raises(ConfigError, match="compute_loss_func"):
        LoramixTrainer(
            model=classifier("sample"), args=arguments(tmp_path), compute_loss_func=lambda *a, **k: 0.0
        )


def test_missing_task_ids_are_named(tmp_path: Path) -> None:
    untasked = [{k: v for k, v in row.items() if k != "task_ids"} for row in rows()]
    trainer = LoramixTrainer(model=classifier("sample"), args=arguments(tmp_path), train_dataset=untasked)
    with pytest.raises(TrainingError, match="TwD .*'task_ids'"):
        trainer.train()
    trainer = LoramixTrainer(model=classifier("task"), args=arguments(tmp_path), train_dataset=untasked)
    with pytest.raises(RoutingError, match="task_ids"):
        trainer.train()


def test_router_lr_and_head_lr_give_their_parameters_groups_of_their_own(tmp_path: Path) -> None:
    model = classifier("sample")
    args = arguments(tmp_path, weight_decay=0.01)
    trainer = LoramixTrainer(model=model, args=args, train_dataset=rows(), router_lr=3e-3, head_lr=2e-3)
    optimizer = trainer.create_optimizer()
    kind = {id(p): "router" for name, p in model.named_parameters() if ".model_router." in name}
    kind.update({id(p): "head" for p in model.classifier.parameters()})  # the config's modules_to_save
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, trainable))  # each trainable parameter once
    lrs = {"router": 3e-3, "head": 2e-3, "other": 1e-2}
    for group in optimizer.param_groups:
        kinds = {kind.get(id(p), "other") for p in group["params"]}
        assert len(kinds) == 1 and group["lr"] == lrs[kinds.pop()]
    assert {g["weight_decay"] for g in optimizer.param_groups if g["lr"] == 3e-3} == {0.0, 0.01}
    assert {g["weight_decay"] for g in optimizer.param_groups if g["lr"] == 2e-3} == {0.0, 0.01}
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    optimizer.step()
    scheduler.step()  # the schedule scales every group alike
    factor = {g["lr"] / g["initial_lr"] for g in optimizer.param_groups}
    assert len({round(f, 9) for f in factor}) == 1 and 0 < factor.pop() < 1
    for key in ("router_lr", "head_lr"):
        with pytest.raises(ConfigError, match=key):
            LoramixTrainer(model=classifier("sample"), args=arguments(tmp_path), **{key: 0})


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_causal_lm_s_loss_is_its_shifted_routed_loss(tmp_path: Path, smoothing: float) -> None:
    model = models.tiny_gpt2(lm_head=True)
    loramix.inject(model, {"num_experts": 2, "rank": 4, "router": "task", "num_tasks": 2})
    with torch.no_grad():
        for value in adapter_state(model).values():
            value.normal_(std=0.3)
    trainer = LoramixTrainer(model=model, args=arguments(tmp_path, label_smoothing_factor=smoothing))
    ids = torch.randint(0, 99, (4, 6), generator=torch.Generator().manual_seed(0))
    tasks = torch.tensor([0, 1, 1, 0])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": ids, "task_ids": tasks})
    with loramix.routing(model, task_ids=tasks):
        logits = model(input_ids=ids).logits
    expected = nn.functional.cross_entropy(  # the next token, as the model's own loss
        logits[:, :-1].reshape(-1, 99), ids[:, 1:].reshape(-1), label_smoothing=smoothing
    )
    assert torch.allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_a_quantized_base_trains_its_experts(bits: str, tmp_path: Path) -> None:
    """Trainer refuses a quantized model without adapters it recognises; loramix's are trainable adapters too."""
    pytest.importorskip("bitsandbytes")
    folder = write_tiny_lm(tmp_path / "lm", "llama", hidden_size=64, num_layers=2)
    model, _ = load_backbone(str(folder), causal_lm=True, quantize=bits)
    loramix.inject(model, {"num_experts": 2, "num_tasks": 2, "router": "task", "rank": 4, "alpha": 8})
    tokenizer = char_tokenizer()
    texts = ["the cat sat on the mat", "a dog ran in the park", "red green blue", "one two three four"] * 4
    lm_rows = [{**tokenizer(text), "task_ids": i % 2} for i, text in enumerate(texts)]
    for row in lm_rows:
        row["labels"] = list(row["input_ids"])
    args = arguments(tmp_path / "out", per_device_train_batch_size=4, max_steps=12, learning_rate=2e-2)
    trainer = LoramixTrainer(model=model, args=args, train_dataset=lm_rows, data_collator=pad_lm(tokenizer))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.9 * losses[0], losses
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "adapters.safetensors"))
    assert set(adapter_state(model)) <= set(saved)
    assert all(".experts." in name or ".model_router." in name for name in saved)  # no quantized base weight


def pad_lm(tokenizer: Any) -> Any:
    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        pad = tokenizer.pad_token_id

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([item[key] + [value] * (longest - len(item[key])) for item in items])

        return {
            "input_ids": padded("input_ids", pad),
            "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", -100),
            "task_ids": torch.tensor([item["task_ids"] for item in items]),
        }

    return collate


def test_gradient_checkpointing_trains_the_same_adapters(tmp_path: Path) -> None:
    trained = []
    for checkpointing in (False, True):
        model = classifier("sample")
        args = arguments(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, max_steps=3)
        LoramixTrainer(model=model, args=args, train_dataset=rows()).train()
        trained.append(adapter_state(model))
    assert trained[0].keys() == trained[1].keys()
    for name, value in trained[0].items():
        assert torch.allclose(trained[1][name], value, atol=1e-6), name


def test_compute_metrics_gets_each_row_s_task_with_label_names(tmp_path: Path) -> None:
    def per_task(prediction: Any) -> dict[str, float]:
        labels, tasks = prediction.label_ids
        right = prediction.predictions.argmax(-1) == labels
        return {f"accuracy_{t}": float(right[tasks == t].mean()) for t in range(NUM_TASKS)}

    model = classifier("task")
    args = arguments(tmp_path, label_names=["labels", "task_ids"])
    trainer = LoramixTrainer(model=model, args=args, train_dataset=rows(), compute_metrics=per_task)
    trainer.train()
    test = rows(24)
    metrics = trainer.evaluate(test)
    batch = batch_of(test)
    tasks = batch.pop("task_ids")
    with torch.no_grad(), loramix.routing(model.eval(), task_ids=tasks):
        right = model(**batch).logits.argmax(-1) == batch["labels"]
    for t in range(NUM_TASKS):
        assert metrics[f"eval_accuracy_{t}"] == pytest.approx(float(right[tasks == t].float().mean()))
    assert "eval_loss" in metrics


class InOrder(LoramixTrainer):
    """Rows in their order, so that a test knows each micro-batch."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        return SequentialSampler(self.train_dataset)


def test_gradient_accumulation_averages_each_micro_batch_s_loss_with_its_twd(tmp_path: Path) -> None:
    model = classifier("sample")
    grads: dict[str, torch.Tensor] = {}

    class Keep(TrainerCallback):
        def on_pre_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    data = rows(8)
    args = arguments(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1)
    args.max_grad_norm = 0.0
    InOrder(model=model, args=args, train_dataset=data, callbacks=[Keep()]).train()

    reference = classifier("sample")
    for half in (data[:4], data[4:]):
        batch = batch_of(half)
        ids = batch.pop("task_ids")
        with loramix.routing(reference, task_ids=ids) as state:
            out = reference(**batch)
        ((out.loss + twd_loss(state.model_gate.logits, ids, space="gates", tau=0.1)) / 2).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.allclose(grads[name], grad, atol=1e-6), name


class MeanPooled(nn.Module):
    """A user's model around an encoder: a forward without `**kwargs`, a loss from `labels`."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = models.tiny_bert()
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Any:
        logits = self.head(
            self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(1)
        )
        return SequenceClassifierOutput(loss=nn.functional.cross_entropy(logits, labels), logits=logits)


@pytest.mark.parametrize("router", ["task", "sample"])
def test_a_model_whose_forward_takes_no_loss_keywords_trains(tmp_path: Path, router: str) -> None:
    model = MeanPooled()
    settings = {"num_tasks": NUM_TASKS} if router == "task" else {}
    loramix.inject(model, {"num_experts": NUM_TASKS, "router": router, "exclude": ["head"], **settings})
    trainer = LoramixTrainer(model=model, args=arguments(tmp_path), train_dataset=rows())
    assert not trainer.model_accepts_loss_kwargs
    trainer.train()
    assert trainer.state.global_step == 6


class RoutedSeq2Seq(loramix.LoramixTrainerMixin, Seq2SeqTrainer):
    """The mixin on another `Trainer` subclass, as a user puts it on TRL's `SFTTrainer`."""


def test_the_mixin_on_seq2seq_trainer_generates_each_row_by_its_task(tmp_path: Path) -> None:
    model = models.tiny_gpt2(lm_head=True)
    model.config.pad_token_id = model.generation_config.pad_token_id = 0
    loramix.inject(model, {"num_experts": 2, "rank": 4, "router": "task", "num_tasks": 2})
    with torch.no_grad():
        for value in adapter_state(model).values():
            value.normal_(std=0.5)
    prompts = torch.randint(1, 99, (4, 5), generator=torch.Generator().manual_seed(0))
    tasks = [0, 1, 1, 0]
    lm_rows = [{"input_ids": p.tolist(), "labels": p.tolist(), "task_ids": t} for p, t in zip(prompts, tasks)]
    args = Seq2SeqTrainingArguments(
        str(tmp_path), per_device_eval_batch_size=4, predict_with_generate=True, report_to=[], use_cpu=True
    )
    trainer = RoutedSeq2Seq(model=model, args=args, train_dataset=lm_rows)
    trainer.train()  # one epoch of one batch, routed
    generated = trainer.predict(lm_rows, max_new_tokens=3, do_sample=False).predictions
    expected = loramix.LoramixModel(model.eval()).generate(
        input_ids=prompts, task_ids=torch.tensor(tasks), max_new_tokens=3, do_sample=False
    )
    swapped = loramix.LoramixModel(model).generate(
        input_ids=prompts, task_ids=1 - torch.tensor(tasks), max_new_tokens=3, do_sample=False
    )
    generated = torch.as_tensor(generated)  # padded to the generation config's max_length
    assert (
        torch.equal(generated[:, : expected.shape[1]], expected)
        and not generated[:, expected.shape[1] :].any()
    )
    assert not torch.equal(expected, swapped)  # the rows' tasks decide what they generate


def test_task_ids_reach_the_step_past_a_collator_that_keeps_only_what_it_knows(tmp_path: Path) -> None:
    """TRL's language-model collator builds its batch from the inputs it knows; the task ids go around it."""

    def known_only(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "attention_mask", "labels")
        }

    model = classifier("task")
    trainer = LoramixTrainer(
        model=model, args=arguments(tmp_path), train_dataset=rows(), data_collator=known_only
    )
    trainer.train()  # a task router without its ids would stop with a RoutingError
    batch = trainer.data_collator(rows(3))
    assert batch["task_ids"].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match=r"examples \[1\] of a batch have no task_ids"):
        trainer.data_collator([rows(3)[0], {k: v for k, v in rows(3)[1].items() if k != "task_ids"}])
    untasked = [{k: v for k, v in row.items() if k != "task_ids"} for row in rows(3)]
    assert "task_ids" not in trainer.data_collator(untasked)  # nothing to add


def test_the_mixin_on_trl_s_sft_trainer(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl", reason="TRL is not a dependency; run where it is installed")
    datasets = pytest.importorskip("datasets")

    class RoutedSFT(loramix.LoramixTrainerMixin, trl.SFTTrainer):
        pass

    folder = write_tiny_lm(tmp_path / "lm", "gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    loramix.inject(model, {"num_experts": 2, "rank": 4, "router": "task", "num_tasks": 2})
    before = {name: value.clone() for name, value in adapter_state(model).items()}
    texts = [
        {"text": ["the cat sat on the mat", "a dog ran far"][i % 2], "task_ids": i % 2} for i in range(16)
    ]
    args = trl.SFTConfig(
        str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    trainer = RoutedSFT(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(texts), processing_class=tokenizer
    )
    trainer.train()
    for name, value in adapter_state(model).items():
        if name.endswith("experts.B"):
            assert not torch.equal(value[0], before[name][0]) and not torch.equal(
                value[1], before[name][1]
            ), name


@pytest.mark.parametrize("router", ["task", "sample"])
def test_two_processes_train_the_same_adapters_and_one_writes(tmp_path: Path, router: str) -> None:
    """Data parallel under `torchrun` (two CPU processes, gloo): an expert no sample reaches, TwD outside the
    wrapped forward, and the saves of the main process alone."""
    out = tmp_path / "run"
    worker = Path(__file__).resolve().parent / "hf_trainer_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU processes, even on a GPU
    done = subprocess.run(
        [*command, str(worker), router, str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    states = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] == states[1]  # the processes' adapters were kept in step
    saved = load_file(str(out / "final" / "adapters.safetensors"))
    for name, value in states[0].items():
        assert torch.equal(saved[name], torch.tensor(value)), name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    fresh = classifier(router)
    changed = [name for name, value in adapter_state(fresh).items() if not torch.equal(value, saved[name])]
    assert changed  # it trained
