"""Usage errors exit 2 in click's words; `--progress rawjson` prints BuildKit's SolveStatus stream."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.support.build import BASE, make_cache, run_cli, write_context


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "--nope", "."], "No such option '--nope'"),
        (["build", "--progress", "bogus", "."], "Invalid value for '--progress': 'bogus' is not one of"),
        (["build", "-o", "type=nope,dest=x", "."], "Invalid value for '-o' / '--output': invalid --output"),
        (["build", "-o", "type=oci,dest=x,compression=lz4", "."], "compression must be gzip, zstd or"),
        (["build", "--annotation", "noequals", "."], "Invalid value for '--annotation': parse annotations"),
        (["build", "--provenance", "mode=all", "."], "Invalid value for '--provenance'"),
        (["build", "a", "b"], "Got unexpected extra argument (b)"),
        (["bogus"], "No such command 'bogus'"),
    ],
)
def test_usage_errors_exit_2_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_cli(*args, cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        line for line in proc.stderr.splitlines() if line.startswith("error:")
    ], proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_progress_rawjson_is_buildkits_solve_status_stream(tmp_path: Path, busybox_image: Path) -> None:
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN echo out-line\n")
    proc = run_cli("build", "--progress", "rawjson", str(ctx), cache=cache)
    statuses = [json.loads(line) for line in proc.stderr.splitlines()]
    assert all(set(s) <= {"vertexes", "statuses", "logs", "warnings"} for s in statuses)
    vertexes = [v for s in statuses for v in s.get("vertexes", [])]
    # BuildKit's names: the FROM of an image is the stage's step 1.
    assert {v["name"] for v in vertexes} == {f"[1/2] FROM {BASE}", "[2/2] RUN echo out-line"}
    run = [v for v in vertexes if "RUN" in v["name"]]
    assert run[0]["digest"].startswith("sha256:") and "started" in run[0]
    assert "completed" in run[-1] and not run[-1].get("cached")
    logs = [log for s in statuses for log in s.get("logs", [])]
    assert [base64.b64decode(log["data"]) for log in logs] == [b"out-line\n"]
    assert {log["vertex"] for log in logs} == {run[0]["digest"]}
    again = run_cli("build", "--progress", "rawjson", str(ctx), cache=cache)
    cached = [v for line in again.stderr.splitlines() for v in json.loads(line).get("vertexes", [])]
    assert [(v["name"], v["cached"]) for v in cached] == [
        (f"[1/2] FROM {BASE}", True),
        ("[2/2] RUN echo out-line", True),
    ]
    assert cached[1]["digest"] == run[0]["digest"]  # the same step, the same vertex
