"""The continual benchmark's timings (`python benchmarks/continual.py --speed` / `--grouped`): MoE-Adapters' model
on MiniLM, its adapters' grouped form against their gathers, and the auto-selector's routing against given task ids
on a batch that mixes the tasks. Ratios of interleaved rounds in one process (`_timing`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from _timing import interleaved, ratio_stats

TASKS = 10  # the benchmark's sequence (`continual.ORDER`): one router per task


def moe_adapters_model(experts: int, width: int, first_block: int = 0) -> tuple[torch.nn.Module, dict]:
    """MiniLM with MoE-Adapters' experts (`experts` bottleneck adapters of `width` after the MLP of every block
    from `first_block` on, one top-2 router per task for the ten tasks), every adapter parameter drawn at random
    so that each shows in the output; and the adapter config."""
    import loramix
    from loramix.methods.continual.moe_adapters import MLP_OUTPUTS
    from loramix.models import load_backbone

    model, _ = load_backbone("minilm")
    model.eval()
    config = {
        "experts": "adapter",
        "rank": width,
        "adapter_scale": 0.1,
        "dropout": 0.1,  # the method's (`RunConfig.dropout`); it acts in training only
        "num_experts": experts,
        "router": "per-task",
        "num_tasks": TASKS,
        "top_k": 2,
        "noisy": True,
        "target_regex": MLP_OUTPUTS,
        "layers_to_transform": list(range(first_block, model.config.num_hidden_layers))
        if first_block
        else None,
    }
    loramix.inject(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in loramix.adapter_state(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model, config


@contextmanager
def adapter_form(grouped: bool) -> Iterator[None]:
    """The adapters' grouped form where its rule (`loramix.experts.adapter.prefers_grouped`) takes it, or, with
    `grouped` False, the gathers everywhere, for the block."""
    import loramix.experts.adapter as adapter

    rule = adapter.prefers_grouped
    adapter.prefers_grouped = rule if grouped else (lambda *_: False)  # type: ignore[assignment]
    try:
        yield
    finally:
        adapter.prefers_grouped = rule


def grouped_speed(rounds: int, batch: int, seq: int, experts: int, width: int, train: bool = False) -> dict:
    """MoE-Adapters' model (`moe_adapters_model`) with the adapters' grouped form
    (`loramix.experts.adapter.prefers_grouped`: the pairs' rows sorted by expert, grouped GEMMs) against the same
    model with it switched off (each pair's weights gathered, `bmm`). In inference: the pass by task id on a batch
    that mixes the ten tasks. With `train`: a training step of one task (its noisy top-2 routers, dropout on,
    forward and backward of the encoder's output into every adapter and router parameter; the head is left out).
    One process, interleaved rounds, the median of per-round ratios."""
    import loramix

    model, _ = moe_adapters_model(experts, width)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, 20000, (batch, seq), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    task_ids = torch.full((batch,), 3) if train else torch.arange(batch) % TASKS
    if train:
        model.train()  # as the trainer runs it: the base model's dropout on too
        trained = [p for p in loramix.adapter_state(model).values() if p.requires_grad]

    def by_task(grouped: bool) -> object:
        def run() -> None:
            with adapter_form(grouped), torch.inference_mode(not train):
                with loramix.routing(model, task_ids=task_ids, attention_mask=inputs["attention_mask"]):
                    out = model(**inputs).last_hidden_state
                if train:
                    for param in trained:
                        param.grad = None
                    out.pow(2).mean().backward()

        return run

    timings = interleaved(
        {"grouped": by_task(True), "gathers": by_task(False)},
        device=torch.device("cpu"),
        rounds=rounds,
    )
    return {
        "name": "adapter-grouped-train-vs-gathers" if train else "adapter-grouped-vs-gathers",
        "experts": experts,
        "width": width,
        "batch": batch,
        "seq": seq,
        "rounds": rounds,
        **ratio_stats(timings.wall["grouped"], timings.wall["gathers"]),
    }


def grouped_precision(batch: int, seq: int, experts: int, width: int) -> dict:
    """How far each form's floats fall from float64's on MoE-Adapters' model (`moe_adapters_model`, by task id,
    one task's top-2 routers, the model in eval mode with autograd on, so that the training path runs without
    dropout's draws): the relative error (norm of the difference over the norm of the reference) of the encoder's
    output and of the gradient of a random projection of it into every adapter and router parameter, for the
    grouped form and for the gathers in float32, against the gathers in float64 (the grouped GEMM takes float32 and
    bfloat16 only), and of the grouped form against the gathers. Equal errors mean the grouped form trains as
    precisely as the gathers; it changes only which roundings happen."""
    import loramix

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, 20000, (batch, seq), generator=generator)
    mask = torch.ones_like(input_ids)
    task_ids = torch.full((batch,), 3)

    def answer(model: torch.nn.Module, grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        params = [p for p in loramix.adapter_state(model).values() if p.requires_grad]
        with adapter_form(grouped), loramix.routing(model, task_ids=task_ids, attention_mask=mask):
            out = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
            grads = torch.autograd.grad((out * projection).sum(), params, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
        return out.detach().double(), flat.double()

    def error(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> dict[str, float]:
        return {
            name: ((a - b).norm() / b.norm()).item() for name, a, b in zip(("output", "gradients"), got, want)
        }

    model = moe_adapters_model(experts, width)[0]
    want = answer(moe_adapters_model(experts, width)[0].double(), grouped=False)
    got = {"grouped": answer(model, grouped=True), "gathers": answer(model, grouped=False)}
    return {
        "name": "adapter-grouped-precision",
        "experts": experts,
        "width": width,
        "batch": batch,
        "seq": seq,
        "relative_error_vs_float64": {form: error(values, want) for form, values in got.items()},
        "relative_difference_grouped_vs_gathers": error(got["grouped"], got["gathers"]),
    }


def selector_speed(
    rounds: int,
    batch: int,
    seq: int,
    experts: int,
    layer: int,
    accept_layer: int | None = None,
    first_block: int = 0,
    neighbours: int = 0,
    choice: str = "own",
    accept_state: str = "base",
    tokens: int | None = None,
    precision: str = "float32",
    device: str | torch.device = "cpu",
) -> dict:
    """Inference on a batch that mixes the ten tasks through MoE-Adapters' model (per-task routers in every block
    from `first_block` on): with the auto-selector choosing each input's task (or the base) from its `hidden`
    feature (the base model's hidden state entering block `layer`, mean-pooled, with three token statistics; with
    `accept_layer`, block `accept_layer`'s too, which alone decides acceptance), against the same model given the
    true task ids; one process, interleaved rounds, the median of per-round ratios. The selector routes inside the
    pass itself where its blocks come no later than the first adapted one (as a continual run does), else from a
    base pass of its own first. `neighbours` k: the k-th nearest of each task's 800 fitting features decides
    acceptance (pooled threshold), as `ddas_neighbours` with the run's 1000 `ddas_examples` keeps them. `choice`:
    `ddas_choice` (shared: the task named under one covariance). `accept_state` route: `ddas_accept_state: route`,
    the task chosen on block `layer`'s base feature, acceptance read by the pass along that route at block
    `accept_layer` (each task's acceptance columns fitted along its own route), rejected inputs passed again on the
    base. `tokens`, `precision`: the selector's own base pass over each input's first `tokens` tokens, in
    `precision` (`ddas_tokens`, `ddas_precision`), when fitted and when choosing. With a base pass of its own over the
    whole input, also the pieces of the selector's cost, each against the task ids' pass (`pieces_vs_task_ids`):
    that pass (in `precision`) over each input's whole length and over its first 16 and 24 tokens, and the
    selector's scoring of the features. On `device` (on a GPU each case runs five times a round)."""
    import loramix
    from loramix.methods.continual.features import (
        reads_in_pass,
        routed_by_selector,
        selector_features,
        selector_layers,
        selector_width,
    )
    from loramix.methods.continual.routed import acceptance_features, routed_hidden
    from loramix.routers.selector import AutoSelector

    tasks = TASKS
    device = torch.device(device)
    # the selector's own pass, when fitted and when choosing
    cheap = {"tokens": tokens, "precision": precision}
    model, config = moe_adapters_model(experts, 64, first_block)
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    two_stage, routed = accept_layer is not None, accept_state == "route"
    selector = AutoSelector(
        2 * selector_width(model, "hidden") if routed else selector_width(model, "hidden", two_stage),
        accept_width=selector_width(model, "hidden") if two_stage else 0,
        neighbours=neighbours,
        threshold="pooled" if neighbours else "task",
        choice=choice,
        accept_state=accept_state,
    ).to(device)
    fitted = 1000 if neighbours else 200  # a Gaussian's cost does not depend on how many it was fitted on
    for task in range(tasks):  # fitted on each task's share of a vocabulary
        ids = torch.randint(1000 + 2000 * task, 3000 + 2000 * task, (fitted, seq), generator=generator).to(
            device
        )
        sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if routed:  # the acceptance block's state along the task's own route
            own = acceptance_features(model, sample, accept_layer, torch.full((fitted,), task, device=device))
            features = [selector_features(model, sample, "hidden", layer), own]
            selector.add_task(torch.cat(features, -1))
            continue
        selector.add_task(selector_features(model, sample, "hidden", layer, accept_layer, **cheap))
    task_ids = torch.arange(batch) % tasks
    input_ids = torch.stack(
        [
            torch.randint(1000 + 2000 * t, 3000 + 2000 * t, (seq,), generator=generator)
            for t in task_ids.tolist()
        ]
    ).to(device)
    task_ids = task_ids.to(device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    @torch.inference_mode()
    def given() -> None:
        with loramix.routing(model, task_ids=task_ids, attention_mask=inputs["attention_mask"]):
            model(**inputs)

    layers = selector_layers(layer, accept_layer)
    in_pass = reads_in_pass(model, layers) and not routed and tokens is None and precision == "float32"

    @torch.inference_mode()
    def selected() -> None:
        if routed:
            choice = selector_features(model, inputs, "hidden", layer)
            routed_hidden(model, inputs, selector, choice, accept_layer)
            return
        if in_pass:
            with routed_by_selector(model, inputs, selector, layers):
                model(**inputs)
            return
        chosen, keep = selector(selector_features(model, inputs, "hidden", layer, accept_layer, **cheap))
        with loramix.routing(model, task_ids=chosen, keep_base=keep, attention_mask=inputs["attention_mask"]):
            model(**inputs)

    cases = {"ddas": selected, "task-ids": given}
    if not (routed or in_pass or tokens):
        # the pieces of the selector's own cost: its base pass (on all or the first k tokens of each input, in its
        # precision) and its scoring of the features
        features = selector_features(model, inputs, "hidden", layer, accept_layer, precision=precision)
        for k in sorted({16, 24, seq}):
            cut = {key: value[:, :k] for key, value in inputs.items()}
            cases[f"base-pass-{k}"] = torch.inference_mode()(
                lambda cut=cut: selector_features(model, cut, "hidden", layer, accept_layer, **cheap)
            )
        cases["scoring"] = torch.inference_mode()(lambda: selector(features))
    timings = interleaved(cases, device=device, rounds=rounds, repeat=1 if device.type == "cpu" else 5)
    pieces = {
        name: ratio_stats(timings.wall[name], timings.wall["task-ids"])["ratio_median"]
        for name in cases
        if name not in ("ddas", "task-ids")
    }
    return {
        "name": "ddas-vs-task-ids",
        "ddas_layer": layer,
        "ddas_accept_layer": accept_layer,
        "ddas_normalize": selector.normalize,
        **({"ddas_neighbours": neighbours} if neighbours else {}),
        **({"ddas_choice": choice} if choice != "own" else {}),
        **({"ddas_accept_state": accept_state} if routed else {}),
        **({"ddas_tokens": tokens} if tokens else {}),
        **({"ddas_precision": precision} if precision != "float32" else {}),
        "layers_to_transform": config["layers_to_transform"],
        "in_pass": in_pass,
        "batch": batch,
        "seq": seq,
        "experts": experts,
        "tasks": tasks,
        "rounds": rounds,
        "seconds_task_ids": sorted(timings.wall["task-ids"])[rounds // 2],
        **ratio_stats(timings.wall["ddas"], timings.wall["task-ids"]),
        **({"pieces_vs_task_ids": pieces} if pieces else {}),
        "target": "<= 1.15",
    }
