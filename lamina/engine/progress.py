"""Build progress: typed step events and the sinks that show them.

The executor emits `StepEvent`s to a `ProgressSink` it is given; the CLI
picks the sink from `--progress`. Sinks never raise into the build.

    plain   one log line per event, like BuildKit's `--progress=plain`
    json    one JSON object per line per event
    rawjson BuildKit's SolveStatus documents, as buildx prints them (progress_raw)
    tty     a live view of the stages and their steps (rich), falls back
            to plain when stderr is not a terminal
    quiet   nothing but errors
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import threading
from collections.abc import Sequence
from typing import Any, Protocol, TextIO, runtime_checkable


class StepStatus(enum.Enum):
    CACHED = "cached"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"


@dataclasses.dataclass(frozen=True, slots=True)
class StepEvent:
    stage: str  # the stage's name, or its index as text when it has none
    index: int  # 1-based step number within the stage
    total: int  # steps in the stage
    instruction: str  # the instruction as the user wrote it (one line)
    status: StepStatus
    seconds: float = 0.0
    output_tail: tuple[str, ...] = ()  # last lines of a failing step
    reason: str = ""  # why a step runs (cachekey.explain_miss); "" when cached
    # How the label names the stage when not as `stage`: "" in a one-stage Dockerfile (BuildKit
    # then names none: `[2/2] RUN ...`), `linux/arm64` for its platform alone.
    label: str | None = None

    def vertex_name(self) -> str:
        """BuildKit's vertex name (dockerfile2llb prefixCommand): the stage (none in a one-stage
        Dockerfile), the step right-aligned to the width of the total: `[build  3/12] RUN make`."""
        stage = self.stage if self.label is None else self.label
        width = len(str(self.total))
        return f"[{stage}{' ' if stage else ''}{self.index:>{width}}/{self.total}] {self.instruction}"


@dataclasses.dataclass(frozen=True, slots=True)
class BuildSummary:
    image_digest: str  # manifest digest of the target, "" when nothing was exported
    config_digest: str  # the image ID (what `build -q` and --iidfile give), "" likewise
    steps_cached: int
    steps_run: int
    seconds: float
    index: bool = False  # image_digest is an image index's (a multi-platform build), not a manifest's
    pending: bool = False  # the manifest is made on first use (image_digest is "")

    def line(self) -> str:
        # Both digests, each named: the image ID as docker's "writing image" and `-q` show it,
        # the manifest (or index) as `lamina images` and a registry show it.
        what = "(no image)"
        if self.config_digest and self.pending:  # docker's moby exporter too names only the ID
            what = f"image {self.config_digest} (manifest made on first use)"
        elif self.config_digest:
            kind = "index" if self.index else "manifest"
            what = f"image {self.config_digest} ({kind} {self.image_digest})"
        return (
            f"built {what} in {self.seconds:.2f}s: {self.steps_cached} step(s) cached, {self.steps_run} run"
        )


class ProgressSink(Protocol):
    def step(self, event: StepEvent) -> None: ...

    def log(self, stage: str, index: int, line: str) -> None:
        """One line of a running step's output."""

    def warn(self, message: str) -> None: ...

    def finish(self, summary: BuildSummary | None) -> None: ...


@runtime_checkable
class CheckSink(Protocol):
    """A sink that shows a build check's warning with its rule, link and lines (json, rawjson).

    `warning` is an engine.dockerfile.checks.CheckWarning; other sinks get its `short()` by warn().
    """

    def check(self, warning: Any) -> None: ...


@runtime_checkable
class ContextSink(Protocol):
    """A sink that shows the hashing of a big build context (tty), as BuildKit's
    "transferring context" line: files hashed of those to hash, and their bytes."""

    def context_progress(self, files_done: int, files_total: int, bytes_done: int) -> None: ...


def context_line(files_done: int, files_total: int, bytes_done: int) -> str:
    """`[internal] load build context: 1,234/100,000 files hashed, 1.2 MB`."""
    return (
        f"[internal] load build context: {files_done:,}/{files_total:,} files hashed,"
        f" {bytes_done / 1e6:.1f} MB"
    )


def step_label(event: StepEvent) -> str:
    return event.vertex_name()


_label = step_label


class PlainProgress:
    """One line per event on a text stream; output lines prefixed with the step."""

    def __init__(self, stream: TextIO | None = None, *, show_output: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._show_output = show_output
        self._lock = threading.Lock()  # stages run concurrently

    def _write(self, text: str) -> None:
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def step(self, event: StepEvent) -> None:
        if event.status is StepStatus.CACHED:
            self._write(f"{_label(event)}  CACHED")
        elif event.status is StepStatus.RUNNING:
            self._write(f"{_label(event)}  ({event.reason})" if event.reason else _label(event))
        elif event.status is StepStatus.DONE:
            self._write(f"{_label(event)}  DONE {event.seconds:.2f}s")
        else:
            self._write(f"{_label(event)}  ERROR after {event.seconds:.2f}s")
            for line in event.output_tail:
                self._write(f"  > {line}")

    def log(self, stage: str, index: int, line: str) -> None:
        if self._show_output:
            self._write(f"[{stage} {index}] {line}")

    def warn(self, message: str) -> None:
        self._write(f"warning: {message}")

    def finish(self, summary: BuildSummary | None) -> None:
        if summary is not None:
            self._write(summary.line())


class QuietProgress(PlainProgress):
    """Only warnings and the failing step's output."""

    def step(self, event: StepEvent) -> None:
        if event.status is StepStatus.ERROR:
            super().step(event)

    def log(self, stage: str, index: int, line: str) -> None:
        pass

    def finish(self, summary: BuildSummary | None) -> None:
        pass


class JsonProgress:
    """One JSON object per line per event, for tools that watch a build."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()

    def _emit(self, record: dict[str, object]) -> None:
        with self._lock:
            self._stream.write(json.dumps(record, sort_keys=True) + "\n")
            self._stream.flush()

    def step(self, event: StepEvent) -> None:
        record: dict[str, object] = {
            "type": "step",
            "stage": event.stage,
            "step": event.index,
            "total": event.total,
            "instruction": event.instruction,
            "status": event.status.value,
            "seconds": round(event.seconds, 3),
        }
        if event.output_tail:
            record["output_tail"] = list(event.output_tail)
        if event.reason:
            record["reason"] = event.reason
        self._emit(record)

    def log(self, stage: str, index: int, line: str) -> None:
        self._emit({"type": "log", "stage": stage, "step": index, "line": line})

    def warn(self, message: str) -> None:
        self._emit({"type": "warning", "message": message})

    def check(self, warning: Any) -> None:
        self._emit(
            {
                "type": "warning",
                "message": warning.short(),
                "rule": warning.rule,
                "detail": warning.detail,
                "url": warning.url,
                "line": warning.start_line,
                "end_line": warning.end_line,
            }
        )

    def finish(self, summary: BuildSummary | None) -> None:
        if summary is not None:
            self._emit({"type": "summary", **dataclasses.asdict(summary)})


class TtyProgress:
    """A live view: one line per step, updated in place (rich)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console(file=stream if stream is not None else sys.stderr)
        self._lines: dict[tuple[str, int], StepEvent] = {}
        self._tail: dict[tuple[str, int], str] = {}
        self._context: tuple[int, int, int] | None = None  # the last context_progress
        self._lock = threading.Lock()
        self._live = Live(console=self._console, refresh_per_second=8, transient=False)
        self._live.start()

    def _render(self) -> object:
        from rich.text import Text

        text = Text()
        if self._context is not None:
            files_done, files_total, _ = self._context
            text.append(f"{context_line(*self._context)} ")
            if files_done < files_total:
                text.append("...", style="yellow")
            else:
                text.append("done", style="green")
            text.append("\n")
        for key, event in self._lines.items():
            status = {
                StepStatus.CACHED: ("CACHED", "cyan"),
                StepStatus.RUNNING: ("...", "yellow"),
                StepStatus.DONE: (f"{event.seconds:.1f}s", "green"),
                StepStatus.ERROR: ("ERROR", "bold red"),
            }[event.status]
            text.append(f"{_label(event)} ")
            text.append(status[0], style=status[1])
            if event.reason and event.status is not StepStatus.CACHED:
                text.append(f"  ({event.reason})", style="dim")
            text.append("\n")
            if event.status is StepStatus.RUNNING and key in self._tail:
                text.append(f"  {self._tail[key][:120]}\n", style="dim")
            for line in event.output_tail:
                text.append(f"  > {line}\n", style="red")
        return text

    def step(self, event: StepEvent) -> None:
        with self._lock:
            self._lines[(event.stage, event.index)] = event
            self._live.update(self._render())

    def log(self, stage: str, index: int, line: str) -> None:
        with self._lock:
            self._tail[(stage, index)] = line
            self._live.update(self._render())

    def context_progress(self, files_done: int, files_total: int, bytes_done: int) -> None:
        with self._lock:
            self._context = (files_done, files_total, bytes_done)
            self._live.update(self._render())

    def warn(self, message: str) -> None:
        with self._lock:
            self._console.print(f"[yellow]warning:[/] {message}")

    def finish(self, summary: BuildSummary | None) -> None:
        with self._lock:
            self._live.stop()
        if summary is not None:
            self._console.print(summary.line())


PROGRESS_MODES: Sequence[str] = ("auto", "tty", "plain", "json", "quiet")


def make_progress(mode: str, stream: TextIO | None = None) -> ProgressSink:
    """The sink for a `--progress` value; `auto` is tty on a terminal, else plain."""
    target = stream if stream is not None else sys.stderr
    if mode == "auto":
        mode = "tty" if target.isatty() else "plain"
    if mode == "tty":
        return TtyProgress(target)
    if mode == "plain":
        return PlainProgress(target)
    if mode == "json":
        return JsonProgress(target)
    if mode == "quiet":
        return QuietProgress(target)
    if mode == "rawjson":  # buildx's raw BuildKit status stream
        from lamina.engine.progress_raw import RawJsonProgress

        return RawJsonProgress(target)
    raise ValueError(f"unknown progress mode {mode!r}")
