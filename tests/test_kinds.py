"""The kinds an adapter config names are checked where a config is built into a model: by `inject`, `grow`, `load`
and a method's door check, each naming the field; the config itself imports neither torch nor any kind."""

from __future__ import annotations

import subprocess
import sys

import pytest

import loramix
from loramix import AdapterConfig, ConfigError
from loramix.inject import is_injected
from loramix.kinds import check_kinds, scaling
from loramix.methods import get_method
from loramix.train.config import RunConfig
from tests.models import tiny_mlp

BAD = {
    # config: (the field the error names, what it says)
    "unknown router": (
        {"router": "magic"},
        "router",
        "is not one of: none, per-task, poly, sample, task, token",
    ),
    "unknown expert kind": ({"experts": "dora"}, "experts", "is not one of: lora, adapter"),
    "mistyped router": ({"router": "tokn"}, "router", r"is not one of: .*\. Did you mean 'token'\?"),
    "mistyped expert kind": ({"experts": "adaptor"}, "experts", r"\. Did you mean 'adapter'\?"),
    "plain LoRA with experts": ({"router": "none", "num_experts": 3}, "router", "needs num_experts=1"),
    "task router without tasks": ({"router": "task", "num_experts": 2}, "router", "needs num_tasks"),
    "task map too short": (
        {"router": "task", "num_experts": 2, "num_tasks": 3, "task_to_expert": [0, 1]},
        "task_to_expert",
        "has 2 entries but num_tasks is 3",
    ),
    "top_k unused": ({"router": "task", "num_experts": 2, "num_tasks": 2, "top_k": 1}, "top_k", "not used"),
    "router_input unused": (
        {"router": "token", "num_experts": 2, "router_input": "embeddings"},
        "router_input",
        "router_input is not used by router 'token'",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_kind_that_does_not_fit_is_refused_by_inject_naming_the_field(case: str) -> None:
    settings, field, message = BAD[case]
    config = AdapterConfig.from_dict(settings)  # the config's own fields are fine
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"invalid adapter config:\n  {field}: .*{message}"):
        loramix.inject(model, config)
    with pytest.raises(ConfigError, match=rf"  {field}: "):
        loramix.inject(model, settings)  # a dict, too
    assert not is_injected(model)
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())


def test_a_fitting_config_passes_and_gives_its_kinds_scale() -> None:
    lora = AdapterConfig(num_experts=2, router="task", num_tasks=2, rank=4, alpha=8)
    assert check_kinds(lora) is lora
    assert scaling(lora) == 2.0
    assert scaling(lora.model_copy(update={"rslora": True})) == 4.0
    assert scaling(AdapterConfig(experts="adapter", adapter_scale=0.3)) == 0.3
    with pytest.raises(ConfigError, match="router 'magic'"):
        scaling(AdapterConfig(router="magic"))


def test_grow_checks_the_grown_config() -> None:
    model = tiny_mlp()
    loramix.inject(model, AdapterConfig(num_experts=2, router="task", num_tasks=2, targets=["fc1"]))
    with pytest.raises(ConfigError, match="task_to_expert: task_to_expert names experts"):
        loramix.grow(model, num_experts=3, num_tasks=3, task_to_expert=[0, 1, 7])


def test_a_method_door_check_names_the_method() -> None:
    run = RunConfig(
        tasks_dir="data", tasks=["a", "b", "c"], method="mola-grad", num_experts=2, task_to_expert=[0, 1]
    )
    with pytest.raises(ConfigError, match="adapter settings of method mola-grad:\n  task_to_expert: .*3"):
        get_method("mola-grad").validate(run)


def test_a_method_without_a_router_that_reads_router_input_refuses_it() -> None:
    run = RunConfig(tasks_dir="data", tasks=["a", "b"], method="token-router", router_input="embeddings")
    with pytest.raises(ConfigError, match="router_input: method token-router has no router that reads it"):
        get_method("token-router").validate(run)
    get_method("mola-router").validate(run.model_copy(update={"method": "mola-router"}))


def test_a_config_is_checked_without_torch() -> None:
    """A run config is validated before torch loads: the adapter config imports no kind, and so no torch."""
    code = (
        "import sys; from loramix.config import AdapterConfig; c = AdapterConfig(router='magic', top_k=2, "
        "num_experts=2); print('torch' in sys.modules, c.router)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "magic"]
