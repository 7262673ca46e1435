"""Generation with `LoramixModel.generate`: a mixed-task batch routes each row by its own task in one batched pass
per step, exactly as each row generated alone, and exactly as the routed forward pass run step by step without a
cache; the sample router decides once, on the prompt, and so does a per-task router from a left-padded prompt's first
real token.

Tiny GPT-2 (Conv1D layers) and Llama (nn.Linear, grouped-query attention, rotary positions) from
`loramix.tiny_lm`, with the character tokenizer and left-padded prompts of different lengths.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import loramix
from loramix import LoramixModel
from loramix.tiny_lm import char_tokenizer, tiny_causal_lm
from tests.models import randomize_adapters

NUM_TASKS = 3
STEPS = 6
PROMPTS = ["Translate: cat", "2+2=", "Hello, world", "q?", "The quick brown fox", "ab"]
TASK_IDS = torch.tensor([0, 1, 2, 1, 0, 2])
KINDS = ["gpt2", "llama"]
ROUTERS = ["task", "sample", "per-task"]  # by task id; by the pooled prompt; by each layer's first real token

# A next-token function for the hand-written loop: (ids, attention_mask, position_ids) -> logits (n, t, vocab).
NextLogits = Callable[[Tensor, Tensor, Tensor], Tensor]


def adapted_lm(kind: str, router: str) -> nn.Module:
    """A tiny causal LM with rank-4 experts on every linear layer, B random so that every expert changes it."""
    model = tiny_causal_lm(kind, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    settings = {
        "task": {"num_tasks": NUM_TASKS},
        "sample": {"router_hidden": 8},
        "per-task": {"num_tasks": NUM_TASKS, "top_k": 2},
    }[router]
    loramix.inject(
        model,
        loramix.AdapterConfig(router=router, num_experts=NUM_TASKS, rank=4, targets="all-linear", **settings),
    )
    randomize_adapters(model, std=0.5)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in loramix.get_info(model).layers:
            if router == "per-task":  # routers that tell tokens apart, so that reading the wrong one shows
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator))
    return model.eval()


def left_padded(texts: list[str]) -> dict[str, Tensor]:
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def generate(
    model: nn.Module, inputs: dict[str, Tensor], task_ids: Tensor | None, steps: int = STEPS
) -> Tensor:
    """Greedy generation of exactly `steps` new tokens (EOS suppressed until then); returns only the new ones."""
    out = LoramixModel(model).generate(
        **inputs,
        task_ids=task_ids,
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
        pad_token_id=0,
    )
    return out[:, inputs["input_ids"].shape[1] :]


def greedy(
    next_logits: NextLogits, ids: Tensor, mask: Tensor, steps: int, eos_token_id: int | None = None
) -> Tensor:
    """Greedy decoding by hand, without a cache: the reference that `generate` must reproduce. Positions count
    only real tokens (as `generate` derives them from a left-padded mask); EOS is never chosen (as `generate` with
    `min_new_tokens = steps`). Returns the new tokens `(n, steps)`."""
    start = ids.shape[1]
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = next_logits(ids, mask, positions)[:, -1]  # (n, vocab)
        if eos_token_id is not None:
            logits[:, eos_token_id] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, start:]


def routed_forward(model: nn.Module, task_ids: Tensor | None, prompt_mask: Tensor) -> NextLogits:
    """The routed forward pass on the whole sequence so far; the sample router pools the prompt only, as in
    generation (its gate is decided on the prompt and kept)."""
    prompt_gate = None

    def next_logits(ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        nonlocal prompt_gate
        with loramix.routing(model, task_ids=task_ids, attention_mask=prompt_mask) as state:
            if prompt_gate is not None:
                state.model_gate, state.keep_model_gate = prompt_gate, True
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        prompt_gate = state.model_gate
        return logits

    return next_logits


def task_ids_for(router: str) -> Tensor | None:
    return None if router == "sample" else TASK_IDS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("router", ROUTERS)
def test_mixed_batch_equals_each_row_alone(kind: str, router: str) -> None:
    model = adapted_lm(kind, router)
    task_ids = task_ids_for(router)
    batch = generate(model, left_padded(PROMPTS), task_ids)
    assert batch.shape == (len(PROMPTS), STEPS)
    for row, text in enumerate(PROMPTS):
        alone = generate(model, left_padded([text]), None if task_ids is None else task_ids[row : row + 1])
        assert torch.equal(batch[row], alone[0]), f"row {row} ({text!r})"


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_follows_its_own_task(kind: str) -> None:
    """The test above is not vacuous: the same prompts under other tasks continue differently."""
    model = adapted_lm(kind, "task")
    inputs = left_padded(PROMPTS)
    batch = generate(model, inputs, TASK_IDS)
    shifted = generate(model, inputs, (TASK_IDS + 1) % NUM_TASKS)
    assert (batch != shifted).any(dim=1).sum() >= len(PROMPTS) // 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("router", ROUTERS)
def test_generate_equals_routed_forward_without_cache(kind: str, router: str) -> None:
    model = adapted_lm(kind, router)
    inputs = left_padded(PROMPTS)
    task_ids = task_ids_for(router)
    generated = generate(model, inputs, task_ids)
    again = generate(model, inputs, task_ids)
    reference = greedy(
        routed_forward(model, task_ids, inputs["attention_mask"]),
        inputs["input_ids"],
        inputs["attention_mask"],
        STEPS,
        eos_token_id=model.config.eos_token_id,
    )
    assert torch.equal(generated, again)
    assert torch.equal(generated, reference)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_router_decides_once_on_the_prompt(kind: str) -> None:
    model = adapted_lm(kind, "sample")
    router = loramix.get_info(model).model_router
    decided: list[Tensor] = []
    handle = router.register_forward_hook(lambda module, args, gate: decided.append(gate.weights))
    inputs = left_padded(PROMPTS)
    try:
        generate(model, inputs, None)
    finally:
        handle.remove()
    assert len(decided) == 1  # once, for the whole generation
    assert decided[0].shape == (len(PROMPTS), NUM_TASKS)

    with torch.no_grad(), loramix.routing(model, attention_mask=inputs["attention_mask"]) as state:
        model(**inputs)
    assert torch.equal(decided[0], state.model_gate.weights)  # the gate of a forward on the prompt alone
    for row, text in enumerate(PROMPTS):  # padding does not move a row's gate
        alone = left_padded([text])
        with torch.no_grad(), loramix.routing(model, attention_mask=alone["attention_mask"]) as state:
            model(**alone)
        torch.testing.assert_close(decided[0][row], state.model_gate.weights[0])


def test_beam_search_repeats_task_ids_per_beam() -> None:
    model = adapted_lm("gpt2", "task")
    wrapped = LoramixModel(model)
    settings = {
        "do_sample": False,
        "max_new_tokens": 3,
        "min_new_tokens": 3,
        "num_beams": 2,
        "pad_token_id": 0,
    }
    inputs = left_padded(PROMPTS[:3])
    out = wrapped.generate(**inputs, task_ids=TASK_IDS[:3], **settings)
    assert out.shape == (3, inputs["input_ids"].shape[1] + 3)
    for row, text in enumerate(PROMPTS[:3]):
        alone = wrapped.generate(**left_padded([text]), task_ids=TASK_IDS[row : row + 1], **settings)
        assert torch.equal(out[row, -3:], alone[0, -3:])


@pytest.mark.parametrize("kind", KINDS)
def test_output_layer_gets_a_contiguous_input_while_routed(kind: str) -> None:
    """Generation's first step slices the last position; inside a routing block the output layer sees it
    contiguous (a frozen weight would otherwise be broadcast over the rows), with the same logits."""
    model = adapted_lm(kind, "task")
    head = model.get_output_embeddings()
    seen: list[bool] = []

    def call(hidden: Tensor) -> Tensor:  # the probe runs after any hook already on the layer
        probe = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        try:
            return head(hidden)
        finally:
            probe.remove()

    hidden = torch.randn(3, 5, head.in_features)[:, -1:]
    assert not hidden.is_contiguous()
    expected = call(hidden)
    with loramix.routing(model, task_ids=torch.tensor([0, 1, 2])):
        torch.testing.assert_close(call(hidden), expected, rtol=1e-6, atol=1e-6)
    call(hidden)
    assert seen == [False, True, False]  # the hook lives as long as the block
