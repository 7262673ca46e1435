"""Parameter roles: declared by the module class that creates the parameter, read by the optimizer's groups; a
parameter's name plays no part."""

from __future__ import annotations

import torch
from torch import nn

import loramix
from loramix.heads import TaskHeads
from loramix.roles import parameter_roles, parameters_by_role
from loramix.train.config import RunConfig
from loramix.train.loop import parameter_groups
from loramix.train.model import MultiTaskModel
from tests.models import tiny_bert


def multitask(**adapter: object) -> MultiTaskModel:
    backbone = tiny_bert()
    loramix.inject(backbone, {"targets": ["query", "value"], **adapter})
    return MultiTaskModel(backbone, TaskHeads(32, [2, 3]))


def test_every_parameter_gets_the_role_of_the_module_that_made_it() -> None:
    model = multitask(num_experts=3, router="sample", train_backbone=True)
    roles = parameter_roles(model)
    assert set(roles) == {name for name, _ in model.named_parameters()}
    for name, role in roles.items():
        if ".experts." in name:
            assert role == "expert", name
        elif "model_router" in name:
            assert role == "router", name
        elif name.startswith("heads."):
            assert role == "head", name
        else:
            assert role == "backbone", name


class Gadget(nn.Module):
    """A module of a new kind whose parameter names say nothing about what they are."""

    loramix_role = "router"

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


def test_optimizer_groups_read_roles_not_names() -> None:
    model = multitask(num_experts=1, router="none")
    model.backbone.embeddings.gadget = Gadget()  # hidden among backbone modules, named like nothing
    run = RunConfig(tasks_dir=".", tasks=["a"], lr=1e-3, router_lr=7e-3, head_lr=2e-3, backbone_lr=5e-5)
    groups = {group["name"]: group for group in parameter_groups(run, model)}
    assert any(p is model.backbone.embeddings.gadget.w for p in groups["router"]["params"])
    assert groups["router"]["lr"] == 7e-3
    assert "backbone" not in groups  # frozen
    experts = parameters_by_role(model)["expert"]
    assert experts and all(p.requires_grad for p in experts)
    assert groups["expert"]["lr"] == 1e-3 and groups["head"]["lr"] == 2e-3
