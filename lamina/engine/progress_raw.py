"""`--progress rawjson`: BuildKit's SolveStatus objects, one JSON document per line, as buildx prints them.

buildx's rawjson mode encodes each `client.SolveStatus` it receives
(`{"vertexes": [...], "logs": [...], "warnings": [...]}`) with Go's
encoding/json, one per line. A vertex here is one step: its digest is
sha256 over the stage, step number and instruction (stable across builds),
its name the `[stage N/M] INSTRUCTION` label; `started`/`completed` are
RFC 3339 times, `cached` is set for a cache hit and `error` for a failure.
A step's output lines are logs (stream 1, base64 data, as Go encodes
[]byte); warnings carry `short` the same way. Nothing else is printed:
the summary line is not part of BuildKit's stream.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import sys
import threading
from typing import Any, TextIO

# Events arrive as engine.progress.StepEvent; this module does not import it
# (progress.make_progress imports this one: no cycle).


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _vertex(stage: str, index: int, instruction: str = "") -> str:
    return "sha256:" + hashlib.sha256(f"{stage}\0{index}\0{instruction}".encode()).hexdigest()


class RawJsonProgress:
    """BuildKit's raw solve status stream (buildx `--progress rawjson`)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self._started: dict[tuple[str, int], str] = {}
        self._digests: dict[tuple[str, int], str] = {}

    def _emit(self, status: dict[str, object]) -> None:
        with self._lock:
            self._stream.write(json.dumps(status, separators=(",", ":")) + "\n")
            self._stream.flush()

    def step(self, event: Any) -> None:
        key = (event.stage, event.index)
        digest = self._digests.setdefault(key, _vertex(event.stage, event.index, event.instruction))
        now = _now()
        vertex: dict[str, object] = {
            "digest": digest,
            "name": event.vertex_name(),
        }
        status = event.status.value
        if status == "running":
            self._started[key] = now
            vertex["started"] = now
        else:
            vertex["started"] = self._started.get(key, now)
            vertex["completed"] = now
        if status == "cached":
            vertex["cached"] = True
        if status == "error":
            vertex["error"] = "\n".join(event.output_tail[-1:]) or "step failed"
        self._emit({"vertexes": [vertex]})

    def log(self, stage: str, index: int, line: str) -> None:
        digest = self._digests.get((stage, index), _vertex(stage, index))
        data = base64.b64encode((line + "\n").encode()).decode()
        self._emit({"logs": [{"vertex": digest, "stream": 1, "data": data, "timestamp": _now()}]})

    def warn(self, message: str) -> None:
        short = base64.b64encode(message.encode()).decode()
        self._emit({"warnings": [{"level": 1, "short": short}]})

    def check(self, warning: Any) -> None:
        """A build check's warning as BuildKit's VertexWarning: detail, url and the lines it points at."""

        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        lines = {"start": {"line": warning.start_line}, "end": {"line": warning.end_line}}
        found: dict[str, Any] = {
            "level": 1,
            "short": b64(warning.short()),
            "detail": [b64(warning.description)],
        }
        if warning.url:
            found["url"] = warning.url
        if warning.start_line:
            found["range"] = [lines]
        self._emit({"warnings": [found]})

    def finish(self, summary: Any) -> None:
        pass
