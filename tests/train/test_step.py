"""The step routes the adapters by `route_ids` when a batch has them (ELREA's cluster experts), by task otherwise;
the heads always read the task ids."""

from __future__ import annotations

import torch

import loramix
from loramix.heads import TaskHeads
from loramix.train.model import MultiTaskModel
from loramix.train.step import forward_routed
from tests.models import randomize_adapters, text_inputs, tiny_bert


def test_route_ids_choose_the_experts_and_task_ids_the_heads():
    backbone = tiny_bert()
    loramix.inject(backbone, {"num_experts": 3, "router": "task", "num_tasks": 3, "rank": 2})
    randomize_adapters(backbone)
    model = MultiTaskModel(backbone, TaskHeads(32, [2, 3, 2])).eval()
    batch = {**text_inputs(4), "task_ids": torch.tensor([0, 1, 2, 0])}
    routes = torch.tensor([2, 2, 0, 1])

    with torch.no_grad():
        by_route, _ = forward_routed(model, {**batch, "route_ids": routes})
        by_task, _ = forward_routed(model, batch)
        with loramix.routing(backbone, task_ids=routes, attention_mask=batch["attention_mask"]):
            expected = model(batch)
    assert torch.equal(by_route, expected)
    assert not torch.allclose(by_route, by_task)
    assert torch.equal(torch.isinf(by_route), torch.isinf(by_task))  # the same task's head columns


def test_a_batch_with_keep_base_sends_those_samples_to_the_base_model_bit_for_bit():
    """One batched forward through the fused Linear path: kept samples equal the plain base model's output."""
    plain = tiny_bert()
    backbone = tiny_bert()
    loramix.inject(backbone, {"num_experts": 3, "router": "task", "num_tasks": 3, "rank": 2})
    randomize_adapters(backbone)
    inputs = text_inputs(4)
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        base = plain(**inputs).last_hidden_state
        with loramix.routing(backbone, task_ids=torch.tensor([0, 1, 2, 1]), keep_base=keep):
            mixed = backbone(**inputs).last_hidden_state
    assert torch.equal(mixed[keep], base[keep])
    assert not torch.allclose(mixed[~keep], base[~keep])


def test_route_ids_given_on_the_host_route_as_the_batch_s_and_name_a_one_task_batch():
    """`routed(model, batch, host_ids)` routes by the host's copy of the batch's ids (the batch's own are not read:
    here they are on the meta device, which no value can be read from), and knows a one-task batch as one."""
    from loramix.train.step import routed

    backbone = tiny_bert()
    loramix.inject(backbone, {"num_experts": 3, "router": "task", "num_tasks": 3, "rank": 2})
    randomize_adapters(backbone)
    model = MultiTaskModel(backbone, TaskHeads(32, [2, 3, 2])).eval()
    inputs = text_inputs(4)
    host = torch.tensor([1, 1, 1, 1])
    with torch.no_grad():
        with routed(model, {**inputs, "task_ids": host.to("meta")}, host) as state:
            out = backbone(**inputs).last_hidden_state
        with loramix.routing(backbone, task_ids=host):
            expected = backbone(**inputs).last_hidden_state
    assert state.one_task == 1 and torch.equal(out, expected)
