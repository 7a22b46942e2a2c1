"""What `--progress plain|json|quiet` print for a build's step events."""

from __future__ import annotations

import dataclasses
import io
import json

from lamina.engine.progress import (
    BuildSummary,
    JsonProgress,
    PlainProgress,
    QuietProgress,
    StepEvent,
    StepStatus,
    make_progress,
)

RUN = StepEvent("builder", 2, 3, "RUN make", StepStatus.RUNNING)
CACHED = StepEvent("builder", 1, 3, "COPY . /src", StepStatus.CACHED)
FAILED = StepEvent("builder", 2, 3, "RUN make", StepStatus.ERROR, 1.5, ("make: *** no rule",))
SUMMARY = BuildSummary("sha256:" + "a" * 64, "sha256:" + "c" * 64, steps_cached=1, steps_run=2, seconds=3.25)


def test_plain_shows_cached_and_failure_tail() -> None:
    out = io.StringIO()
    sink = PlainProgress(out)
    sink.step(CACHED)
    sink.step(FAILED)
    text = out.getvalue()
    assert "[builder 1/3] COPY . /src  CACHED" in text
    assert "[builder 2/3] RUN make  ERROR after 1.50s" in text
    assert "  > make: *** no rule" in text


def test_json_is_one_object_per_event_with_required_fields() -> None:
    out = io.StringIO()
    sink = JsonProgress(out)
    sink.step(CACHED)
    sink.step(RUN)
    sink.finish(SUMMARY)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["type"] for r in records] == ["step", "step", "summary"]
    first = records[0]
    assert first["stage"] == "builder"
    assert first["step"] == 1
    assert first["instruction"] == "COPY . /src"
    assert first["status"] == "cached"
    assert "seconds" in first
    assert records[2]["steps_cached"] == 1


def test_quiet_prints_only_failures() -> None:
    out = io.StringIO()
    sink = QuietProgress(out)
    sink.step(CACHED)
    sink.log("builder", 2, "compiling")
    sink.finish(SUMMARY)
    assert out.getvalue() == ""
    sink.step(FAILED)
    assert "ERROR" in out.getvalue()


def test_summary_line_names_image_id_and_manifest() -> None:
    # The image ID first, as `build -q` prints it; the manifest named as such (`lamina images`).
    assert SUMMARY.line() == (
        f"built image sha256:{'c' * 64} (manifest sha256:{'a' * 64}) in 3.25s: 1 step(s) cached, 2 run"
    )
    # a multi-platform build made an image index: its digest is named so
    index = dataclasses.replace(SUMMARY, config_digest=SUMMARY.image_digest, index=True)
    assert index.line().startswith(f"built image sha256:{'a' * 64} (index sha256:{'a' * 64}) in ")
    # an image left pending in the store (cache.store): only the ID, as docker's image store gives
    pending = dataclasses.replace(SUMMARY, image_digest="", pending=True)
    assert pending.line().startswith(f"built image sha256:{'c' * 64} (manifest made on first use) in ")


def test_auto_is_plain_when_not_a_terminal() -> None:
    assert isinstance(make_progress("auto", io.StringIO()), PlainProgress)


def test_a_running_step_says_why_in_plain_json_and_tty() -> None:
    import dataclasses

    why = "file content changed: src/a.txt"
    running = dataclasses.replace(RUN, reason=why)
    plain, js = io.StringIO(), io.StringIO()
    PlainProgress(plain).step(running)
    JsonProgress(js).step(running)
    JsonProgress(js).step(CACHED)
    assert plain.getvalue() == f"[builder 2/3] RUN make  ({why})\n"
    first, cached = (json.loads(line) for line in js.getvalue().splitlines())
    assert first["reason"] == why and "reason" not in cached

    from lamina.engine.progress import TtyProgress

    tty = io.StringIO()
    sink = TtyProgress(tty)
    sink.step(dataclasses.replace(running, status=StepStatus.DONE, seconds=0.5))
    sink.finish(None)
    assert f"[builder 2/3] RUN make 0.5s  ({why})" in tty.getvalue()


def test_labels_are_buildkits_vertex_names() -> None:
    # dockerfile2llb prefixCommand: the step right-aligned to the total's width; no stage name in
    # a one-stage Dockerfile (label ""), the platform alone when a one-stage build names it.
    import dataclasses

    from lamina.engine.progress import step_label

    assert step_label(RUN) == "[builder 2/3] RUN make"
    wide = dataclasses.replace(RUN, index=3, total=12)
    assert step_label(wide) == "[builder  3/12] RUN make"
    assert step_label(dataclasses.replace(RUN, label="")) == "[2/3] RUN make"
    assert step_label(dataclasses.replace(wide, label="linux/arm64")) == "[linux/arm64  3/12] RUN make"
