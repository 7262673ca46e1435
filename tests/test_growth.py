"""Growth in place: experts and task slots added to banks, routers and heads; old tasks unchanged; the saved config
records the new sizes and a grown model saves and loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loramix
from loramix.errors import ConfigError
from loramix.heads import TaskHeads
from loramix.inject import get_info
from tests.models import randomize_adapters, text_inputs, tiny_bert


def outputs(model: torch.nn.Module, task_ids: list[int]) -> torch.Tensor:
    inputs = text_inputs(len(task_ids))
    with torch.no_grad(), loramix.routing(model, task_ids=torch.tensor(task_ids)):
        return model(**inputs).last_hidden_state


def test_grow_adds_experts_and_tasks_and_keeps_old_tasks_exact(tmp_path: Path) -> None:
    model = tiny_bert()
    loramix.inject(model, {"num_experts": 2, "num_tasks": 2, "router": "task", "targets": ["query", "value"]})
    randomize_adapters(model)
    layer = get_info(model).layers[0]
    layer.experts.freeze_experts([1])
    before = outputs(model, [0, 1, 1, 0])
    A_before = layer.experts.A.detach().clone()
    loramix.grow(model, num_experts=4, num_tasks=4)
    assert get_info(model).config.num_experts == 4 and get_info(model).config.num_tasks == 4
    assert layer.experts.A.shape[0] == 4 and torch.equal(layer.experts.A[:2], A_before)
    assert layer.experts.frozen_experts == [1]
    assert torch.equal(outputs(model, [0, 1, 1, 0]), before)
    base = tiny_bert()
    with torch.no_grad():
        plain = base(**text_inputs(2)).last_hidden_state
    assert torch.equal(outputs(model, [2, 3]), plain)  # new experts add nothing until trained
    loramix.save(model, tmp_path / "grown")
    loaded = loramix.load(tiny_bert(), tmp_path / "grown")
    assert get_info(loaded).config.num_experts == 4
    assert get_info(loaded).layers[0].experts.frozen_experts == [1]
    for tasks in ([0, 1, 2, 3], [3, 3, 0, 1]):
        assert torch.equal(outputs(loaded, tasks), outputs(model, tasks))


def test_a_plain_lora_grows_into_a_routed_bank_whose_expert_zero_is_the_old_adapter() -> None:
    model = tiny_bert()
    loramix.inject(model, {"num_experts": 1, "router": "none", "targets": ["query"]})
    randomize_adapters(model)
    with torch.no_grad():
        before = model(**text_inputs(3)).last_hidden_state
    loramix.grow(model, num_experts=3, num_tasks=3, router="task")
    assert get_info(model).config.router == "task"
    assert torch.equal(outputs(model, [0, 0, 0]), before)


def test_grow_refuses_to_shrink_or_to_change_a_router() -> None:
    model = tiny_bert()
    loramix.inject(model, {"num_experts": 2, "num_tasks": 2, "router": "task", "targets": ["query"]})
    with pytest.raises(ConfigError, match="fewer"):
        loramix.grow(model, num_experts=1)
    with pytest.raises(ConfigError, match="router 'none'"):
        loramix.grow(model, num_experts=3, router="poly")
    with pytest.raises(ConfigError, match="task_to_expert"):
        loramix.grow(model, num_experts=3, num_tasks=5)  # two new tasks, one new expert: say where they go


def test_task_to_expert_maps_new_tasks_onto_old_experts() -> None:
    model = tiny_bert()
    loramix.inject(model, {"num_experts": 2, "num_tasks": 2, "router": "task", "targets": ["query"]})
    randomize_adapters(model)
    loramix.grow(model, num_tasks=3, task_to_expert=[0, 1, 1])
    assert get_info(model).config.task_to_expert == [0, 1, 1]
    assert torch.equal(outputs(model, [2, 2]), outputs(model, [1, 1]))


def test_adding_a_task_head_leaves_the_other_heads_untouched() -> None:
    torch.manual_seed(0)
    heads = TaskHeads(8, [2, 3], [False, False])
    pooled = torch.randn(4, 8)
    batch = {"task_ids": torch.tensor([0, 1, 1, 0])}
    before = heads(pooled, batch).detach().clone()
    weight_before = heads.proj.weight.detach().clone()
    assert heads.add_task(4) == 2
    after = heads(pooled, batch)
    # the old rows are bit-identical (below); their outputs agree to rounding, since a BLAS may block a matrix
    # product with more output columns differently
    torch.testing.assert_close(after[:, :5], before, rtol=1e-6, atol=1e-6)
    assert torch.isinf(after[:, 5:]).all()  # the new task's columns are no old task's
    assert torch.equal(heads.proj.weight[:5], weight_before)
    new = heads(pooled[:1], {"task_ids": torch.tensor([2])})
    assert torch.isfinite(new[0, 5:]).all() and torch.isinf(new[0, :5]).all()
    labels = torch.tensor([3])
    assert torch.isfinite(heads.loss(new, {"labels": labels, "task_ids": torch.tensor([2])}))
