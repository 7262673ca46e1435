"""Injection into toy and tiny Hugging Face models, its errors, undoing it, merging, and equality with PEFT's LoRA."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import loramix
from loramix.experts import Conv1DExperts, Conv2dExperts, LinearExperts
from loramix.inject import adapter_state, get_info
from tests.models import (
    ROUTERS,
    SHARES,
    adapted_names,
    adapter_config,
    call,
    cnn_inputs,
    mlp_inputs,
    randomize_adapters,
    run,
    text_inputs,
    tiny_bert,
    tiny_cnn,
    tiny_gpt2,
    tiny_mlp,
)

BERT_LAYERS = [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


# ---- what gets matched ----------------------------------------------------------------------------------------


def test_bert_query_value() -> None:
    model = tiny_bert()
    inputs = text_inputs()
    base = call(model, inputs)
    report = loramix.inject(model, adapter_config("task", targets=["query", "value"]))
    assert adapted_names(model) == BERT_LAYERS
    assert sorted(name for name, *_ in report.matched) == BERT_LAYERS
    assert all(kind == "Linear" and i == o == 32 for _, kind, i, o in report.matched)
    assert all(isinstance(m, LinearExperts) for m in get_info(model).layers)
    out, _ = run(model, inputs)
    assert (out - base).abs().max() < 1e-6
    randomize_adapters(model)
    assert not torch.allclose(run(model, inputs)[0], base, atol=1e-3)
    assert "adapted 4 modules" in str(report)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("share", SHARES)
def test_bert_identity_at_init(router: str, share: str) -> None:
    model = tiny_bert()
    inputs = text_inputs()
    base = call(model, inputs)
    loramix.inject(model, adapter_config(router, share, targets="all-linear"))
    out, _ = run(model, inputs)
    assert (out - base).abs().max() < 1e-6


def test_bert_all_linear() -> None:
    model = tiny_bert()
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    loramix.inject(model, adapter_config("token", targets="all-linear"))
    assert adapted_names(model) == linear
    assert len(linear) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; the pooler
    out, state = run(model, text_inputs())
    assert out.shape == (4, 7, 32)
    assert len(state.records) == len(linear)


def test_gpt2_conv1d_layers() -> None:
    model = tiny_gpt2(lm_head=True)
    inputs = {"input_ids": text_inputs()["input_ids"]}
    base = call(model, inputs)
    report = loramix.inject(model, adapter_config("poly", share="A"))
    conv1d = {
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert set(adapted_names(model)) == conv1d  # the (tied) lm_head is an output head: never adapted
    assert {kind for _, kind, *_ in report.matched} == {"Conv1D"}
    assert all(isinstance(m, Conv1DExperts) for m in get_info(model).layers)
    c_attn = dict((name, (i, o)) for name, _, i, o in report.matched)["transformer.h.0.attn.c_attn"]
    assert c_attn == (32, 96)
    out, _ = run(model, inputs)
    assert out.shape == (4, 7, 99)
    assert (out - base).abs().max() < 1e-6
    randomize_adapters(model)
    assert not torch.allclose(run(model, inputs)[0], base, atol=1e-3)


def test_cnn_conv2d_layers() -> None:
    model = tiny_cnn()
    x = cnn_inputs()
    base = model(x)
    report = loramix.inject(model, adapter_config("task", targets=["conv1", "conv2"]))
    assert adapted_names(model) == ["conv1", "conv2"]
    assert [(kind, i, o) for _, kind, i, o in report.matched] == [("Conv2d", 3, 6), ("Conv2d", 6, 6)]
    assert all(isinstance(m, Conv2dExperts) for m in get_info(model).layers)
    assert (run(model, x)[0] - base).abs().max() < 1e-6


def test_mlp_targets_and_exclude() -> None:
    model = tiny_mlp()
    loramix.inject(model, adapter_config("none", targets="all-linear", exclude=["head"]))
    assert adapted_names(model) == ["fc1", "fc2"]
    model = tiny_mlp()
    loramix.inject(model, adapter_config("none", targets=[], target_regex=r"fc\d"))
    assert adapted_names(model) == ["fc1", "fc2"]


def test_layers_to_transform_keeps_the_targets_of_those_blocks_as_peft_does() -> None:
    model = tiny_bert()
    second = [n for n, m in model.named_modules() if ".layer.1." in n and isinstance(m, nn.Linear)]
    loramix.inject(model, adapter_config("none", targets="all-linear", layers_to_transform=[1]))
    assert adapted_names(model) == second and len(second) == 6  # not block 0's, nor the pooler
    one = tiny_bert()
    loramix.inject(
        one, adapter_config("none", targets="all-linear", layers_to_transform=1)
    )  # one index, as PEFT
    assert adapted_names(one) == second
    reference = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(target_modules=["query", "value"], layers_to_transform=[1])
    )
    ours = tiny_bert()
    loramix.inject(ours, adapter_config("none", targets=["query", "value"], layers_to_transform=[1]))
    lora = {
        n.removeprefix("base_model.model.")
        for n, m in reference.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert (
        set(adapted_names(ours))
        == lora
        == {f"encoder.layer.1.attention.self.{m}" for m in ("query", "value")}
    )
    gpt2 = tiny_gpt2()
    loramix.inject(gpt2, adapter_config("none", target_regex=r".*mlp\.c_proj", layers_to_transform=[0]))
    assert adapted_names(gpt2) == ["h.0.mlp.c_proj"]


@pytest.mark.parametrize(
    ("make", "layers", "message"),
    [
        (tiny_bert, [2], r"layers_to_transform: \[2\] are not blocks of the model, which has 2 \(0 to 1\)"),
        (tiny_mlp, [0], "one list of config.num_hidden_layers modules; this one has none"),
    ],
)
def test_layers_to_transform_outside_the_blocks_is_refused_by_name(make, layers, message) -> None:
    model = make()
    with pytest.raises(loramix.InjectionError, match=message):
        loramix.inject(model, adapter_config("none", targets="all-linear", layers_to_transform=layers))
    assert adapted_names(model) == []


# ---- errors ---------------------------------------------------------------------------------------------------


def test_target_matching_nothing_names_the_target() -> None:
    model = tiny_bert()
    with pytest.raises(loramix.InjectionError, match="quuery"):
        loramix.inject(model, adapter_config("none", targets=["query", "quuery"]))
    assert adapted_names(model) == []
    assert not hasattr(model, "_loramix_info")
    with pytest.raises(loramix.InjectionError, match="whole name"):  # a regex must match all of a name
        loramix.inject(model, adapter_config("none", target_regex="query"))
    attention = torch.nn.Sequential(torch.nn.Linear(8, 8))
    attention.attn = torch.nn.MultiheadAttention(8, 2)
    with pytest.raises(loramix.InjectionError, match="out_proj of an nn.MultiheadAttention"):
        loramix.inject(attention, adapter_config("none", targets=["out_proj"]))
    mlp = tiny_mlp()
    with pytest.raises(loramix.InjectionError, match="every nn.Linear .* is in exclude"):
        loramix.inject(mlp, adapter_config("none", targets="all-linear", exclude=["fc1", "fc2", "head"]))


@pytest.mark.parametrize("target", ["LayerNorm", "word_embeddings", "attention"])
def test_unsupported_module_kind(target: str) -> None:
    model = tiny_bert()
    with pytest.raises(loramix.InjectionError, match=target):
        loramix.inject(model, adapter_config("none", targets=[target]))
    assert adapted_names(model) == []


def test_failed_injection_leaves_the_model_untouched() -> None:
    """A builder that refuses a module (a per-token router on a Conv2d) must not leave other modules wrapped."""
    model = tiny_cnn()
    model.conv1, model.head = nn.Linear(3, 3), nn.Conv2d(6, 6, 1)  # the Linear is wrapped first
    with pytest.raises(loramix.InjectionError, match="per-token"):
        loramix.inject(model, adapter_config("token", targets=["conv1", "head"]))
    assert adapted_names(model) == []
    assert all(p.requires_grad for p in model.parameters())
    loramix.inject(model, adapter_config("task", targets=["conv1", "head"]))  # and it can still be injected


@pytest.mark.parametrize("training", [False, True])
def test_adapters_follow_the_mode_of_the_modules_they_wrap(training: bool) -> None:
    model = tiny_mlp().train(training)
    loramix.inject(model, adapter_config("sample", dropout=0.1))
    assert {m.training for m in model.modules()} == {training}


def test_injecting_twice_raises() -> None:
    model = tiny_mlp()
    loramix.inject(model, adapter_config("none"))
    with pytest.raises(loramix.InjectionError, match="already"):
        loramix.inject(model, adapter_config("none"))


def test_bad_config_dict_is_a_config_error() -> None:
    with pytest.raises(loramix.ConfigError, match="num_experts"):
        loramix.inject(tiny_mlp(), {"num_experts": 0})


@pytest.mark.parametrize("as_dict", [False, True])
def test_config_is_not_modified(as_dict: bool) -> None:
    config = adapter_config("sample", targets=["fc1", "fc2"], exclude=["head"], modules_to_save=["head"])
    given = config.to_dict() if as_dict else config
    before = copy.deepcopy(given)
    loramix.inject(tiny_mlp(), given)
    assert given == before
    assert (given["targets"] if as_dict else given.targets) == ["fc1", "fc2"]
    assert get_info_config_equal(given, config)


def get_info_config_equal(given, config: loramix.AdapterConfig) -> bool:
    model = tiny_mlp()
    loramix.inject(model, given)
    return get_info(model).config == config


# ---- freezing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTERS)
def test_base_frozen_adapters_trainable(router: str) -> None:
    model = tiny_mlp()
    report = loramix.inject(model, adapter_config(router, targets=["fc1", "fc2"]))
    adapter = set(adapter_state(model))
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in adapter), name
    assert (
        report.adapter_parameters
        == report.trainable_parameters
        == sum(p.numel() for p in adapter_state(model).values())
    )
    assert report.total_parameters == sum(p.numel() for p in model.parameters())
    if router in ("poly", "token"):
        assert any(".router." in name for name in adapter)
    if router in ("task", "sample"):
        assert any("model_router" in name for name in adapter) == (router == "sample")


def test_train_backbone_and_modules_to_save() -> None:
    model = tiny_mlp()
    loramix.inject(model, adapter_config("none", targets=["fc1"], train_backbone=True))
    assert all(p.requires_grad for p in model.parameters())
    model = tiny_mlp()
    loramix.inject(model, adapter_config("none", targets=["fc1"], modules_to_save=["head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.experts.A", "fc1.experts.B", "head.weight", "head.bias"}


# ---- undo -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTERS)
def test_remove_restores_modules_and_requires_grad(router: str) -> None:
    model = tiny_mlp()
    model.norm.requires_grad_(False)
    model.fc2.bias.requires_grad_(False)
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {n: t.clone() for n, t in model.state_dict().items()}
    x = mlp_inputs()
    base = model(x)
    loramix.inject(model, adapter_config(router))
    randomize_adapters(model)
    assert loramix.remove(model) is model
    assert dict(model.named_modules()) == modules  # the very same module objects
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in state.items())
    assert torch.equal(model(x), base)
    with pytest.raises(loramix.InjectionError, match="no loramix adapters"):
        loramix.remove(model)
    loramix.inject(model, adapter_config(router))  # and it can be injected again


@pytest.mark.parametrize("router", ["task", "sample"])
def test_disabled_gives_the_base_model_s_outputs_without_running_a_router_or_expert(router: str) -> None:
    model = tiny_bert()
    inputs = text_inputs()
    base = call(model, inputs)
    loramix.inject(model, adapter_config(router))
    randomize_adapters(model)
    ran: list[str] = []
    for layer in get_info(model).layers:
        for part in (layer.experts, layer.router):
            if part is not None:
                part.register_forward_pre_hook(lambda module, args: ran.append(type(module).__name__))
    with loramix.disabled(model) as same:
        assert same is model and torch.equal(call(model, inputs), base)
    assert not ran
    adapted, _ = run(model, inputs)  # switched back on
    assert ran and not torch.allclose(adapted, base)


def test_remove_unmerges() -> None:
    model = tiny_mlp()
    weight = model.fc1.weight.detach().clone()
    loramix.inject(model, adapter_config("none"))
    randomize_adapters(model)
    get_info(model).layers[0].merge(torch.ones(1))
    assert not torch.allclose(get_info(model).layers[0].base_layer.weight, weight)
    loramix.remove(model)
    torch.testing.assert_close(model.fc1.weight, weight, atol=1e-6, rtol=0)


# ---- one expert with a gate of ones is PEFT's LoRA ------------------------------------------------------------


def peft_twin(
    model: nn.Module, targets: list[str], rank: int, alpha: float, rslora: bool, **kwargs
) -> nn.Module:
    """A PEFT LoRA on a copy of the (not yet injected) model."""
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora, **kwargs
    )
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


@torch.no_grad()
def copy_into_peft(model: nn.Module, twin: nn.Module) -> None:
    inner = twin.get_base_model()
    for name, layer in zip(get_info(model).names, get_info(model).layers):
        target = inner.get_submodule(name)
        target.lora_A["default"].weight.copy_(layer.experts.A[0])
        target.lora_B["default"].weight.copy_(layer.experts.B[0])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("model_kind", ["mlp", "bert", "gpt2"])
def test_single_expert_equals_peft_lora(model_kind: str, rslora: bool) -> None:
    if model_kind == "mlp":
        model, inputs, targets = tiny_mlp(), mlp_inputs(), ["fc1", "fc2"]
    elif model_kind == "bert":
        model, inputs, targets = tiny_bert(), text_inputs(), ["query", "value"]
    else:
        model, inputs, targets = tiny_gpt2(), {"input_ids": text_inputs()["input_ids"]}, ["c_attn", "c_fc"]
    kwargs = {"fan_in_fan_out": True} if model_kind == "gpt2" else {}
    twin = peft_twin(model, targets, rank=4, alpha=6.0, rslora=rslora, **kwargs)
    base = call(model, inputs)
    loramix.inject(model, adapter_config("none", targets=targets, rank=4, alpha=6.0, rslora=rslora))
    randomize_adapters(model)
    copy_into_peft(model, twin)
    out, _ = run(model.eval(), inputs)
    want = call(twin, inputs)
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_sample_router_can_pool_a_conv_layers_output():
    """`router_input` may name a Conv2d: the router reads its output channels, pooled over space."""
    from tests.models import tiny_cnn

    model = tiny_cnn()
    loramix.inject(
        model,
        {"num_experts": 3, "rank": 2, "router": "sample", "targets": ["conv2"], "router_input": "conv1"},
    )
    router = get_info(model).model_router
    assert router.network[1].in_features == model.conv1.out_channels  # conv1 is not a target
    with loramix.routing(model) as state:
        out = model(cnn_inputs())
    assert out.shape[0] == cnn_inputs().shape[0]
    assert state.model_gate is not None and state.model_gate.weights.shape[-1] == 3


def test_router_input_may_end_one_module_s_name():
    """`embeddings` is `bert.embeddings` in a BERT classifier as it is `embeddings` in the encoder alone: the
    run config's router settings serve both."""
    model = tiny_bert(num_labels=3)
    settings = {"num_experts": 2, "rank": 2, "router": "sample", "router_input": "embeddings"}
    loramix.inject(model, settings)
    assert get_info(model).router_input == "bert.embeddings"
    assert get_info(model).router_source(model) is model.bert.embeddings
    ambiguous = tiny_bert(num_labels=3)
    with pytest.raises(loramix.InjectionError, match="'dense' ends the names of .* modules .*full name"):
        loramix.inject(ambiguous, {**settings, "router_input": "dense"})
    with pytest.raises(
        loramix.InjectionError, match="'embedings' is not a module.*Did you mean 'bert.embeddings'"
    ):
        loramix.inject(ambiguous, {**settings, "router_input": "embedings"})


class Pooled(nn.Module):
    """A user's module around a Hugging Face encoder, without a `config` or `get_input_embeddings` of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = tiny_bert(hidden_size=24, num_hidden_layers=1)
        self.head = nn.Linear(24, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state.mean(1))


@pytest.mark.parametrize(
    ("router_input", "read"),
    [("embeddings", "encoder.embeddings"), (None, "encoder.embeddings.word_embeddings")],
)
def test_a_sample_router_inside_a_model_without_config(router_input: str | None, read: str):
    """The block's width comes from the block itself; by default the router reads the encoder's input
    embeddings (the model's own input is token ids)."""
    model = Pooled()
    settings = {
        "num_experts": 2,
        "rank": 2,
        "router": "sample",
        "router_input": router_input,
        "exclude": ["head"],
    }
    loramix.inject(model, settings)
    assert get_info(model).router_input == read
    assert get_info(model).model_router.network[1].in_features == 24
    with loramix.routing(model) as state:
        model(torch.randint(0, 99, (3, 5)))
    assert state.model_gate.weights.shape == (3, 2)
