"""`loramix serve`: a finished run answering rows over HTTP, for the runs a static multi-LoRA server cannot hold (a
learned router, an auto-selector) or where a small JSON service is all that is needed.

One process holds the model; requests are answered one at a time (the model routes one batch at a time), each
request's rows in batches that mix tasks, exactly as `loramix predict` and `TrainedRun.predict` answer them.

    POST /predict   {"rows": [{"task": "trec", "text": "..."}, ...], "task": null, "scores": false,
                     "max_new_tokens": null, "sampling": null, "seed": 0}
                    -> 200 {"answers": [{"line": "row 1", "task": "trec", "prediction": "NUM", ...}, ...]}
    GET  /tasks     -> 200 {"method": ..., "tasks": [{"name", "task_type", "labels"}, ...]}
    GET  /health    -> 200 {"status": "ok"}

A bad request (not JSON, no `rows` list, a bad row or option) gets 400 with `{"error": "..."}` naming the row or
the field, as the command line names a file's line; a body over `max_body` bytes gets 413.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loramix.errors import LoramixError
from loramix.runs import TrainedRun

MAX_BODY = 16 * 1024 * 1024  # bytes a request may send
# the options a request may give beside its rows (`TrainedRun.predict`'s), with their JSON types
OPTIONS: dict[str, tuple[type, str]] = {
    "task": (str, "a string"),
    "scores": (bool, "true or false"),
    "batch_size": (int, "an integer"),
    "max_new_tokens": (int, "an integer"),
    "sampling": (dict, "an object"),
    "seed": (int, "an integer"),
}


class RunServer(ThreadingHTTPServer):
    """An HTTP server answering rows with one :class:`TrainedRun` (`server_address` `(host, port)`; port 0 takes a
    free one, then `server_port` says which)."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], run: TrainedRun, *, max_body: int = MAX_BODY, quiet: bool = False
    ) -> None:
        super().__init__(address, _Handler)
        self.run, self.max_body, self.quiet = run, max_body, quiet
        self.lock = threading.Lock()  # one batch routed through the model at a time

    def answer(self, request: Any) -> dict[str, Any]:
        """The answers to a decoded `/predict` body; a LoramixError names what is wrong with it."""
        if not isinstance(request, dict) or not isinstance(request.get("rows"), list):
            raise LoramixError('the body must be a JSON object with a "rows" list of objects')
        unknown = sorted(set(request) - {"rows", *OPTIONS})
        if unknown:
            raise LoramixError(f"unknown field(s) {unknown}; a request takes rows and {', '.join(OPTIONS)}")
        bad = [i for i, row in enumerate(request["rows"], 1) if not isinstance(row, dict)]
        if bad:
            raise LoramixError(f"row {bad[0]}: a row is a JSON object of its task's input fields")
        options = {k: request[k] for k in OPTIONS if request.get(k) is not None}
        for key, value in options.items():
            kind, described = OPTIONS[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise LoramixError(f"{key}: must be {described} (got {json.dumps(value)})")
        with self.lock:
            return {"answers": self.run.predict(request["rows"], **options)}

    def tasks(self) -> dict[str, Any]:
        keys = ("name", "task_type", "labels")
        return {
            "method": self.run.config.method,
            "tasks": [{k: meta[k] for k in keys if k in meta} for meta in self.run.tasks],
        }


class _Handler(BaseHTTPRequestHandler):
    server: RunServer

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        if self.path == "/health":
            self._send(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/tasks":
            self._send(HTTPStatus.OK, self.server.tasks())
        else:
            self._send(
                HTTPStatus.NOT_FOUND, {"error": f"no {self.path}: GET /tasks or /health, POST /predict"}
            )

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/predict":
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no {self.path}: POST /predict"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.max_body:
            self._send(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"the body is {length} bytes; at most {self.server.max_body} are read"},
            )
            return
        try:
            request = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"the body is not JSON ({exc})"})
            return
        try:
            self._send(HTTPStatus.OK, self.server.answer(request))
        except LoramixError as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:  # the server stays up; the client learns what failed
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

    def _send(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's name)
        if not self.server.quiet:
            super().log_message(format, *args)
