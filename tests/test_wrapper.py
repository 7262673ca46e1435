"""LoramixModel: routing side inputs as forward keyword arguments, so `model(**batch)` and `generate()` route.

Generation itself (mixed-task batches, the hand-written greedy reference) is tested in `tests/test_generate.py`.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import loramix
from loramix import InjectionError, LoramixModel, RoutingError
from loramix.inject import adapter_state
from tests.io import toys

TASK_IDS = torch.tensor([0, 1])


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return toys.tiny_gpt2()


def adapted_gpt2(router: str) -> nn.Module:
    model = tiny_gpt2()
    settings = {"num_tasks": 2} if router in ("task", "poly") else {}
    loramix.inject(
        model, {"num_experts": 2, "rank": 4, "router": router, "targets": ["c_attn", "c_proj"], **settings}
    )
    with torch.no_grad():
        for param in adapter_state(model).values():
            param.normal_(std=0.5)
    return model.eval()


def prompt(length: int = 5) -> Tensor:
    return torch.randint(0, 99, (2, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("router", ["task", "poly"])
def test_forward_with_task_ids_equals_routing_context(router: str) -> None:
    model = adapted_gpt2(router)
    wrapped = LoramixModel(model)
    ids = prompt()
    with torch.no_grad():
        with loramix.routing(model, task_ids=TASK_IDS):
            expected = model(input_ids=ids).logits
        with loramix.routing(model, task_ids=TASK_IDS.flip(0)):
            swapped = model(input_ids=ids).logits
        got = wrapped(input_ids=ids, task_ids=TASK_IDS).logits
        positional = wrapped(ids, task_ids=TASK_IDS).logits
    assert torch.equal(got, expected)
    assert torch.equal(positional, expected)
    assert not torch.allclose(got, swapped, atol=1e-3)


def test_forward_passes_the_attention_mask_to_the_sample_router() -> None:
    model = adapted_gpt2("sample")
    wrapped = LoramixModel(model)
    ids = prompt()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    with torch.no_grad():
        with loramix.routing(model, attention_mask=mask):
            expected = model(input_ids=ids, attention_mask=mask).logits
        with loramix.routing(model):  # a block without a mask pools with the model call's own
            from_call = model(input_ids=ids, attention_mask=mask).logits
        with loramix.routing(model, attention_mask=torch.ones_like(mask)):
            unmasked = model(input_ids=ids, attention_mask=mask).logits
        got = wrapped(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected) and torch.equal(from_call, expected)
    assert not torch.allclose(got[1], unmasked[1], atol=1e-4)


def test_the_wrapped_model_inside_a_routing_block_routes_by_that_block_s_task_ids() -> None:
    model = adapted_gpt2("task")
    wrapped = LoramixModel(model)
    ids = prompt()
    with torch.no_grad():
        expected = wrapped(input_ids=ids, task_ids=TASK_IDS).logits
        with loramix.routing(model, task_ids=TASK_IDS):
            assert torch.equal(wrapped(input_ids=ids).logits, expected)
            out = wrapped.generate(input_ids=ids, max_new_tokens=2, do_sample=False, num_beams=2)
    assert torch.equal(
        out,
        wrapped.generate(input_ids=ids, task_ids=TASK_IDS, max_new_tokens=2, do_sample=False, num_beams=2),
    )


def test_the_wrapped_model_inside_a_routing_block_records_its_gates_there() -> None:
    # a trainer opens the block to read the router's gates for its losses; the wrapper adds no block of its own
    model = adapted_gpt2("sample")
    wrapped = LoramixModel(model)
    ids = prompt()
    with loramix.routing(model) as state:
        logits = wrapped(input_ids=ids).logits
    assert state.model_gate is not None and state.model_gate.weights.shape == (2, 2)
    with torch.no_grad():
        assert torch.equal(logits, wrapped(input_ids=ids).logits)


def test_missing_task_ids_raise_routing_error() -> None:
    wrapped = LoramixModel(adapted_gpt2("task"))
    with pytest.raises(RoutingError, match="task_ids"):
        wrapped(input_ids=prompt())
    with pytest.raises(RoutingError, match="task_ids"):
        wrapped.generate(input_ids=prompt(), max_new_tokens=1, do_sample=False)
    with pytest.raises(RoutingError, match="0..1"):
        wrapped(input_ids=prompt(), task_ids=torch.tensor([0, 2]))


def test_wrapping_a_model_without_adapters_fails() -> None:
    with pytest.raises(InjectionError, match="inject"):
        LoramixModel(tiny_gpt2())


def test_attributes_fall_through_to_the_model() -> None:
    model = adapted_gpt2("task")
    wrapped = LoramixModel(model)
    assert wrapped.config is model.config
    assert wrapped.config.n_embd == 32
    assert wrapped.device == model.device
    assert wrapped.model is model
    assert wrapped.get_output_embeddings() is model.lm_head
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute  # noqa: B018
    assert all(name.startswith("model.") for name in wrapped.state_dict())


def test_wrapped_model_trains_only_the_experts() -> None:
    wrapped = LoramixModel(adapted_gpt2("task")).train()
    ids = prompt()
    wrapped(input_ids=ids, labels=ids, task_ids=TASK_IDS).loss.backward()
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".experts." in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


@pytest.mark.parametrize("router", ["sample", "token", "task"])
def test_training_a_learned_router_through_the_wrapper_alone_warns_once_that_no_aux_loss_is_added(
    router: str, recwarn: pytest.WarningsRecorder
) -> None:
    wrapped = LoramixModel(adapted_gpt2(router))
    ids = prompt()
    with torch.no_grad():
        wrapped(input_ids=ids, task_ids=TASK_IDS)  # evaluation: nothing to warn of
    wrapped.train()
    with loramix.routing(wrapped.model, task_ids=TASK_IDS):  # a block of the caller's, who adds what it wants
        wrapped(input_ids=ids, labels=ids).loss.backward()
    assert not [w for w in recwarn if "auxiliary loss" in str(w.message)]
    for _ in range(2):
        wrapped(input_ids=ids, labels=ids, task_ids=TASK_IDS).loss.backward()
    warned = [str(w.message) for w in recwarn if "auxiliary loss" in str(w.message)]
    assert len(warned) == (0 if router == "task" else 1)
    if warned:
        assert f"router '{router}'" in warned[0] and "LoramixTrainer" in warned[0]
