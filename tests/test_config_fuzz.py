"""Random values in every field of a run config, an adapter config and a task spec, and random YAML text as a
config file: each either validates or raises a loramix error that names the file or the key, never another
exception. Also: no float field lets a non-finite number through."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramix.config import AdapterConfig
from loramix.data.spec import TaskSpec, load_task_specs
from loramix.errors import ConfigError, LoramixError
from loramix.methods import get_method
from loramix.train.config import RunConfig

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
VALID_RUN: dict[str, Any] = {"tasks_dir": "data", "tasks": ["a", "b"]}


def fields_with(model: type, *, extra: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts over the model's own keys (and a few it does not know), each with a random JSON value."""
    keys = st.sampled_from([*model.model_fields, *extra])
    return st.dictionaries(keys, JSON_VALUES, max_size=4)


def assert_names_a_key(exc: BaseException, keys: list[str]) -> None:
    assert isinstance(exc, LoramixError), f"{type(exc).__name__}: {exc}"
    assert any(str(key) in str(exc) for key in keys), str(exc)


# label_template is a format string: random ones built from the pieces that matter to str.format
TEMPLATE_PIECES = ["{label}", "{task}", "{label.x}", "{label[x]}", "{label[0]}", "{label!r}", "{label!z}"]
TEMPLATE_PIECES += ["{label:{task}}", "{label:>9999999999}", "{0}", "{}", "{", "}", "a "]
TEMPLATES = st.lists(st.sampled_from(TEMPLATE_PIECES), min_size=1, max_size=3).map("".join)


@settings(FUZZ)
@given(fields=fields_with(RunConfig, extra=["stepz", ""]), template=st.one_of(st.none(), TEMPLATES))
def test_random_values_in_a_run_config_give_a_config_error_naming_the_key(
    fields: dict[str, Any], template: str | None
):
    data = {**VALID_RUN, **fields}
    if template is not None:
        data["label_template"] = template
    try:
        run = RunConfig.from_dict(data)
        get_method(run.method).validate(run)
        if run.tasks and isinstance(run.tasks[0], dict):
            load_task_specs(run.tasks)
    except Exception as exc:  # the point: which exceptions come out
        assert_names_a_key(exc, [*data, *RunConfig.model_fields, *TaskSpec.model_fields])


@settings(FUZZ)
@given(fields=fields_with(AdapterConfig, extra=["expert", "rank "]))
def test_random_values_in_an_adapter_config_give_a_config_error_naming_the_key(fields: dict[str, Any]):
    try:
        AdapterConfig.from_dict(fields)
    except Exception as exc:
        assert_names_a_key(exc, [*fields, *AdapterConfig.model_fields])


@settings(FUZZ)
@given(fields=fields_with(TaskSpec, extra=["textfield"]), listed=st.booleans())
def test_random_values_in_a_task_spec_give_a_config_error_naming_the_key(
    fields: dict[str, Any], listed: bool
):
    data = {"name": "t", "train": "t.jsonl", **fields}
    try:
        load_task_specs([data]) if listed else TaskSpec.from_dict(data)
    except Exception as exc:
        assert_names_a_key(exc, [*data, *TaskSpec.model_fields])


YAML_TEXT = st.one_of(
    st.text(max_size=60),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_:-[]{}!&*#|>'\"\n .0123456789", max_size=60),
    st.dictionaries(st.sampled_from(list(RunConfig.model_fields)), JSON_VALUES, max_size=4).map(
        lambda d: yaml.safe_dump({**VALID_RUN, **d})
    ),
    st.sampled_from(["x: 2020-02-30\n", "x: !!binary 'a'\n", "x: !!float 'nan?'\n", "[" * 300 + "\n"]),
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


@settings(FUZZ)
@given(text=YAML_TEXT, override=st.one_of(st.none(), st.text(max_size=20)))
def test_random_yaml_text_as_a_config_file_gives_a_config_error_naming_it(
    folder: Path, text: str, override: str | None
):
    path = folder / "run.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        RunConfig.from_yaml(path, None if override is None else [override])
    except ConfigError as exc:
        assert str(path) in str(exc) or "--set" in str(exc), str(exc)
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}")


def float_fields(model: type) -> list[str]:
    """The fields that take a number of type float (not a choice such as "float32")."""
    return [
        name for name, info in model.model_fields.items() if re.search(r"\bfloat\b", str(info.annotation))
    ]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("key", float_fields(RunConfig))
def test_run_config_refuses_non_finite_numbers_naming_the_key(key: str, value: float):
    per_task = "dict" in str(RunConfig.model_fields[key].annotation)  # a number per task: sampling_weights
    with pytest.raises(ConfigError, match=rf"{key}{'.a' if per_task else ''}: .*finite number"):
        RunConfig.from_dict({**VALID_RUN, key: {"a": value} if per_task else value})


@pytest.mark.parametrize("value", [math.inf, math.nan])
@pytest.mark.parametrize("key", float_fields(AdapterConfig))
def test_adapter_config_refuses_non_finite_numbers_naming_the_key(key: str, value: float):
    with pytest.raises(ConfigError, match=rf"{key}: .*finite number"):
        AdapterConfig.from_dict({key: value})


def test_the_float_fields_are_found():
    assert {"lr", "alpha", "dropout", "warmup_ratio", "max_grad_norm"} <= set(float_fields(RunConfig))
    assert {"alpha", "dropout", "temperature", "adapter_scale"} <= set(float_fields(AdapterConfig))


@pytest.mark.parametrize("key", ["lr", "router_lr", "head_lr", "backbone_lr", "elrea_expert_lr"])
def test_a_learning_rate_past_any_use_is_refused_naming_the_key(key: str):
    """`1e38` would overflow AdamW's float32 step mid-run (a traceback); anything above 1000 is a slip."""
    with pytest.raises(ConfigError, match=rf"{key}: Input should be less than or equal to 1000"):
        RunConfig.from_dict({**VALID_RUN, key: 1e38})
    assert getattr(RunConfig.from_dict({**VALID_RUN, key: 1e3}), key) == 1e3
