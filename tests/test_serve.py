"""`loramix serve` over real HTTP on a free port: a trained run's answers to POST /predict equal
`TrainedRun.predict`'s (and so `loramix predict`'s), its tasks are listed, and bad requests get 400 with a message
naming the field or row, an oversized body 413, an unknown path 404; the server keeps answering after each."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import loramix
from loramix.cli import main
from loramix.serve import RunServer
from tests.train import toys
from tests.train.test_predict import TASKS, rows_of, trained


@pytest.fixture(scope="module")
def served(
    model_dir: Path, tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Any]]:
    settings = {**toys.settings(model_dir, tasks_dir, method="mola-grad", steps=10, lr=2e-2), "tasks": TASKS}
    run = loramix.open_run(trained(tmp_path_factory.mktemp("serve"), settings))
    server = RunServer(("127.0.0.1", 0), run, max_body=100_000, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", run
    server.shutdown()
    server.server_close()


def call(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_predict_answers_as_the_run_does_and_tasks_are_listed(served: tuple[str, Any], tasks_dir: Path):
    url, run = served
    rows = rows_of(tasks_dir, TASKS)
    status, body = call(f"{url}/predict", {"rows": rows, "scores": True})
    assert status == 200 and body["answers"] == run.predict(rows, scores=True)
    one = [{"text": row["text"]} for row in rows if row["task"] == TASKS[0]]
    status, body = call(f"{url}/predict", {"rows": one, "task": TASKS[0], "batch_size": 4})
    assert status == 200 and body["answers"] == run.predict(one, task=TASKS[0], batch_size=4)
    status, body = call(f"{url}/tasks")
    assert status == 200 and body["method"] == "mola-grad"
    assert [t["name"] for t in body["tasks"]] == TASKS and body["tasks"][0]["task_type"] == "classification"
    assert call(f"{url}/health") == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("path", "body", "raw", "code", "words"),
    [
        ("/predict", None, b"{not json", 400, ["not JSON"]),
        ("/predict", {"text": "a"}, None, 400, ['"rows" list']),
        (
            "/predict",
            {"rows": [{"task": TASKS[0], "text": "a"}, {"text": "b"}]},
            None,
            400,
            ["row 2: no 'task'"],
        ),
        ("/predict", {"rows": ["a"]}, None, 400, ["row 1: a row is a JSON object"]),
        ("/predict", {"rows": [], "scorez": True}, None, 400, ["unknown field(s) ['scorez']"]),
        (
            "/predict",
            {"rows": [], "batch_size": "3"},
            None,
            400,
            ['batch_size: must be an integer (got "3")'],
        ),
        ("/predict", {"rows": [], "scores": 1}, None, 400, ["scores: must be true or false"]),
        ("/predict", {"rows": [{"text": "a"}], "task": "weather"}, None, 400, ["'weather' is not a task"]),
        ("/predict", {"rows": [{"text": "x" * 200_000}]}, None, 413, ["at most 100000"]),
        ("/answer", {"rows": []}, None, 404, ["POST /predict"]),
        ("/nothing", None, None, 404, ["GET /tasks"]),
    ],
)
def test_bad_requests_are_named_and_the_server_keeps_answering(
    served: tuple[str, Any], path: str, body: Any, raw: bytes | None, code: int, words: list[str]
):
    url, _ = served
    status, answer = call(f"{url}{path}", body, raw)
    assert status == code and all(word in answer["error"] for word in words), answer
    assert call(f"{url}/health")[0] == 200


def test_a_taken_port_is_named(served: tuple[str, Any], capsys: pytest.CaptureFixture[str]):
    url, run = served
    port = url.rsplit(":", 1)[1]
    assert main(["serve", str(run.folder), "--port", port]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err
