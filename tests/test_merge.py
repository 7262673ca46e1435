"""Merging (`loramix.merge`): one task's expert, or a fixed mixture, baked into plain layers equals routing to it,
and a refused merge leaves every layer as it was."""

from __future__ import annotations

import pytest
import torch

import loramix
from loramix.inject import get_info
from tests.models import (
    SHARES,
    adapted_names,
    adapter_config,
    call,
    cnn_inputs,
    mlp_inputs,
    randomize_adapters,
    run,
    text_inputs,
    tiny_cnn,
    tiny_gpt2,
    tiny_mlp,
)


@pytest.mark.parametrize("router", ["task", "poly"])
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn, tiny_gpt2], ids=["mlp", "cnn", "gpt2"])
def test_merge_and_unload_equals_routing_to_the_task(router: str, share: str, make) -> None:
    model = make().eval()
    if make is tiny_gpt2:
        inputs = {"input_ids": text_inputs()["input_ids"]}
    else:
        inputs = cnn_inputs() if make is tiny_cnn else mlp_inputs()
    targets = ["conv1", "conv2"] if make is tiny_cnn else "all-linear"
    loramix.inject(model, adapter_config(router, share=share, targets=targets))
    randomize_adapters(model)
    model.eval()
    routed, _ = run(model, inputs, task_ids=torch.full((4,), 1))
    other, _ = run(model, inputs, task_ids=torch.full((4,), 0))
    assert not torch.allclose(
        routed, other, atol=1e-4
    )  # the tasks differ, so the merged one is the right one
    plain = loramix.merge_and_unload(model, task=1)
    assert adapted_names(plain) == [] and not hasattr(plain, "_loramix_info")
    torch.testing.assert_close(call(plain, inputs), routed, atol=1e-5, rtol=0)


def test_merge_and_unload_checks_its_task() -> None:
    model = tiny_mlp()
    loramix.inject(model, adapter_config("task"))
    with pytest.raises(loramix.InjectionError, match="task"):
        loramix.merge_and_unload(model, task=3)
    model = tiny_mlp()
    loramix.inject(model, adapter_config("sample"))
    with pytest.raises(loramix.InjectionError, match="gate"):
        loramix.merge_and_unload(model, task=0)
    with pytest.raises(loramix.InjectionError, match="not a finite number"):
        loramix.merge_and_unload(model, gate=torch.tensor([float("nan"), 1.0, 0.0]))
    with pytest.raises(loramix.InjectionError, match="pass task or gate, not both"):
        loramix.merge_and_unload(model, task=0, gate=torch.tensor([0.0, 1.0, 0.0]))
    # a gate that names some layers only is refused before any layer merges: the model runs as before
    randomize_adapters(model)
    inputs = mlp_inputs()
    before, _ = run(model.eval(), inputs)
    first = get_info(model).names[0]
    with pytest.raises(loramix.InjectionError, match="no entry for layer"):
        loramix.merge_and_unload(model, gate={first: torch.ones(get_info(model).config.num_experts)})
    assert all(layer.merged_gate is None for layer in get_info(model).layers)
    torch.testing.assert_close(run(model, inputs)[0], before, atol=0, rtol=0)
