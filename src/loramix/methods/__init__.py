"""Methods: each plugs its adapter config, auxiliary losses and schedule into the shared training parts, and is
found by name in :data:`METHODS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramix.errors import CheckpointError, ConfigError
from loramix.methods import continual, full, mola
from loramix.methods.base import METHODS, Method, get_method, register_method
from loramix.methods.elrea.method import Elrea
from loramix.train.checkpoint import check_resumable
from loramix.train.config import CONFIG_FILE, RunConfig
from loramix.train.loop import processes
from loramix.train.resume import check_resume_config
from loramix.train.run import task_specs
from loramix.train.trackers import chosen_trackers

__all__ = [
    "METHODS",
    "Elrea",
    "Method",
    "get_method",
    "load_run_config",
    "plan",
    "push_run",
    "continual",
    "full",
    "mola",
    "register_method",
    "run_training",
]


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run config read from YAML, with its method's own checks: everything validated before any work."""
    run = RunConfig.from_yaml(path, overrides)
    get_method(run.method).validate(run)
    return run


def checked_method(run: RunConfig) -> Method:
    """The method `run` names, once it has checked the run, and the trackers the run names are installed: what
    can be refused before any data or model is read."""
    method = get_method(run.method)
    method.validate(run)
    chosen_trackers(run.report_to)
    return method


def run_training(
    run: RunConfig, output_dir: str | Path, *, resume: bool = False, allow_config_change: bool = False
) -> dict[str, Any]:
    """Train, evaluate and save one run into `output_dir` with the method it names; returns its metrics. A resume
    must keep the config the run was started with, but for bookkeeping, unless `allow_config_change` (then the
    changes are recorded in the run directory); this is checked before anything is written."""
    method = checked_method(run)
    if allow_config_change and not resume:
        raise ConfigError(
            "--allow-config-change applies only to a resume: pass --resume too, or leave it out"
        )
    prior = run.continue_from
    if prior is not None and Path(prior).resolve() == Path(output_dir).resolve():
        raise ConfigError(
            f"continue_from: {prior} is also the output folder; a continued run is written to a folder of its own "
            "(the run it continues stays as it was): pass another --output-dir"
        )
    if resume:
        specs = task_specs(run)  # a task spec's own problems, before a changed config is recorded
        check_resumable(method.resume_checkpoints(Path(output_dir)), processes().num_processes)
        check_resume_config(
            run,
            Path(output_dir),
            specs=specs,
            allow_change=allow_config_change,
            main_process=processes().is_main_process,
        )
    earlier: list[Path] = []  # an earlier run's files, replaced by this one once its data has been read
    if not resume and processes().is_main_process and (Path(output_dir) / CONFIG_FILE).is_file():
        earlier = [*method.resume_state(Path(output_dir)), *method.outputs(Path(output_dir))]
    metrics = method.train(run, Path(output_dir), resume=resume, replaces=earlier)
    if run.push_to_hub is not None and processes().is_main_process:
        print(f"uploaded to {push_run(output_dir, run.push_to_hub, private=run.hub_private)}")
    return metrics


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload the finished run in `run_dir` to the Hub repository `repo_id` (:mod:`loramix.train.share`): its
    config and what its method says a finished run holds (`Method.outputs`), with a model card; returns the
    commit's address. `loramix predict|inspect|export repo_id` use it from there."""
    from loramix.preflight import finished_adapter
    from loramix.train.share import upload_run

    run_dir = Path(run_dir)
    finished_adapter(run_dir)  # a run stopped before its end is told how to finish
    if not (run_dir / "adapter").is_dir():
        raise CheckpointError(
            f"{run_dir}: no run folder that `loramix train` finished (no adapter/, no config.yaml)"
        )
    method = get_method(RunConfig.from_yaml(run_dir / CONFIG_FILE).method)
    return upload_run(
        run_dir, repo_id, method.outputs(run_dir), private=private, message=message, token=token
    )


def plan(run: RunConfig) -> list[str]:
    """What `loramix train --dry-run` prints: the run's plan (:mod:`loramix.train.plan`) from its config, its data
    and its model as built with the method's adapters before any training (ELREA: the base adapter; a continual
    method: the whole bank). Nothing is written. A continued run's model is the earlier run's and is not built."""
    from loramix.data import MultiTaskData
    from loramix.models import check_model_path
    from loramix.train.run import build_model

    method = checked_method(run)
    check_model_path(run.model)
    data = MultiTaskData(task_specs(run))
    model = None
    if run.continue_from is None:
        model, _ = build_model(run, data, method.adapter_config(run, data.num_tasks))
    lines = method.plan(run, data, model)
    if model is None:
        lines.append(f"parameters: those of {run.continue_from}, with the new tasks'")
    return lines
