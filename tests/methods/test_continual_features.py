"""The auto-selector reading a block's input inside the pass, and the pass going on with expanded rows, on a decoder
(rotary position tables, a key-value cache) as on the encoders the continual tests train."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import loramix
from loramix.context import routing
from loramix.errors import ConfigError
from loramix.inject import adapter_state
from loramix.methods.continual.features import (
    _rows,
    base_hidden_states,
    routed_by_selector,
    selector_features,
)
from loramix.methods.continual.moe_adapters import MLP_OUTPUTS
from loramix.routers.selector import AutoSelector


def test_a_decoder_goes_on_with_the_expanded_rows_as_a_pass_over_them_would():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    backbone = LlamaModel(config).eval()
    loramix.inject(
        backbone, {"num_experts": 2, "rank": 4, "router": "task", "num_tasks": 2, "layers_to_transform": [2]}
    )
    with torch.no_grad():  # experts far from zero, so that a row on the wrong route or input shows
        for param in adapter_state(backbone).values():
            param.add_(torch.randn(param.shape))
    selector = AutoSelector(config.hidden_size + 3)
    for _ in range(2):
        texts = {
            "input_ids": torch.randint(0, 64, (40, 6)),
            "attention_mask": torch.ones(40, 6, dtype=torch.long),
        }
        selector.add_task(selector_features(backbone, texts, "hidden", layer=1))
    n = 6  # as many inputs as tokens: a per-token vector has the batch's length
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[0, 4:] = 0
    batch = {"input_ids": torch.randint(0, 64, (n, 6)), "attention_mask": mask}
    rows, routes = torch.arange(n).repeat_interleave(2), torch.tensor([0, 1] * n)
    keep = torch.arange(2 * n) % 4 == 3  # some rows on the base
    seen: list[int] = []
    hook = backbone.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True,
    )
    with torch.no_grad():
        with routed_by_selector(backbone, batch, selector, [1], lambda *_: (rows, routes, keep)) as chosen:
            hidden = backbone(**batch).last_hidden_state
        hook.remove()
        with routing(backbone, task_ids=routes, attention_mask=mask[rows], keep_base=keep):
            expected = backbone(
                input_ids=batch["input_ids"][rows], attention_mask=mask[rows]
            ).last_hidden_state
    assert seen == [n] and torch.equal(chosen["rows"], rows)  # block 0 ran once per input
    assert hidden.shape == (2 * n, 6, config.hidden_size)
    torch.testing.assert_close(hidden, expected)


def test_only_per_input_tensors_are_taken_row_by_row():
    rows, n = torch.tensor([0, 0, 2]), 3
    states, positions, table = torch.randn(n, 4, 2), torch.arange(n), torch.randn(1, 4, 2)
    taken = _rows(
        ((states,), {"cache_position": positions, "rotary": (table, states), "flag": True}), rows, n
    )
    (state_rows,), kwargs = taken
    assert torch.equal(state_rows, states[rows]) and torch.equal(kwargs["rotary"][1], states[rows])
    assert kwargs["cache_position"] is positions and kwargs["rotary"][0] is table and kwargs["flag"] is True


def test_the_base_feature_skips_the_experts_and_equals_a_pass_that_keeps_every_input_on_the_base():
    """The selector's base pass switches the adapted layers off (`loramix.disabled`): no router or expert runs, and each
    block's state is the one a pass keeping every input on the base inside a routing block gives, bit for bit (with
    the experts far from zero, so that a state that went through them would show)."""
    torch.manual_seed(0)
    ran: list[int] = []
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    for experts in ({"experts": "adapter", "target_regex": MLP_OUTPUTS}, {"targets": ["query", "value"]}):
        backbone = BertModel(config).eval()
        loramix.inject(
            backbone,
            {**experts, "num_experts": 4, "rank": 4, "router": "per-task", "num_tasks": 2, "top_k": 2},
        )
        with torch.no_grad():
            for param in adapter_state(backbone).values():
                param.add_(torch.randn(param.shape))
        mask = torch.ones(5, 7, dtype=torch.long)
        mask[1, 3:] = 0
        inputs = {"input_ids": torch.randint(0, 64, (5, 7)), "attention_mask": mask}
        ran.clear()
        hooks = [  # LoRA experts run inside the layer's fused op: their router shows the pass reached them
            part.register_forward_pre_hook(lambda module, args: ran.append(1))
            for layer in loramix.get_info(backbone).layers
            for part in (layer.experts, layer.router)
        ]
        states = base_hidden_states(backbone, inputs, [1, 2, None])
        assert not ran
        keep = torch.ones(5, dtype=torch.bool)
        with torch.no_grad(), routing(backbone, task_ids=torch.zeros(5, dtype=torch.long), keep_base=keep):
            reference = backbone(**inputs, output_hidden_states=True)
        assert ran  # the reference pass ran them, with every input kept on the base
        for state, expected in zip(states, (*reference.hidden_states[1:3], reference.last_hidden_state)):
            assert torch.equal(state, expected)
        for hook in hooks:
            hook.remove()


def test_a_cut_pass_reads_each_input_s_first_tokens_after_the_embeddings_and_the_rest_of_the_whole_input():
    """`tokens` k: the states entering later blocks are a pass over the first k tokens alone, pooled over the real
    ones among them; block 0's state (the embeddings' output) and the token statistics read the whole input."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    backbone = BertModel(config).eval()
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 3:] = 0  # shorter than the cut: its padding stays out of the pool
    mask[2, 6:] = 0
    batch = {"input_ids": torch.randint(0, 64, (4, 9)), "attention_mask": mask}
    batch["token_type_ids"] = (torch.arange(9) >= 5).long().expand(4, 9) * mask
    width = config.hidden_size
    cut = selector_features(backbone, batch, "hidden", 0, accept_layer=2, tokens=5)
    whole = selector_features(backbone, batch, "hidden", 0, accept_layer=2)
    first = {key: value[:, :5] for key, value in batch.items()}
    torch.testing.assert_close(cut[:, :width], whole[:, :width])  # block 0, whole input
    torch.testing.assert_close(cut[:, -3:], whole[:, -3:])  # the statistics, whole input
    torch.testing.assert_close(
        cut[:, width:-3], selector_features(backbone, first, "hidden", 2)[:, :width]
    )  # block 2 over the first five tokens
    assert not torch.allclose(cut[:, width:-3], whole[:, width:-3])
    assert torch.equal(selector_features(backbone, batch, "hidden", 0, accept_layer=2, tokens=9), whole)
    left = {**batch, "attention_mask": mask.flip(1)}
    with pytest.raises(ConfigError, match="ddas_tokens: .*padded on the right"):
        selector_features(backbone, left, "hidden", 2, tokens=5)


def test_a_bfloat16_pass_runs_the_blocks_in_bfloat16_and_keeps_the_features_close_to_float32():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    backbone = BertModel(config).eval()
    loramix.inject(backbone, {"num_experts": 2, "rank": 4, "router": "task", "num_tasks": 2})
    batch = {"input_ids": torch.randint(0, 64, (6, 7)), "attention_mask": torch.ones(6, 7, dtype=torch.long)}
    seen: list[torch.dtype] = []
    hook = backbone.encoder.layer[1].attention.self.query.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    low = selector_features(backbone, batch, "hidden", 0, accept_layer=2, precision="bfloat16")
    high = selector_features(backbone, batch, "hidden", 0, accept_layer=2)
    hook.remove()
    assert seen == [torch.bfloat16, torch.float32] and low.dtype == torch.float32
    assert not torch.equal(low, high)
    torch.testing.assert_close(low, high, atol=2e-2, rtol=0)
    assert torch.nn.functional.cosine_similarity(low, high).min() > 0.999
