"""Parameter roles: every trainable tensor belongs to an expert bank, a router, a head, a method's own module, or
the backbone. A module class declares its role (`loramix_role = "router"`) where its parameters are created, and
each parameter takes the role of the innermost module that declares one; the rest is the backbone. Optimizer
groups and freezing read these roles, never parameter names.
"""

from __future__ import annotations

from torch import nn

ROLES = ("expert", "router", "head", "method", "backbone")


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """`{parameter name: role}` for every parameter of `model` (shared parameters under their first name)."""
    roles: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str, role: str) -> None:
        role = getattr(type(module), "loramix_role", role)
        for name, _ in module.named_parameters(prefix=prefix, recurse=False):
            roles.setdefault(name, role)
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name, role)

    visit(model, "", "backbone")
    return roles


def parameters_by_role(model: nn.Module, *, trainable_only: bool = True) -> dict[str, list[nn.Parameter]]:
    """`{role: [parameters]}` for the optimizer's groups, each parameter once."""
    named = dict(model.named_parameters())
    groups: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    for name, role in parameter_roles(model).items():
        param = named.get(name)
        if param is not None and (param.requires_grad or not trainable_only):
            groups[role].append(param)
    return groups
