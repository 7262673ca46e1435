"""The expert and router kinds an adapter config names: whether they exist and fit the config, and their scale.

:class:`~loramix.config.AdapterConfig` checks its own fields and imports no torch. The registries of kinds live in
`experts/` and `routers/`, whose classes read the config, so the kinds are checked here, above both, by everything
that builds from a config (`inject`, `grow`, `load`) before it touches a model.
"""

from __future__ import annotations

from loramix.config import AdapterConfig, problem_line
from loramix.errors import ConfigError, did_you_mean
from loramix.experts.base import EXPERT_KINDS
from loramix.routers.base import ROUTERS


def check_kinds(config: AdapterConfig, where: str = "adapter config") -> AdapterConfig:
    """Return `config` when its router and expert kinds are registered and fit it; else raise a ConfigError naming
    the field, as a bad field of the config itself does (`invalid {where}: ...`).

    Example:
        >>> check_kinds(AdapterConfig(router="magic"))
        ConfigError: invalid adapter config:
          router: router 'magic' is not one of: none, per-task, poly, sample, task, token
    """
    if config.router not in ROUTERS:
        problem = f"router {config.router!r} is not one of: {', '.join(ROUTERS)}"
        problem += did_you_mean(config.router, ROUTERS)
    elif config.experts not in EXPERT_KINDS:
        problem = f"experts {config.experts!r} is not one of: {', '.join(EXPERT_KINDS)}"
        problem += did_you_mean(config.experts, EXPERT_KINDS)
    else:
        try:
            ROUTERS[config.router].check_config(config)
            return config
        except ValueError as exc:
            problem = str(exc)
    raise ConfigError(f"invalid {where}:\n" + problem_line("", problem, AdapterConfig.model_fields))


def scaling(config: AdapterConfig) -> float:
    """s in `y = W0 x + s * sum_e g_e E_e(x)`: alpha / r (or alpha / sqrt(r)) for LoRA, as the expert kind says."""
    return EXPERT_KINDS[check_kinds(config).experts].scaling_of(config)
