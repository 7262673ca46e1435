"""The routing context: task ids are required and checked, hooks always go away, the sample router pools only real
tokens, and the routing decisions are recorded."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import loramix
from loramix.context import masked_mean, single_task
from loramix.experts import linear, lora
from loramix.inject import get_info
from loramix.routers.gate import Gate
from tests.models import (
    BATCH,
    FEATURES,
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


def adapted_mlp(router: str, **overrides) -> torch.nn.Module:
    model = tiny_mlp()
    loramix.inject(model, adapter_config(router, **overrides))
    randomize_adapters(model)
    return model


def all_hooks(model: torch.nn.Module) -> list:
    return [
        hook
        for module in model.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for hook in hooks.values()
    ]


# ---- task ids -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["task", "poly"])
def test_missing_task_ids_is_a_routing_error(router: str) -> None:
    model = adapted_mlp(router)
    with pytest.raises(loramix.RoutingError, match="task_ids"):
        with loramix.routing(model):
            pass
    with pytest.raises(loramix.RoutingError, match="task_ids"):
        model(mlp_inputs())  # outside the context there is no silent default task


@pytest.mark.parametrize("router", ["task", "poly"])
@pytest.mark.parametrize(
    ("task_ids", "match"),
    [
        (torch.tensor([0, 1, 3, 0]), "0..2"),
        (torch.tensor([0, -1, 1, 0]), "0..2"),
        ([0, 1, 5, 2], "0..2"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), "integer"),
        (torch.tensor([[0, 1], [1, 0]]), "shape"),
    ],
    ids=["too-large", "negative", "list", "float", "2d"],
)
def test_bad_task_ids_are_routing_errors(router: str, task_ids, match: str) -> None:
    model = adapted_mlp(router, num_experts=3, num_tasks=3)
    with pytest.raises(loramix.RoutingError, match=match):
        with loramix.routing(model, task_ids=task_ids):
            model(mlp_inputs())
    assert all_hooks(model) == []


def test_task_ids_as_a_list_route_like_a_tensor() -> None:
    model = adapted_mlp("task").eval()
    x = mlp_inputs()
    with loramix.routing(model, task_ids=[2, 0, 1, 2]):
        from_list = model(x)
    with loramix.routing(model, task_ids=torch.tensor([2, 0, 1, 2])):
        from_tensor = model(x)
    assert torch.equal(from_list, from_tensor)


def test_task_ids_select_experts_per_sample() -> None:
    model = adapted_mlp("task").eval()
    x = mlp_inputs()
    mixed, _ = run(model, x, task_ids=torch.tensor([2, 0, 1, 2]))
    for row, task in enumerate([2, 0, 1, 2]):
        alone, _ = run(model, x, task_ids=torch.full((4,), task))
        torch.testing.assert_close(mixed[row], alone[row], atol=1e-6, rtol=0)
    other, _ = run(model, x, task_ids=torch.tensor([0, 0, 1, 2]))
    assert not torch.allclose(other[0], mixed[0], atol=1e-4)


def _spy_one_expert(chosen: list[int], real, A, B, expert: int):
    chosen.append(expert)
    return real(A, B, expert)


@pytest.mark.parametrize(
    ("experts", "share", "model_of"),
    [
        ("lora", "none", tiny_bert),
        ("lora", "A", tiny_bert),
        ("lora", "B", tiny_bert),
        ("lora", "none", partial(tiny_gpt2, dropout=0.0)),
        ("adapter", "none", tiny_bert),
    ],
)
def test_a_one_task_batch_runs_its_expert_alone_as_the_gathers_would(experts, share, model_of, monkeypatch):
    """Every sample of task 1 (expert 2 by task_to_expert): the layers slice that expert instead of gathering it
    per sample, with the same outputs and gradients as the gathered path (the reference, with the shortcut off)."""
    config = adapter_config("task", share, experts=experts, task_to_expert=[0, 2, 1], dropout=0.0)
    inputs = text_inputs()
    results = []
    for shortcut in (True, False):
        model = model_of(seed=0)
        loramix.inject(model, config)
        if experts == "lora":
            randomize_adapters(model)
        else:  # an adapter's up-projection starts at zero
            torch.manual_seed(2)
            for layer in get_info(model).layers:
                torch.nn.init.normal_(layer.experts.up, std=0.3)
        if not shortcut:
            monkeypatch.setattr(Gate, "single_expert", lambda gate: None)
        chosen: list[int] = []
        spy = partial(_spy_one_expert, chosen, lora.one_expert)
        monkeypatch.setattr(linear, "one_expert", spy)  # the fused layers' shortcut
        monkeypatch.setattr(lora, "one_expert", spy)  # the others'
        with loramix.routing(model, task_ids=torch.full((BATCH,), 1)) as state:
            out = call(model, inputs)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
        monkeypatch.undo()
        if shortcut:
            assert state.one_task == 1 and state.model_gate.expert == 2
            assert chosen == ([] if experts == "adapter" else [2] * len(get_info(model).layers))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
        if name.endswith((".B", ".up")) and share != "B":  # only expert 2 learns
            assert grads[name][2].abs().sum() > 0 and grads[name][[0, 1]].abs().sum() == 0


def test_one_task_is_known_only_for_equal_ids_on_the_host_and_without_kept_samples() -> None:
    model = adapted_mlp("task").eval()
    x = mlp_inputs()
    assert single_task(torch.tensor([1, 1, 1])) == 1 and single_task(torch.tensor([1, 0, 1])) is None
    assert single_task(torch.tensor([], dtype=torch.long)) is None
    assert single_task(torch.tensor([2, 2], device="meta")) is None
    with loramix.routing(model, task_ids=torch.tensor([2, 0, 2, 2])) as state:
        assert state.one_task is None and state.model_gate.expert is None
    with loramix.routing(model, task_ids=[2, 2, 2, 2], keep_base=[False, True, False, False]) as state:
        kept = model(x)
        assert state.model_gate.expert == 2 and state.model_gate.single_expert() is None
    with loramix.disabled(model):
        base = model(x)
    assert torch.equal(kept[1], base[1])


# ---- hooks and open blocks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["none", "task", "poly", "token", "sample"])
def test_hooks_are_removed_after_the_block(router: str) -> None:
    model = adapted_mlp(router)
    layers = get_info(model).layers
    task_ids = torch.arange(4) % 2
    with loramix.routing(model, task_ids=task_ids) as state:
        assert all(layer.open_routing() is state for layer in layers)  # every layer reads the open block
        model(mlp_inputs())
    assert all(layer.open_routing() is None for layer in layers)
    assert all_hooks(model) == []


@pytest.mark.parametrize("router", ["task", "sample"])
def test_hooks_are_removed_when_the_block_raises(router: str) -> None:
    model = adapted_mlp(router)
    layers = get_info(model).layers
    with pytest.raises(KeyError, match="boom"):
        with loramix.routing(model, task_ids=torch.arange(4) % 3) as state:
            assert all(layer.open_routing() is state for layer in layers)
            model(mlp_inputs())
            raise KeyError("boom")
    assert all(layer.open_routing() is None for layer in layers)
    assert all_hooks(model) == []
    # a forward that fails inside the model (inputs of the wrong width) cleans up too
    with pytest.raises(RuntimeError):
        with loramix.routing(model, task_ids=torch.arange(4) % 3):
            model(mlp_inputs()[..., :4])
    assert all_hooks(model) == []


def test_sample_router_hooks_on_bert_embeddings_are_removed() -> None:
    model = tiny_bert()
    loramix.inject(model, adapter_config("sample", targets=["query", "value"]))
    embeddings = model.get_input_embeddings()
    inputs = text_inputs()
    with pytest.raises(RuntimeError, match="stop"):
        with loramix.routing(model, attention_mask=inputs["attention_mask"]):
            assert embeddings._forward_hooks
            call(model, inputs)
            raise RuntimeError("stop")
    assert all_hooks(model) == []


# ---- the sample router's pooling ------------------------------------------------------------------------------


def bert_gate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], *, mask: bool = True) -> torch.Tensor:
    with loramix.routing(model, attention_mask=inputs["attention_mask"] if mask else None) as state:
        call(model, inputs)
    assert state.model_gate is not None
    return state.model_gate.weights


def test_sample_router_on_bert_ignores_padding() -> None:
    model = tiny_bert()
    loramix.inject(model, adapter_config("sample", targets=["query", "value"]))
    inputs = text_inputs()
    mask = inputs["attention_mask"]
    assert (mask == 0).any()
    gate = bert_gate(model, inputs)

    repadded = dict(
        inputs, input_ids=torch.where(mask.bool(), inputs["input_ids"], (inputs["input_ids"] + 7) % 99)
    )
    assert not torch.equal(repadded["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(bert_gate(model, repadded), gate, atol=1e-6, rtol=0)

    # without a mask given to the block, the model call's own `attention_mask` serves
    torch.testing.assert_close(bert_gate(model, repadded, mask=False), gate, atol=1e-6, rtol=0)
    # the mask is what makes the difference: a call without one counts the padded tokens
    unmasked, unmasked_repadded = (
        {k: v for k, v in batch.items() if k != "attention_mask"} for batch in (inputs, repadded)
    )
    assert not torch.allclose(
        bert_gate(model, unmasked_repadded, mask=False), bert_gate(model, unmasked, mask=False)
    )
    # and a real token does change the gate
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][1, 0] = (changed["input_ids"][1, 0] + 7) % 99
    changed_gate = bert_gate(model, changed)
    assert not torch.allclose(changed_gate[1], gate[1])
    torch.testing.assert_close(changed_gate[0], gate[0], atol=1e-6, rtol=0)


def test_sample_router_pools_the_embeddings() -> None:
    model = tiny_bert()
    loramix.inject(model, adapter_config("sample", targets=["query"]))
    inputs = text_inputs()
    gate = bert_gate(model, inputs)
    router = get_info(model).model_router
    embedded = model.get_input_embeddings()(inputs["input_ids"])
    torch.testing.assert_close(gate, router(None, masked_mean(embedded, inputs["attention_mask"])).weights)


def test_sample_router_on_a_cnn_pools_over_space() -> None:
    model = tiny_cnn()
    loramix.inject(model, adapter_config("sample", targets=["conv1", "conv2"]))
    x = cnn_inputs()
    with loramix.routing(model) as state:
        out = model(x)
    assert out.shape == (4, 4)
    router = get_info(model).model_router
    torch.testing.assert_close(state.model_gate.weights, router(None, x.mean((2, 3))).weights)


def test_masked_mean() -> None:
    hidden = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    want = torch.stack([hidden[0, :2].mean(0), hidden[1, 0]])
    torch.testing.assert_close(masked_mean(hidden, mask), want)
    torch.testing.assert_close(masked_mean(hidden, None), hidden.mean(1))
    assert torch.equal(masked_mean(hidden[:, 0], mask), hidden[:, 0])
    images = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(masked_mean(images, None), images.mean((2, 3)))
    all_padding = masked_mean(hidden, torch.zeros(2, 3))
    assert torch.isfinite(all_padding).all()


# ---- records --------------------------------------------------------------------------------------------------


def test_records_hold_each_routing_decision() -> None:
    model = adapted_mlp("token")
    names = get_info(model).names
    _, state = run(model, mlp_inputs())
    assert [name for name, _ in state.records] == names
    assert all(gate.weights.shape == (4, 5, 3) for gate in state.gates())
    with loramix.routing(model, record=False) as state:
        model(mlp_inputs())
    assert state.records == []


def test_model_router_runs_once_per_forward() -> None:
    model = adapted_mlp("sample")
    _, state = run(model, mlp_inputs())
    assert [name for name, _ in state.records] == ["model"]
    assert state.model_gate is state.records[0][1]


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_gates_in_a_model_keep_k_experts(k: int) -> None:
    model = adapted_mlp("token", top_k=k)
    _, state = run(model, mlp_inputs())
    assert len(state.records) == 3
    for gate in state.gates():
        assert ((gate.weights != 0).sum(-1) == k).all()


@pytest.mark.parametrize("router", ["none", "task", "sample", "token", "poly"])
def test_an_empty_batch_gives_the_base_model_s_empty_output(router: str) -> None:
    model = adapted_mlp(router)
    for shape in ((0, 3, FEATURES), (0, FEATURES)):
        x = torch.randn(*shape)
        task_ids = torch.zeros(0, dtype=torch.long) if router in ("task", "poly") else None
        with loramix.routing(model, task_ids=task_ids):
            out = model(x)
        assert out.shape == (*shape[:-1], 4)


def test_a_model_wide_router_whose_input_runs_too_late_says_so() -> None:
    """Outside a routing block: call it inside one. Inside one, with router_input after the adapted layers: say that
    the router's input must come first."""
    from tests.models import mlp_inputs, tiny_mlp

    model = tiny_mlp()
    loramix.inject(model, {"router": "sample", "num_experts": 2, "targets": ["fc1"], "router_input": "fc2"})
    with pytest.raises(loramix.RoutingError, match="call the model inside loramix.routing"):
        model(mlp_inputs())
    with pytest.raises(
        loramix.RoutingError, match=r"ran before the model-wide router decided: its input \(router_input\)"
    ):
        with loramix.routing(model):
            model(mlp_inputs())


# ---- weights over the tasks -------------------------------------------------------------------------------------


def adapted_linear() -> torch.nn.Module:
    """One adapted linear layer and nothing else, so that its output is linear in the experts' mixture."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 6))
    loramix.inject(model, adapter_config("task", targets=["0"]))
    randomize_adapters(model)
    return model.eval()


def test_task_weights_mix_the_tasks_experts_in_each_layer() -> None:
    model, x = adapted_linear(), mlp_inputs()
    task_ids = torch.tensor([0, 1, 2, 0])
    weights = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    with loramix.routing(model, task_ids=task_ids, task_weights=weights) as state:
        mixed = model(x)
    assert not state.records[0][1].hard
    by_task = [model_on(model, x, torch.full((4,), t)) for t in range(3)]
    for row in range(4):
        expected = sum(w * by_task[t][row] for t, w in enumerate(weights[row].tolist()))
        if row == 1:  # a row of zeros: its own task's expert
            expected = by_task[1][row]
        torch.testing.assert_close(mixed[row], expected, atol=1e-5, rtol=0)


def test_task_weights_of_one_task_each_give_the_hard_gate_bit_for_bit() -> None:
    model, x = adapted_linear(), mlp_inputs()
    task_ids = torch.tensor([0, 1, 2, 0])
    weights = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    with loramix.routing(model, task_ids=task_ids, task_weights=weights) as state:
        out = model(x)
    assert state.records[0][1].hard
    assert torch.equal(out, model_on(model, x, torch.tensor([1, 1, 2, 0])))


def test_task_weights_leave_kept_samples_on_the_base_bit_for_bit() -> None:
    model, x = adapted_linear(), mlp_inputs()
    weights = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    keep = torch.tensor([True, False, True, False])
    zeros = torch.zeros(4, dtype=torch.long)
    with loramix.routing(model, task_ids=zeros, task_weights=weights, keep_base=keep):
        out = model(x)
    with loramix.routing(model, task_ids=zeros, keep_base=torch.ones(4, dtype=torch.bool)):
        base = model(x)
    assert torch.equal(out[keep], base[keep])
    assert not torch.allclose(out[~keep], base[~keep], atol=1e-4)


def test_task_weights_need_router_task_and_one_row_per_sample() -> None:
    model = adapted_mlp("poly")
    with pytest.raises(loramix.RoutingError, match="task_weights.*'poly'"):
        with loramix.routing(model, task_ids=torch.zeros(4, dtype=torch.long), task_weights=torch.ones(4, 2)):
            pass
    model = adapted_linear()
    with pytest.raises(loramix.RoutingError, match=r"task_weights must have shape .*\(4, 3\), got \(4, 4\)"):
        with loramix.routing(model, task_ids=torch.zeros(4, dtype=torch.long), task_weights=torch.ones(4, 4)):
            pass
    with pytest.raises(loramix.RoutingError, match=r"task_weights must have shape .*\(4, 3\), got \(3, 3\)"):
        with loramix.routing(model, task_ids=torch.zeros(4, dtype=torch.long), task_weights=torch.ones(3, 3)):
            pass
    assert all_hooks(model) == []


def model_on(model: torch.nn.Module, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    with loramix.routing(model, task_ids=task_ids):
        return model(x)
