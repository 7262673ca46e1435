"""Generation tasks through `loramix train`: every method trains a tiny causal LM on prompt/response tasks, is
scored by greedy generation under each sample's routing, saves, reloads and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loramix
from loramix.cli import main
from loramix.data import MultiTaskData
from loramix.errors import ConfigError
from loramix.methods import get_method, run_training
from loramix.train.config import RunConfig
from loramix.train.run import build_model, load_trained, make_collator, task_specs
from loramix.train.step import routed
from tests.train import toys
from tests.train.test_checkpoint import without_timings
from tests.train.test_run import window_means

METHODS = ["lora", "lora-wide", "per-task-lora", "mola-grad", "mola-router", "token-router"]
SCORES = {"accuracy", "scorer", "exact_match", "f1", "loss", "perplexity", "n", "samples"}


def test_a_generation_task_with_a_train_split_alone_leaves_the_others_scored(
    gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    import shutil

    data = shutil.copytree(gen_tasks_dir, tmp_path / "tasks")
    chat, *others = toys.GEN_TASKS
    (data / chat / "test.jsonl").unlink()
    run = RunConfig.from_dict(toys.gen_settings(gpt2_dir, data, method="mola-grad", steps=2))
    metrics = run_training(run, tmp_path / "run")
    assert list(metrics["tasks"]) == others and metrics["unscored_tasks"] == [chat]
    assert all(metrics["tasks"][task]["n"] == 8 for task in others)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_causal_lm_on_generation_tasks(
    method: str, gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    run = RunConfig.from_dict(
        toys.gen_settings(gpt2_dir, gen_tasks_dir, method=method, steps=30, log_every=1, lr=5e-2)
    )
    metrics = run_training(run, tmp_path)
    first, last = window_means(metrics["history"], "task_loss")
    assert last < 0.95 * first, f"{method}: loss went from {first:.3f} to {last:.3f}"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["tasks"]) == toys.GEN_TASKS
    for task, scores in saved["tasks"].items():
        assert set(scores) == SCORES and scores["n"] == 8
        assert 0 <= scores["exact_match"] <= scores["f1"] + 1e-9 <= 1 + 1e-9
        assert scores["perplexity"] == pytest.approx(2.718281828 ** scores["loss"], rel=1e-6)
        assert all(sample["prompt"].startswith(f"{task}: ") for sample in scores["samples"])
    assert saved["mean_accuracy"] == pytest.approx(sum(s["accuracy"] for s in saved["tasks"].values()) / 3)
    assert (tmp_path / "report.md").is_file() and (tmp_path / "adapter" / "adapters.safetensors").is_file()


def test_a_llama_model_trains_with_mola_grad_and_reloads_for_eval(
    llama_dir: Path, gen_tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run = RunConfig.from_dict(toys.gen_settings(llama_dir, gen_tasks_dir, method="mola-grad", steps=6))
    metrics = run_training(run, tmp_path)
    assert main(["eval", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "eval-test.json").read_text())
    for task in toys.GEN_TASKS:  # the reloaded run generates the same answers
        assert again["tasks"][task]["samples"] == metrics["tasks"][task]["samples"]
        assert again["tasks"][task]["loss"] == pytest.approx(metrics["tasks"][task]["loss"], rel=1e-5)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reverse (generation, scorer exact)" in out and "reverse: exact match" in out


def test_the_sample_router_reads_the_prompt_alone(gpt2_dir: Path, gen_tasks_dir: Path):
    """In training the batch holds prompt and response; the router must decide from the prompt, as it does when
    generating from the prompt alone (left-padded): the two gates agree."""
    run = RunConfig.from_dict(toys.gen_settings(gpt2_dir, gen_tasks_dir, method="mola-router"))
    data = MultiTaskData(task_specs(run))
    method = get_method(run.method)
    model, tokenizer = build_model(run, data, method.adapter_config(run, data.num_tasks))
    torch.manual_seed(0)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.5)  # a router that is not uniform
    model.eval()
    collator = make_collator(run, data, tokenizer)
    examples = [data.examples("test", t)[i] for t in range(3) for i in range(2)]
    with torch.no_grad():
        with routed(model, collator(examples)) as state:
            model(collator(examples))
        training_gate = state.model_gate.weights
        with routed(model, collator.prompts(examples)) as state:
            model(collator.prompts(examples))
        prompt_gate = state.model_gate.weights
    assert training_gate.std(0).sum() > 1e-3  # the gates differ between samples
    torch.testing.assert_close(training_gate, prompt_gate, rtol=1e-5, atol=1e-6)


def test_a_generation_run_resumes_exactly(
    gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    settings = toys.gen_settings(
        gpt2_dir, gen_tasks_dir, method="mola-router", steps=8, log_every=1, dropout=0.2
    )
    straight = run_training(RunConfig.from_dict(settings), tmp_path / "straight")
    run = RunConfig.from_dict({**settings, "checkpoint_every": 4})
    toys.crash_at(monkeypatch, 5, run_training, run, tmp_path / "resumed")
    resumed = run_training(run, tmp_path / "resumed", resume=True)
    a = load_file(tmp_path / "straight" / "adapter" / "adapters.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapters.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timings(resumed) == without_timings(straight)


def test_generation_and_classification_tasks_do_not_mix(
    gpt2_dir: Path, gen_tasks_dir: Path, tasks_dir: Path, tmp_path: Path
):
    specs = [
        {
            "name": "reverse",
            "task_type": "generation",
            "train": str(gen_tasks_dir / "reverse" / "train.jsonl"),
            "test": str(gen_tasks_dir / "reverse" / "test.jsonl"),
        },
        {
            "name": "colors",
            "train": str(tasks_dir / "colors" / "train.jsonl"),
            "test": str(tasks_dir / "colors" / "test.jsonl"),
            "labels": ["red", "green", "blue"],
        },
    ]
    settings = {**toys.gen_settings(gpt2_dir, gen_tasks_dir, steps=1), "tasks_dir": None, "tasks": specs}
    with pytest.raises(ConfigError, match="all generation tasks or none"):
        run_training(RunConfig.from_dict(settings), tmp_path)


def test_load_trained_rebuilds_the_causal_lm(gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path):
    run_training(
        RunConfig.from_dict(toys.gen_settings(gpt2_dir, gen_tasks_dir, method="lora", steps=1)), tmp_path
    )
    _, model, _, tasks = load_trained(tmp_path)
    assert type(model.backbone).__name__ == "GPT2LMHeadModel"
    assert [t["task_type"] for t in tasks] == ["generation"] * 3 and tasks[0]["scorer"] == "exact"


@pytest.mark.parametrize("mode", ["top1", "ensemble"])
def test_elrea_runs_end_to_end_on_generation_tasks(
    mode: str, gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    """Prompt-loss gradient features, clusters, experts, and generation by the top-1 expert or the ensemble;
    `loramix eval` reloads the bank and its centroids and answers the same."""
    settings = toys.gen_settings(
        gpt2_dir,
        gen_tasks_dir,
        method="elrea",
        steps=8,
        lr=5e-2,
        elrea_clusters=3,
        elrea_mode=mode,
        elrea_feature_dim=64,
        elrea_feature_examples=48,
    )
    metrics = run_training(RunConfig.from_dict(settings), tmp_path)
    assert metrics["clusters"]["n_clusters"] == 3 and sum(metrics["clusters"]["sizes"]) == 48
    assert set(metrics["tasks"]) == set(toys.GEN_TASKS)
    for scores in metrics["tasks"].values():
        assert set(scores) == SCORES and scores["n"] == 8
    weights = metrics["routing"]["model"]
    assert weights["task_names"] == toys.GEN_TASKS
    assert main(["eval", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "eval-test.json").read_text())
    for task in toys.GEN_TASKS:
        assert again["tasks"][task]["samples"] == metrics["tasks"][task]["samples"]
        assert again["tasks"][task]["loss"] == pytest.approx(metrics["tasks"][task]["loss"], rel=1e-4)


def test_an_elrea_expert_export_of_a_run_that_trained_its_backbone_names_that_backbone(
    gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = toys.gen_settings(
        gpt2_dir,
        gen_tasks_dir,
        method="elrea",
        steps=4,
        lr=5e-2,
        train_backbone=True,
        backbone_lr=1e-2,
        elrea_clusters=2,
        elrea_feature_dim=32,
        elrea_feature_examples=24,
    )
    run_training(RunConfig.from_dict(settings), tmp_path / "run")
    out = tmp_path / "expert"
    assert main(["export", str(tmp_path / "run"), "--expert", "1", "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    _, model, _, _ = load_trained(tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    trained = {k: v for k, v in model.backbone.state_dict().items() if "base_layer" in k}
    name = next(iter(trained))
    plain = dict(base.named_parameters())[name.replace(".base_layer", "")]
    assert torch.equal(plain, trained[name])  # the trained base, not the one the run started from
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    assert type(peft_model).__name__ == "PeftModelForCausalLM"  # the adapter says it is a causal LM's
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), loramix.routing(model.backbone, task_ids=torch.tensor([1])):
        want = model.backbone(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_max_length_past_the_position_table_is_refused_before_training(
    gpt2_dir: Path, llama_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    """GPT-2 learns a table of positions (its step would fail past it); Llama's rotary positions have none."""
    from transformers import AutoModelForCausalLM

    from loramix.models import position_limit

    assert position_limit(AutoModelForCausalLM.from_pretrained(gpt2_dir)) == 64
    assert position_limit(AutoModelForCausalLM.from_pretrained(llama_dir)) is None
    settings = toys.gen_settings(gpt2_dir, gen_tasks_dir, steps=1, max_length=100)
    with pytest.raises(ConfigError, match="max_length: 100 tokens, but model .* has 64 positions"):
        run_training(RunConfig.from_dict(settings), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_generation_tasks_are_scored_during_training_by_their_answers(
    gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    settings = toys.gen_settings(gpt2_dir, gen_tasks_dir, method="mola-grad", steps=4, eval_every=2)
    metrics = run_training(RunConfig.from_dict({**settings, "eval_split": "test"}), tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [entry["eval"] for entry in logged if "eval" in entry][-1]
    assert set(last["tasks"]) == set(toys.GEN_TASKS)
    for name, scores in metrics[
        "tasks"
    ].items():  # the scores without the sample answers and the scorer's name
        assert last["tasks"][name] == {
            k: v for k, v in scores.items() if isinstance(v, (int, float)) and k != "n"
        }
