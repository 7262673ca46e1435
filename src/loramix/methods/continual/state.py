"""What a continual run keeps between tasks and hands on: the learner's state after each task (`after-task-<t>/`,
which a resumed run reloads), and a finished run taken up again to learn new tasks (`continue_from`)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from loramix.data import MultiTaskData, TextCollator
from loramix.errors import ConfigError
from loramix.io.checkpoint import load, read_checkpoint, save
from loramix.methods.continual.learner import Learner, saved_selector
from loramix.models import load_backbone
from loramix.train.config import RunConfig
from loramix.train.model import MultiTaskModel
from loramix.train.run import label_prompt_head, label_prompts


def extra_tensors(learner: Learner, *, head: bool = False) -> dict[str, Tensor]:
    """The selector's tensors (and the head's, for a snapshot: a finished run's save holds the head already)."""
    extra = {f"head.{k}": v for k, v in learner.model.heads.state_dict().items()} if head else {}
    if learner.selector is not None:
        extra.update({f"selector.{k}": v for k, v in learner.selector.state().items()})
    return extra


def snapshot(learner: Learner, directory: Path) -> None:
    """The learner after a task: adapters (with frozen experts and routers), head, selector, records."""
    save(
        learner.backbone,
        directory / "adapter",
        metadata={"records": learner.records, "learned": learner.learned},
        extra_tensors=extra_tensors(learner, head=True),
    )


def restore(learner: Learner, directory: Path) -> Learner:
    """The learner with a fresh model holding the adapters, head and selector saved after a task (the caller tells
    the head which tasks are learned)."""
    record, tensors = read_checkpoint(directory / "adapter")
    device = learner.device  # the model's now, before its backbone is replaced by one loaded on the CPU
    backbone, _ = load_backbone(learner.run.model)
    load(backbone, directory / "adapter")
    learner.model.backbone = backbone
    head = {k.removeprefix("extra.head."): v for k, v in tensors.items() if k.startswith("extra.head.")}
    learner.model.heads.load_state_dict(head)
    learner.model.to(device)
    if learner.selector is not None:
        learner.selector.load_state(
            {
                k.removeprefix("extra.selector."): v
                for k, v in tensors.items()
                if k.startswith("extra.selector.")
            }
        )
    learner.records = record["metadata"]["records"]
    learner.learned = record["metadata"]["learned"]
    return learner


def continued_learner(run: RunConfig, data: MultiTaskData, *, selector: bool) -> Learner:
    """A learner that goes on from the finished continual run `run.continue_from`: its model (experts, routers,
    frozen state), selector (required when `selector`) and class texts, with this config's tasks appended after its
    tasks."""
    prior = Path(run.continue_from or "")
    record, tensors = read_checkpoint(prior / "adapter")
    tasks = record["metadata"].get("tasks") or []
    missing = [t.get("name") for t in tasks if not t.get("label_prompts")]
    if not tasks or missing:
        raise ConfigError(
            f"continue_from: {prior} is not a finished continual run with label prompts (tasks without them: "
            f"{missing})"
        )
    clash = sorted({t["name"] for t in tasks} & set(data.task_names))
    if clash:
        raise ConfigError(f"continue_from: {prior} has learned {clash} already; name only new tasks")
    backbone, tokenizer = load_backbone(run.model)
    load(backbone, prior / "adapter")
    texts = [t["label_prompts"] for t in tasks] + label_prompts(run, data)
    head = label_prompt_head(run, texts, tokenizer)
    head.load_state_dict(
        {k.removeprefix("extra.heads."): v for k, v in tensors.items() if k.startswith("extra.heads.")}
    )
    model = MultiTaskModel(backbone, head, pooling=run.pooling)
    learner = Learner(run, data, model, TextCollator(tokenizer, max_length=run.max_length), offset=len(tasks))
    learner.prior_tasks = tasks
    if selector:
        if not any(k.startswith("extra.selector.") for k in tensors):
            raise ConfigError(f"continue_from: {prior} has no auto-selector; continue it with its own method")
        learner.selector = saved_selector(tensors, prior, run)
    metrics_file = prior / "metrics.json"
    if metrics_file.is_file():
        learner.records = json.loads(metrics_file.read_text()).get("continual", learner.records)
    return learner
