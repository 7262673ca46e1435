"""Growth: more experts and more task slots in an injected model, in place.

Every expert bank gains experts (new ones add nothing until trained), every router gains rows or columns (old
tasks keep their decisions exactly), and the model's recorded config gets the new sizes, so that a save records
them and a load rebuilds the grown model. Old rows keep their exact values and their frozen state. Parameters are
new tensors afterwards: build the optimizer after growing.
"""

from __future__ import annotations

from torch import nn

from loramix.errors import ConfigError
from loramix.inject import get_info
from loramix.kinds import check_kinds
from loramix.routers import router_class


def grow(
    model: nn.Module,
    *,
    num_experts: int | None = None,
    num_tasks: int | None = None,
    task_to_expert: list[int] | None = None,
    router: str | None = None,
) -> nn.Module:
    """Add experts and task slots to every adapted layer and router of `model`; returns the model.

    `router` changes a single-expert model without a router (a plain LoRA) into a routed bank, its expert
    becoming expert 0 (ELREA grows its base adapter this way). `task_to_expert` (task router) maps every task,
    old ones included, when the new tasks do not simply take the new experts in order.

    New experts add nothing, so with routers that fix each task's experts (task, Poly, per-task) old tasks' outputs
    are unchanged. A learned router over the inputs (sample, token) with a soft gate spreads its softmax over the new
    experts too: the old experts' weights shrink and the outputs move until it is trained again (with top-1 they
    do not).

    Example:
        >>> loramix.grow(model, num_experts=4, num_tasks=4)  # two more experts and tasks, old ones untouched
    """
    info = get_info(model)
    config = info.config
    num_experts = num_experts or config.num_experts
    if num_experts < config.num_experts:
        raise ConfigError(f"num_experts={num_experts} is fewer than the {config.num_experts} the model has")
    if num_tasks is not None and config.num_tasks is not None and num_tasks < config.num_tasks:
        raise ConfigError(f"num_tasks={num_tasks} is fewer than the {config.num_tasks} the model has")
    update: dict = {"num_experts": num_experts}
    if num_tasks is not None:
        update["num_tasks"] = num_tasks
    old_class = info.router_class
    if router is not None and router != config.router:
        if old_class.scope is not None:
            raise ConfigError(
                f"only a model without a router (router 'none') can be given one; this one has '{config.router}'"
            )
        update["router"] = router
    if task_to_expert is not None:
        update["task_to_expert"] = task_to_expert
    elif config.task_to_expert is not None and num_tasks is not None:
        raise ConfigError("this model maps tasks to experts with task_to_expert: pass it for every task")
    elif old_class.uses_task_to_expert and config.num_tasks is not None:
        # the router's default (task t -> expert t, new task T + j -> new expert E + j), written out unless it is
        # still one task per expert: a config cannot leave any other mapping implicit
        new_tasks = (num_tasks or config.num_tasks) - config.num_tasks
        default = list(range(config.num_tasks)) + [config.num_experts + j for j in range(new_tasks)]
        if default != list(range(num_experts)) and max(default) < num_experts:
            task_to_expert = update["task_to_expert"] = default
    new_config = config.model_copy(update=update)
    new_config = check_kinds(type(config).from_dict(new_config.to_dict()))  # validated as any config is
    new_class = router_class(new_config.router)
    for layer in info.layers:
        layer.experts.grow(num_experts)
        if old_class is new_class and layer.router is not None:
            layer.router.grow(num_experts, num_tasks)
    if new_class is not old_class:  # a plain LoRA gets its router
        for layer in info.layers:
            if new_class.scope == "layer":
                built = new_class.from_config(new_config, layer.in_features)
                layer.router = None if built is None else built.to(layer.experts.device).train(layer.training)
            layer.gate_source = new_class.scope or "none"
        if new_class.scope == "model":
            router_obj = new_class.from_config(new_config, None)
            assert router_obj is not None
            first = info.layers[0]
            first.model_router = router_obj.to(first.experts.device).train(first.training)
    elif info.model_router is not None:
        extra = {"task_to_expert": task_to_expert} if task_to_expert is not None else {}
        info.model_router.grow(num_experts, num_tasks, **extra)
    info.config = new_config
    return model
