"""`torch.compile` on an injected model: every router traces into one graph (no graph break), in inference and in
training, without a recompilation when the next routing block brings other task ids; the compiled model's outputs
and gradients are the eager model's."""

from __future__ import annotations

import pytest
import torch

import loramix
from tests.models import ROUTERS, adapter_config, task_ids_for, text_inputs, tiny_bert

dynamo = pytest.importorskip("torch._dynamo")


def injected(router: str, train: bool) -> torch.nn.Module:
    model = tiny_bert()
    loramix.inject(model, adapter_config(router))
    with torch.no_grad():  # experts that change the output
        for layer in loramix.get_info(model).layers:
            layer.experts.B.normal_(std=0.1)
    return model.train(train)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_traces_into_one_graph(router: str, train: bool):
    model = injected(router, train)
    inputs = text_inputs()
    dynamo.reset()
    with torch.set_grad_enabled(train), loramix.routing(model, task_ids=task_ids_for(model, 4)):
        explained = dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("router", ["task", "sample"])
def test_a_compiled_training_step_equals_the_eager_one_and_compiles_once(router: str):
    model = injected(router, True)
    compiled = torch.compile(model, backend="aot_eager")  # autograd traced, no code generated
    weights = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(3))
    dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    for step in range(3):
        inputs = text_inputs(seed=step)
        task_ids = None if router == "sample" else torch.tensor([step % 3, 2, 1, 0])
        results = []
        for run in (model, compiled):
            with loramix.routing(model, task_ids=task_ids) as state:
                out = run(**inputs).last_hidden_state
            (out * weights).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            results.append((out.detach(), grads, len(state.records)))
        (eager, eager_grads, eager_records), (traced, traced_grads, traced_records) = results
        torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-5)
        assert eager_grads
        # an adapter whose output nothing reads (the pooler's): no gradient in eager, zeros from the traced graph
        for name in eager_grads.keys() | traced_grads.keys():
            grad = eager_grads.get(name, torch.zeros_like(traced_grads.get(name, torch.empty(0))))
            traced_grad = traced_grads.get(name, torch.zeros_like(grad))
            torch.testing.assert_close(traced_grad, grad, atol=1e-5, rtol=1e-4, msg=name)
        assert {n for n in traced_grads.keys() - eager_grads.keys() if not n.startswith("pooler.")} == set()
        assert traced_records == eager_records  # the gates the auxiliary losses read
    assert counters["stats"]["unique_graphs"] == 1  # other task ids and states: the same graph
