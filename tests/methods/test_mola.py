"""The methods as adapter configurations and auxiliary losses, found by name in the registry."""

from __future__ import annotations

import pytest

from loramix.errors import ConfigError
from loramix.kinds import scaling
from loramix.methods import METHODS, get_method
from loramix.preflight import check_method_name
from loramix.train.config import RunConfig


def run(**kw) -> RunConfig:
    return RunConfig(tasks_dir="data", tasks=["a", "b", "c"], **kw)


def adapter_config(run: RunConfig, num_tasks: int):
    return get_method(run.method).adapter_config(run, num_tasks)


def loss_weights(run: RunConfig) -> dict[str, float]:
    adapters = adapter_config(run, 3)
    return {term.name: term.weight for term in get_method(run.method).aux_losses(run, adapters)}


def test_every_method_is_registered_and_an_unknown_one_is_named():
    assert set(METHODS) >= {
        "lora",
        "lora-wide",
        "per-task-lora",
        "mola-grad",
        "mola-router",
        "token-router",
        "elrea",
    }
    with pytest.raises(ConfigError, match="'magic' is not a method.*'mola-grad'") as info:
        get_method("magic")
    assert "Did you mean" not in str(info.value)
    for check in (get_method, check_method_name):  # after torch loads, and at the door before it does
        with pytest.raises(ConfigError, match=r"'mola-gard' is not a method.*\. Did you mean 'mola-grad'\?$"):
            check("mola-gard")


def test_mola_grad_routes_each_task_to_its_own_expert():
    cfg = adapter_config(run(method="mola-grad"), num_tasks=3)
    assert (cfg.num_experts, cfg.router, cfg.num_tasks, cfg.task_to_expert) == (3, "task", 3, None)


def test_per_task_lora_is_mola_grad_with_a_frozen_backbone():
    """Documented in the README and the quality benchmark: the two build identical adapters."""
    assert adapter_config(run(method="per-task-lora"), 3) == adapter_config(run(method="mola-grad"), 3)
    assert adapter_config(run(method="mola-grad", train_backbone=True), 3).train_backbone


def test_task_to_expert_lets_tasks_share_experts():
    cfg = adapter_config(run(method="mola-grad", num_experts=2, task_to_expert=[0, 1, 1]), 3)
    assert (cfg.num_experts, cfg.task_to_expert) == (2, [0, 1, 1])


def test_lora_wide_has_the_mixture_parameter_count_and_the_same_scale():
    narrow, wide = adapter_config(run(method="lora"), 3), adapter_config(run(method="lora-wide"), 3)
    assert wide.rank == 3 * narrow.rank and wide.num_experts == 1
    assert scaling(wide) == pytest.approx(scaling(narrow))


@pytest.mark.parametrize(
    ("method", "router", "top_k"),
    [
        ("mola-router", "sample", None),
        ("token-router", "token", 2),
        ("lora", "none", None),
        ("elrea", "none", None),
    ],
)
def test_routers_of_each_method(method, router, top_k):
    cfg = adapter_config(run(method=method), 3)
    assert (cfg.router, cfg.top_k) == (router, top_k)


def test_auxiliary_loss_weights():
    assert loss_weights(run(method="mola-router"))["twd"] == 1.0
    assert loss_weights(run(method="mola-router", twd_weight=0))["twd"] == 0
    assert "twd" not in loss_weights(run(method="mola-grad"))  # no learned router, no TwD
    assert loss_weights(run(method="token-router"))["balance"] == 0.01
    assert loss_weights(run(method="token-router", balance_weight=0.5))["balance"] == 0.5


def test_twd_defaults_compare_gates_at_a_low_temperature():
    """TwD on gate probabilities (tasks pushed apart take different experts), tau 0.1, no projection."""
    run_config = run(method="mola-router")
    twd = get_method("mola-router").aux_losses(run_config, adapter_config(run_config, 3))[0]
    assert (twd.name, twd.space, twd.temperature, twd.projection) == ("twd", "gates", 0.1, None)
    logits_run = run(method="mola-router", twd_space="logits", twd_projection=True, twd_temperature=1.0)
    twd = get_method("mola-router").aux_losses(logits_run, adapter_config(logits_run, 3))[0]
    assert (twd.space, twd.temperature, twd.projection is not None) == ("logits", 1.0, True)


def test_a_projection_on_gates_is_refused():
    with pytest.raises(ConfigError, match="twd_projection"):
        get_method("mola-router").validate(run(method="mola-router", twd_projection=True))


def test_router_input_reaches_the_adapter_config():
    assert adapter_config(run(method="mola-router"), 3).router_input is None
    assert (
        adapter_config(run(method="mola-router", router_input="embeddings"), 3).router_input == "embeddings"
    )


def test_in_your_own_loop_twd_on_the_model_gate_is_mola_routers_term():
    """README's route to MoLA-Router's loss outside `loramix train`: `twd_loss` on the routing block's model-wide
    gate (`state.model_gate.logits`) with the run's defaults equals the term the trainer adds, and trains the
    router."""
    import torch

    import loramix
    from loramix.losses import twd_loss
    from tests.models import tiny_bert

    model = tiny_bert()
    settings = run(method="mola-router")
    loramix.inject(model, adapter_config(settings, 3))
    terms = {
        term.name: term
        for term in get_method("mola-router").aux_losses(settings, adapter_config(settings, 3))
    }
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    batch = {"input_ids": torch.randint(5, 90, (6, 7), generator=torch.Generator().manual_seed(0))}
    with loramix.routing(model, task_ids=ids) as state:
        model(**batch)
    own = twd_loss(state.model_gate.logits, ids, space="gates", tau=0.1)
    assert torch.equal(own, terms["twd"](state, {"task_ids": ids, **batch}))
    own.backward()
    router = loramix.get_info(model).model_router
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())
