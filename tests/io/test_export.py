"""Exchange with PEFT: an exported task (or fixed mixture) loaded by `PeftModel.from_pretrained` into an
untouched base computes what loramix computes; PEFT LoRA directories imported as experts compute what PEFT
computes."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import Tensor, nn

import loramix
from loramix import CheckpointError, InjectionError
from loramix.errors import RoutingError
from loramix.inject import is_injected
from loramix.io.export import mean_gate, serving_commands, vllm_max_lora_rank
from tests.io.toys import SmallCNN, randomize_adapters, task_settings, tiny_bert, tiny_gpt2, token_ids

ATOL = 1e-5

# peft asks transformers a deprecated question; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def images() -> Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def bert_out(model: nn.Module) -> Tensor:
    return model(input_ids=token_ids()).last_hidden_state


def gpt2_out(model: nn.Module) -> Tensor:
    return model(input_ids=token_ids()).logits


def cnn_out(model: nn.Module) -> Tensor:
    return model(images())


MODELS: dict[str, tuple[Callable[[], nn.Module], list[str], Callable[[nn.Module], Tensor]]] = {
    "bert": (tiny_bert, ["query", "value"], bert_out),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], gpt2_out),
    "cnn": (SmallCNN, ["conv1", "conv2"], cnn_out),
}


def adapted(kind: str, router: str = "task", share: str = "none", **settings: Any):
    """(adapted model with random adapters in eval mode, untouched base copy, forward)."""
    make, targets, forward = MODELS[kind]
    torch.manual_seed(0)
    model = make().eval()
    base = copy.deepcopy(model)
    config = {"rank": 4, "targets": targets, "share": share, **task_settings(router), **settings}
    loramix.inject(model, config)
    randomize_adapters(model)
    return model.eval(), base, forward


def peft_outputs(base: nn.Module, directory: Path, forward: Callable[[nn.Module], Tensor]) -> Tensor:
    peft_model = PeftModel.from_pretrained(base, str(directory)).eval()
    with torch.no_grad():
        return forward(peft_model)


def loramix_outputs(model: nn.Module, forward: Callable, task: int) -> Tensor:
    with torch.no_grad(), loramix.routing(model, task_ids=torch.tensor([task, task])):
        return forward(model)


def assert_close(actual: Tensor, expected: Tensor, reference: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, reference, atol=1e-3), "the adapters do not change the output"


# ---- export ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "share"),
    [("bert", "none"), ("bert", "A"), ("bert", "B"), ("gpt2", "none"), ("gpt2", "A")]
    + [("cnn", "none"), ("cnn", "A"), ("cnn", "B")],
)
def test_exported_task_equals_routing_to_it(tmp_path: Path, kind: str, share: str) -> None:
    model, base, forward = adapted(kind, "task", share)
    task = 1
    expected = loramix_outputs(model, forward, task)
    with torch.no_grad():
        plain = forward(copy.deepcopy(base))

    loramix.export_peft(model, tmp_path, task=task)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    assert_close(peft_outputs(base, tmp_path, forward), expected, plain)


def test_experts_in_some_blocks_only_export_to_those_blocks(tmp_path: Path) -> None:
    model, base, forward = adapted("bert", "task", "none", layers_to_transform=[1])
    expected = loramix_outputs(model, forward, 1)
    with torch.no_grad():
        plain = forward(copy.deepcopy(base))
    loramix.export_peft(model, tmp_path, task=1)
    assert_close(peft_outputs(base, tmp_path, forward), expected, plain)
    names = load_file(tmp_path / "adapter_model.safetensors")
    assert names and all(".layer.1." in name for name in names)


def test_modules_trained_whole_export_as_peft_modules_to_save(tmp_path: Path) -> None:
    model, base, forward = adapted("bert", "task", "none", modules_to_save=["pooler.dense"])
    with torch.no_grad():  # the module as trained: away from the base's
        dense = model.pooler.dense
        dense.weight.add_(torch.randn(dense.weight.shape, generator=torch.Generator().manual_seed(1)))

    def pooled(m: nn.Module) -> Tensor:
        return m(input_ids=token_ids()).pooler_output

    expected = loramix_outputs(model, pooled, 1)
    with torch.no_grad():
        plain = pooled(copy.deepcopy(base))
    loramix.export_peft(model, tmp_path, task=1)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["pooler.dense"]
    assert_close(peft_outputs(base, tmp_path, pooled), expected, plain)
    with pytest.raises(CheckpointError, match="holds whole modules \\(pooler.dense; 2 tensors\\)"):
        loramix.import_peft(
            copy.deepcopy(base), tmp_path
        )  # what one expert per adapter cannot carry: refused


def test_export_of_a_model_whose_backbone_trained_asks_for_the_trained_base(tmp_path: Path) -> None:
    model, _, _ = adapted("bert", "task", "none", train_backbone=True)
    with pytest.warns(UserWarning, match="base_model_name_or_path"):
        loramix.export_peft(model, tmp_path / "a", task=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loramix.export_peft(model, tmp_path / "b", task=1, base_model_name_or_path=str(tmp_path / "trained"))


def test_export_follows_task_to_expert(tmp_path: Path) -> None:
    model, base, forward = adapted("bert", "task", num_experts=2, num_tasks=3, task_to_expert=[0, 1, 1])
    expected = loramix_outputs(model, forward, 2)
    other_expert = loramix_outputs(model, forward, 0)
    loramix.export_peft(model, tmp_path, task=2)
    assert_close(peft_outputs(base, tmp_path, forward), expected, other_expert)


def test_plain_lora_exports_without_task(tmp_path: Path) -> None:
    model, base, forward = adapted("gpt2", "none")
    with torch.no_grad(), loramix.routing(model):
        expected = forward(model)
        plain = forward(copy.deepcopy(base))
    loramix.export_peft(model, tmp_path)
    assert_close(peft_outputs(base, tmp_path, forward), expected, plain)


@pytest.mark.parametrize(
    ("kind", "router", "share", "gate", "rank"),
    [
        ("bert", "sample", "none", [0.2, 0.0, 0.8], 8),  # only the experts with a non-zero gate are stacked
        ("bert", "token", "none", [0.5, 0.3, 0.2], 12),
        ("bert", "sample", "A", [0.6, 0.1, 0.3], 4),
        ("bert", "sample", "B", [0.6, 0.1, 0.3], 4),
        ("cnn", "sample", "none", [0.1, 0.6, 0.3], 12),
        ("bert", "sample", "none", [0.0, 0.0, 0.0], 4),
    ],
)
def test_fixed_mixture_exports_as_one_lora(
    tmp_path: Path, kind: str, router: str, share: str, gate: list[float], rank: int
) -> None:
    model, base, forward = adapted(kind, router, share)
    loramix.export_peft(model, tmp_path, gate=gate)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == rank <= 3 * 4
    merged = loramix.merge_and_unload(model, gate=torch.tensor(gate))
    assert not is_injected(merged)
    with torch.no_grad():
        expected = forward(merged)
        plain = forward(copy.deepcopy(base))
    if any(gate):
        assert_close(peft_outputs(base, tmp_path, forward), expected, plain)
    else:
        torch.testing.assert_close(peft_outputs(base, tmp_path, forward), plain, atol=ATOL, rtol=0)


def test_poly_task_export_equals_eval_routing(tmp_path: Path) -> None:
    model, base, forward = adapted("bert", "poly", num_experts=4, num_tasks=3)
    with torch.no_grad():
        for layer in loramix.get_info(model).layers:
            layer.router.table.normal_(std=2.0)
    expected = loramix_outputs(model, forward, 2)
    other_task = loramix_outputs(model, forward, 0)
    loramix.export_peft(model, tmp_path, task=2)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 16
    assert_close(peft_outputs(base, tmp_path, forward), expected, other_task)


def test_per_layer_mixtures_export_as_one_lora(tmp_path: Path) -> None:
    model, base, forward = adapted("bert", "token")
    names = loramix.get_info(model).names
    rng = torch.Generator().manual_seed(1)
    gates = {name: torch.rand(3, generator=rng).softmax(0) for name in names}  # a different mixture per layer
    loramix.export_peft(model, tmp_path, gate=gates)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 12
    one = copy.deepcopy(model)
    merged = loramix.merge_and_unload(model, gate=gates)  # type: ignore[arg-type]
    with torch.no_grad():
        expected = forward(merged)
        first_layers_mixture = forward(loramix.merge_and_unload(one, gate=gates[names[0]]))
    assert_close(peft_outputs(base, tmp_path, forward), expected, first_layers_mixture)


def test_mean_gate_averages_what_the_routers_chose(tmp_path: Path) -> None:
    """The model-wide router's gate averaged over samples; per-layer per-token gates over real tokens only."""
    ids = token_ids(batch=3, length=6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    batches = [
        {"input_ids": ids[:2], "attention_mask": mask[:2]},
        {"input_ids": ids[2:], "attention_mask": mask[2:]},
    ]

    model, _, _ = adapted("bert", "sample")
    with torch.no_grad(), loramix.routing(model, attention_mask=mask) as state:
        model(input_ids=ids, attention_mask=mask)
    (name, gate), *_ = state.records
    assert name == "model"
    torch.testing.assert_close(mean_gate(model, batches), gate.weights.mean(0), atol=1e-6, rtol=0)

    model, _, _ = adapted("bert", "token")
    with torch.no_grad(), loramix.routing(model, attention_mask=mask) as state:
        model(input_ids=ids, attention_mask=mask)
    means = mean_gate(model, batches)
    assert isinstance(means, dict) and sorted(means) == sorted(loramix.get_info(model).names)
    real = mask.bool()
    for name, gate in state.records:
        torch.testing.assert_close(means[name], gate.weights[real].mean(0), atol=1e-6, rtol=0)

    with torch.no_grad():  # a router that scores every input alike has the mean gate it gives each input
        for layer in loramix.get_info(model).layers:
            layer.router.weight.zero_()
    for mixture in mean_gate(model, batches).values():  # type: ignore[union-attr]
        torch.testing.assert_close(mixture, torch.full((3,), 1 / 3), atol=1e-6, rtol=0)


def test_mean_gate_routes_a_per_task_router_by_the_task(tmp_path: Path) -> None:
    model, _, _ = adapted("bert", "per-task", num_tasks=3)
    batches = [{"input_ids": token_ids(batch=4)}]
    assert mean_gate(model, batches, task=1).keys() == set(loramix.get_info(model).names)  # type: ignore[union-attr]
    with pytest.raises(RoutingError, match="no task_ids"):
        mean_gate(model, batches)
    model, _, _ = adapted("bert", "sample")
    with pytest.raises(InjectionError, match="pass at least one batch"):
        mean_gate(model, [])


@pytest.mark.parametrize(
    ("router", "kwargs", "problem"),
    [
        ("sample", {"task": 0}, "pass gate="),
        ("token", {"gate": {"encoder.layer.0.attention.self.query": [1.0, 0.0, 0.0]}}, "no entry for layer"),
        ("token", {"gate": {"encoder.layer.0.attention.self.query": [1.0, 0.0]}}, "gate for layer 'encoder"),
        ("task", {}, "task must be an integer in 0..2"),
        ("task", {"task": 3}, "task must be an integer in 0..2"),
        ("task", {"task": 1.5}, "task must be an integer in 0..2, got 1.5"),
        ("task", {"task": "2"}, "task must be an integer in 0..2, got '2'"),
        ("task", {"gate": [1.0, 0.0]}, "gate has 2 entries but the model has 3 experts"),
        ("task", {"gate": [float("nan"), 1.0, 0.0]}, "gate holds a value that is not a finite number"),
        ("token", {"gate": [1.0, float("inf"), 0.0]}, "gate holds a value that is not a finite number"),
        ("task", {"task": 1, "gate": [0.0, 1.0, 0.0]}, "pass task or gate, not both"),
    ],
)
def test_export_refuses_what_it_cannot_fix(tmp_path: Path, router: str, kwargs: dict, problem: str) -> None:
    model, _, _ = adapted("bert", router)
    with pytest.raises(InjectionError, match=problem):
        loramix.export_peft(model, tmp_path, **kwargs)
    assert not (tmp_path / "adapter_config.json").exists()


def test_export_refuses_dilated_convolutions(tmp_path: Path) -> None:
    model = SmallCNN()
    model.conv2 = nn.Conv2d(8, 6, 3, dilation=2, padding=2)  # PEFT's LoRA conv would ignore the dilation
    loramix.inject(model, {"rank": 4, "targets": ["conv1", "conv2"]})
    with pytest.raises(CheckpointError, match="dilat") as caught:
        loramix.export_peft(model, tmp_path)
    assert "conv2" in str(caught.value) and "conv1" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# ---- import -------------------------------------------------------------------------------------------------

ADAPTERS = [
    {"r": 4, "lora_alpha": 8},
    {"r": 2, "lora_alpha": 7},
    {"r": 8, "lora_alpha": 4, "use_rslora": True},
]


def write_peft_adapters(
    directory: Path, settings: list[dict[str, Any]], targets: list[str] | None = None, **save_kwargs: Any
) -> list[Path]:
    """One PEFT LoRA directory per settings dict, each with its own random non-zero lora_A and lora_B."""
    paths = []
    for index, kwargs in enumerate(settings):
        torch.manual_seed(100 + index)
        model = get_peft_model(
            tiny_bert(),  # its base weights do not matter: only the adapter is saved
            LoraConfig(target_modules=targets or ["query", "value"], lora_dropout=0.0, **kwargs),
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(std=0.3)
        path = directory / f"adapter{index}"
        model.save_pretrained(str(path), **save_kwargs)
        paths.append(path)
    return paths


def bert_base() -> nn.Module:
    torch.manual_seed(0)
    return tiny_bert()


def test_imported_adapters_match_peft(tmp_path: Path) -> None:
    paths = write_peft_adapters(tmp_path, ADAPTERS)
    model = bert_base()
    report = loramix.import_peft(model, paths)
    model.eval()
    assert len(report.matched) == 4
    assert loramix.get_info(model).config.rank == 8

    with torch.no_grad():
        plain = bert_out(bert_base())
    expected = [peft_outputs(bert_base(), path, bert_out) for path in paths]
    for task in range(len(paths)):
        assert_close(loramix_outputs(model, bert_out, task), expected[task], plain)
    # a batch that mixes tasks routes each sample to its own adapter
    with torch.no_grad(), loramix.routing(model, task_ids=torch.tensor([2, 0])):
        mixed = bert_out(model)
    torch.testing.assert_close(mixed[0], expected[2][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], expected[0][1], atol=ATOL, rtol=0)


def test_import_then_export_gives_back_the_adapter(tmp_path: Path) -> None:
    paths = write_peft_adapters(tmp_path, ADAPTERS[1:2])
    model = bert_base()
    loramix.import_peft(model, str(paths[0]), router="none")  # one directory need not be in a list
    loramix.export_peft(model, tmp_path / "again")
    with torch.no_grad():
        plain = bert_out(bert_base())
    assert_close(
        peft_outputs(bert_base(), tmp_path / "again", bert_out),
        peft_outputs(bert_base(), paths[0], bert_out),
        plain,
    )
    with pytest.raises(CheckpointError, match="a PEFT adapter, not a loramix save; .*import_peft"):
        loramix.load(bert_base(), tmp_path / "again")


def test_import_of_mismatched_targets_names_the_directory(tmp_path: Path) -> None:
    first = write_peft_adapters(tmp_path / "a", ADAPTERS[:1], targets=["query", "value"])
    second = write_peft_adapters(tmp_path / "b", ADAPTERS[:1], targets=["query"])
    model = bert_base()
    with pytest.raises(CheckpointError, match="adapts other modules than") as caught:
        loramix.import_peft(model, first + second)
    assert str(second[0]) in str(caught.value)
    assert not is_injected(model)


def test_import_into_another_model_names_a_few_missing_modules(tmp_path: Path) -> None:
    paths = write_peft_adapters(tmp_path, ADAPTERS[:1], targets=["query", "value"])
    model = tiny_gpt2()
    with pytest.raises(
        CheckpointError, match=r"adapts modules this model does not have \(.* and \d+ more of"
    ):
        loramix.import_peft(model, paths)
    assert not is_injected(model)


def test_import_of_pickle_only_directory_asks_for_safetensors(tmp_path: Path) -> None:
    paths = write_peft_adapters(tmp_path, ADAPTERS[:1], safe_serialization=False)
    assert (paths[0] / "adapter_model.bin").is_file()
    assert not (paths[0] / "adapter_model.safetensors").exists()
    with pytest.raises(CheckpointError, match="safetensors") as caught:
        loramix.import_peft(bert_base(), paths)
    message = str(caught.value)
    assert str(paths[0]) in message and "adapter_model.bin" in message and "safe_serialization" in message


def test_import_of_a_non_lora_adapter_is_refused(tmp_path: Path) -> None:
    paths = write_peft_adapters(tmp_path, ADAPTERS[:1])
    config_path = paths[0] / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="not 'LORA'") as caught:
        loramix.import_peft(bert_base(), paths)
    assert str(config_path) in str(caught.value)


def test_import_needs_a_directory() -> None:
    with pytest.raises(InjectionError, match="at least one"):
        loramix.import_peft(bert_base(), [])


def test_serving_commands_register_every_adapter_with_a_rank_vllm_accepts(tmp_path: Path) -> None:
    adapters = {"sql": tmp_path / "sql", "chat": tmp_path / "my adapters" / "chat"}
    commands = serving_commands("org/base", adapters, 12)
    vllm = commands["vllm"]
    assert vllm["max_lora_rank"] == 16
    assert vllm["lora_modules"] == f"sql={tmp_path / 'sql'} 'chat={tmp_path / 'my adapters' / 'chat'}'"
    assert vllm["command"] == (
        f"vllm serve org/base --enable-lora --lora-modules {vllm['lora_modules']} --max-lora-rank 16 --max-loras 2"
    )
    assert commands["lorax"]["command"] == "lorax-launcher --model-id org/base"
    assert commands["lorax"]["requests"]["sql"] == {
        "adapter_id": str(tmp_path / "sql"),
        "adapter_source": "local",
    }
    too_wide = serving_commands("org/base", adapters, 600)["vllm"]
    assert too_wide["command"] is None and "512" in too_wide["note"]
    assert "quantization_note" not in commands
    # adapters trained on a quantized base: the servers quantize it too, and say that they come close, not equal
    nf4 = serving_commands("org/base", adapters, 12, "4bit")
    assert nf4["vllm"]["command"].startswith("vllm serve org/base --quantization bitsandbytes --enable-lora")
    assert nf4["lorax"]["command"] == "lorax-launcher --model-id org/base --quantize bitsandbytes-nf4"
    int8 = serving_commands("org/base", adapters, 12, "8bit")
    assert "--quantization" not in int8["vllm"]["command"] and "4-bit only" in int8["quantization_note"]
    assert int8["lorax"]["command"].endswith("--quantize bitsandbytes")
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 320, 321, 512, 513)] == [
        1,
        8,
        8,
        16,
        320,
        512,
        512,
        None,
    ]
