"""The tiny causal LMs built from configs: their special token ids and extra config keywords."""

from __future__ import annotations

import pytest

from loramix.tiny_lm import tiny_causal_lm


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_special_token_id_given_replaces_its_default(kind: str):
    model = tiny_causal_lm(kind, hidden_size=16, num_layers=1, num_heads=2)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 2, 3)
    model = tiny_causal_lm(kind, hidden_size=16, num_layers=1, num_heads=2, pad_token_id=None, eos_token_id=5)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (None, 2, 5)
