"""`loramix export` for multi-LoRA serving: every task's adapter, loaded by PEFT into an untouched causal LM,
computes what the loramix model routed to that task computes; the manifest lists every task and the serving
commands; merged models equal their adapters; learned routers are refused or approximated as documented; and an
export is written whole or not at all.

Generation runs are built here without training: random non-zero adapters injected into a tiny causal LM, saved as
`loramix train` saves them, with the task metadata of generation tasks (no labels, no heads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import loramix
from loramix.cli import main
from loramix.tiny_lm import write_tiny_lm
from loramix.train import serve_export
from loramix.train.run import load_trained
from loramix.train.serve_export import task_folders
from tests.io.toys import randomize_adapters, task_settings
from tests.train import toys

TASKS = ["sql", "chat", "poems"]
SIZES = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_positions": 64}
ATOL = 1e-5

# peft asks transformers a deprecated question; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 and a tiny Llama (random weights) with the char tokenizer, as `save_pretrained` folders."""
    root = tmp_path_factory.mktemp("bases")
    return {kind: write_tiny_lm(root / kind, kind, **SIZES) for kind in ("gpt2", "llama")}


def generation_run(root: Path, base_dir: Path, *, router: str = "task", method: str = "mola-grad") -> Path:
    """A finished generation run's folder: config.yaml and adapter/ with random adapters on every linear layer."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    settings = {"rank": 4, "alpha": 8.0, "targets": "all-linear", **task_settings(router, len(TASKS))}
    loramix.inject(model, settings)
    randomize_adapters(model)
    run_dir = root / "run"
    tasks = [{"name": name, "task_type": "generation"} for name in TASKS]
    loramix.save(model, run_dir / "adapter", metadata={"tasks": tasks, "run": {"method": method}})
    config = {"method": method, "model": str(base_dir), "tasks_dir": str(root / "data"), "tasks": TASKS}
    config["max_length"] = 48  # within the tiny GPT-2's 64 positions, as a run trained on it has
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return run_dir


def token_ids() -> torch.Tensor:
    return torch.randint(4, 99, (2, 9), generator=torch.Generator().manual_seed(0))


def routed_logits(run_dir: Path, task: int) -> torch.Tensor:
    _, model, _, _ = load_trained(run_dir)
    ids = token_ids()
    with torch.no_grad(), loramix.routing(model.backbone.eval(), task_ids=torch.full((len(ids),), task)):
        return model.backbone(input_ids=ids).logits


def peft_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return peft_model(input_ids=token_ids()).logits


def base_logits(base_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=token_ids()).logits


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_every_task_exports_as_a_peft_adapter_that_computes_the_routed_task_and_the_manifest_serves_them(
    kind: str, base_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir, out = generation_run(tmp_path, base_dirs[kind]), tmp_path / "served"
    assert main(["export", str(run_dir), "--all-tasks", "--merged", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exact" in printed and "vllm serve" in printed and "adapter_source" in printed

    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["adapters"]) == TASKS and manifest["exact"] is True
    assert manifest["base_model"] == str(base_dirs[kind]) and manifest["rank"] == 4
    assert manifest["target_modules"]  # the short names of the adapted modules
    final = out.resolve()
    modules = " ".join(f"{name}={final / name}" for name in TASKS)
    assert manifest["vllm"]["lora_modules"] == modules
    assert manifest["vllm"]["command"] == (
        f"vllm serve {base_dirs[kind]} --enable-lora --lora-modules {modules} --max-lora-rank 8 --max-loras 3"
    )
    assert manifest["lorax"]["requests"]["chat"] == {
        "adapter_id": str(final / "chat"),
        "adapter_source": "local",
    }

    reference = base_logits(base_dirs[kind])
    for task, name in enumerate(TASKS):
        entry = manifest["adapters"][name]
        assert entry["path"] == name and entry["exact"] and entry["head"] is None
        note = json.loads((out / name / "loramix_export.json").read_text())
        assert (
            note["task_type"] == "generation"
            and note["head"] is None
            and "generation" in note["head_missing"]
        )
        assert not (out / name / "head.safetensors").exists()

        expected = routed_logits(run_dir, task)
        assert not torch.allclose(expected, reference, atol=1e-3), "the adapters do not change the output"
        torch.testing.assert_close(
            peft_logits(base_dirs[kind], out / entry["path"]), expected, atol=ATOL, rtol=0
        )

        merged_dir = out / entry["merged"]
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        assert AutoTokenizer.from_pretrained(merged_dir)("ab")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=token_ids()).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("router", "method"), [("poly", "mola-grad"), ("none", "lora")])
def test_a_poly_table_and_a_shared_adapter_export_exactly(
    router: str, method: str, base_dirs: dict[str, Path], tmp_path: Path
):
    """Poly gives each task a fixed mixture of experts (one LoRA of rank up to E*r); `lora` one adapter for all."""
    run_dir = generation_run(tmp_path, base_dirs["llama"], router=router, method=method)
    out = tmp_path / "served"
    assert main(["export", str(run_dir), "--task", "poems", "--task", "sql", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["adapters"]) == ["poems", "sql"] and manifest["exact"] is True
    assert manifest["rank"] == (4 * len(TASKS) if router == "poly" else 4)
    for name in ("poems", "sql"):
        expected = routed_logits(run_dir, TASKS.index(name))
        torch.testing.assert_close(peft_logits(base_dirs["llama"], out / name), expected, atol=ATOL, rtol=0)

    one = tmp_path / "one"  # one --task: the adapter in the folder itself, its merged model in merged/
    assert main(["export", str(run_dir), "--task", "chat", "--merged", "--out", str(one)]) == 0
    assert not (one / "manifest.json").exists() and (one / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(one / "merged").eval()
    with torch.no_grad():
        logits = merged(input_ids=token_ids()).logits
    torch.testing.assert_close(logits, routed_logits(run_dir, TASKS.index("chat")), atol=ATOL, rtol=0)


def test_a_per_input_router_on_generation_tasks_is_refused_and_leaves_nothing(
    base_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir = generation_run(tmp_path, base_dirs["gpt2"], router="token", method="token-router")
    out = tmp_path / "served"
    capsys.readouterr()
    assert main(["export", str(run_dir), "--all-tasks", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "chooses experts per input" in err and "no static server" in err and "vLLM" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder either


def test_a_failed_export_leaves_no_folder_and_an_earlier_export_is_replaced_whole(
    base_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run_dir, out = generation_run(tmp_path, base_dirs["gpt2"]), tmp_path / "served"
    assert main(["export", str(run_dir), "--task", "sql", "--task", "chat", "--out", str(out)]) == 0
    before = {p.relative_to(out) for p in out.rglob("*")}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serve_export, "write_merged", fail)  # after the first task's adapter is written
    with pytest.raises(OSError, match="disk full"):
        main(["export", str(run_dir), "--all-tasks", "--merged", "--out", str(out)])
    assert {p.relative_to(out) for p in out.rglob("*")} == before  # the earlier export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "served"]
    monkeypatch.undo()

    assert main(["export", str(run_dir), "--all-tasks", "--out", str(out)]) == 0  # replaces it whole
    assert list(json.loads((out / "manifest.json").read_text())["adapters"]) == TASKS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "served"]


def test_an_out_folder_holding_other_files_is_refused_before_the_model_loads(
    base_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir, out = generation_run(tmp_path, base_dirs["gpt2"]), tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(run_dir), "--all-tasks", "--out", str(out)]) == 2
    assert "not a loramix export" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["export", str(run_dir), "--all-tasks", "--task", "sql", "--out", str(tmp_path / "x")]) == 2
    assert "--all-tasks exports every task" in capsys.readouterr().err


def test_task_folders_are_safe_names_and_never_collide():
    assert task_folders(["sql", "a b", "a_b", "../up", "manifest.json", ""]) == {
        "sql": "sql",
        "a b": "a_b",
        "a_b": "a_b-2",
        "../up": "_up",
        "manifest.json": "manifest.json_",
        "": "task",
    }


def test_a_learned_router_exports_every_task_as_its_mean_gate_and_the_manifest_says_approximate(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = tmp_path / "run.yaml"
    settings = toys.settings(model_dir, tasks_dir, method="mola-router", steps=2, lr=2e-2, router_lr=5e-2)
    config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    run_dir, out = tmp_path / "x", tmp_path / "served"
    assert main(["train", str(config), "--output-dir", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["export", str(run_dir), "--all-tasks", "--merged", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "approximate" in printed and "chooses experts per input" in printed and "relative L2" in printed

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exact"] is False and "static multi-LoRA server" in manifest["static_serving"]
    assert list(manifest["adapters"]) == toys.TASK_NAMES
    for name, entry in manifest["adapters"].items():
        assert entry["exact"] is False and 0 <= entry["gap"]["relative_l2"] < 1
        assert entry["head"] == f"{name}/head.safetensors" and (out / entry["head"]).is_file()
        note = json.loads((out / name / "loramix_export.json").read_text())
        assert note["gate"]["kind"] == "mean"
    assert "vllm" not in manifest and "PeftModel.from_pretrained" in manifest["serving_note"]

    # an encoder's merged model is its adapter (the task's mean gate) folded in
    _, _, tokenizer, _ = load_trained(run_dir)
    inputs = dict(
        tokenizer(["the good film with music", "a cat near the river"], padding=True, return_tensors="pt")
    )
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), str(out / "colors")).eval()
    merged = AutoModel.from_pretrained(out / manifest["adapters"]["colors"]["merged"]).eval()
    with torch.no_grad():
        expected = peft_model(**inputs).last_hidden_state
        torch.testing.assert_close(merged(**inputs).last_hidden_state, expected, atol=ATOL, rtol=0)


def test_a_run_that_trained_its_backbone_exports_the_trained_base_beside_its_adapters(
    gpt2_dir: Path, gen_tasks_dir: Path, tmp_path: Path
):
    """The adapters of a `train_backbone` run are right only on the trained base: the export writes it as
    `base/`, names it in every adapter and in the serving commands, and base + adapter computes the routed task."""
    from loramix.methods import run_training
    from loramix.train.config import RunConfig

    settings = toys.gen_settings(
        gpt2_dir, gen_tasks_dir, method="mola-grad", steps=3, train_backbone=True, backbone_lr=5e-2
    )
    run_training(RunConfig.from_dict(settings), tmp_path / "run")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "run"), "--all-tasks", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"] == str((out / "base").resolve())
    assert f"vllm serve {(out / 'base').resolve()} " in manifest["vllm"]["command"]
    _, model, _, _ = load_trained(tmp_path / "run")
    model.eval()
    ids = token_ids()
    for task_id, task in enumerate(toys.GEN_TASKS):
        note = json.loads((out / task / "adapter_config.json").read_text())
        assert note["base_model_name_or_path"] == str((out / "base").resolve())
        base = AutoModelForCausalLM.from_pretrained(out / "base").eval()
        served = PeftModel.from_pretrained(base, out / task).eval()
        with torch.no_grad(), loramix.routing(model.backbone, task_ids=torch.full((2,), task_id)):
            want = model.backbone(input_ids=ids).logits
        with torch.no_grad():
            torch.testing.assert_close(served(input_ids=ids).logits, want, atol=ATOL, rtol=0)
            untouched = AutoModelForCausalLM.from_pretrained(gpt2_dir)
            wrong = PeftModel.from_pretrained(untouched, out / task).eval()(input_ids=ids).logits
        assert (wrong - want).abs().max() > 100 * ATOL  # the untrained base would not do
