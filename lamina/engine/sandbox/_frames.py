"""Several byte streams over one pipe: how one helper sends every layer blob of an image.

The writer side (inside the helper) prefixes each chunk with its length
and the number of its stream (4 bytes each, big-endian); an empty frame
ends that stream. Streams may interleave: the helper writes several layers
at once on threads, each through its own `FrameWriter` sharing one lock.
The reader side (the caller) is a file-like sink for the runner's pump
that routes each frame's bytes to its stream's output.
Imports only os, so the helper can use it without lamina's dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO, Protocol

_MAX = 1 << 20  # bytes per frame
_HEAD = 8  # length, stream


class _Lock(Protocol):
    def __enter__(self) -> object: ...

    def __exit__(self, *exc: object) -> object: ...


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class FrameWriter:
    """A write-only file on `fd` whose bytes arrive framed as stream `stream`; `next()` ends
    it (and goes on with the next stream). Writers on threads share `lock`: a frame is
    written whole under it."""

    def __init__(self, fd: int, stream: int = 0, lock: _Lock | None = None) -> None:
        self._fd = fd
        self._stream = stream
        self._lock = lock if lock is not None else _NoLock()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _MAX):
            part = view[start : start + _MAX]
            if part:
                self._frame(part)
        return len(view)

    def next(self) -> None:
        self._frame(memoryview(b""))
        self._stream += 1

    def flush(self) -> None:
        pass

    def _frame(self, part: memoryview) -> None:
        head = len(part).to_bytes(4, "big") + self._stream.to_bytes(4, "big")
        with self._lock:
            self._all(memoryview(head))
            self._all(part)

    def _all(self, view: memoryview) -> None:
        while view:
            view = view[self._write(view) :]

    def _write(self, view: memoryview) -> int:
        import os

        return os.write(self._fd, view)


class FrameReader:
    """The caller's side: `write()` takes the framed stream, each frame goes to its stream's output."""

    def __init__(self, outputs: Sequence[BinaryIO]) -> None:
        self._outputs = outputs
        self._ended = [False] * len(outputs)
        self._head = b""  # part of a frame header
        self._left = 0  # bytes of the current frame still to come
        self._stream = 0  # the current frame's stream

    @property
    def finished(self) -> int:
        """How many streams have ended."""
        return sum(self._ended)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            if self._left:
                part = view[: self._left]
                self._outputs[self._stream].write(part)
                self._left -= len(part)
                view = view[len(part) :]
                continue
            need = _HEAD - len(self._head)
            self._head += bytes(view[:need])
            view = view[need:]
            if len(self._head) < _HEAD:
                break
            self._left = int.from_bytes(self._head[:4], "big")
            self._stream = int.from_bytes(self._head[4:], "big")
            self._head = b""
            if self._stream >= len(self._outputs) or self._ended[self._stream]:
                raise ValueError("the helper sent more layers than asked for")
            if not self._left:
                self._ended[self._stream] = True
        return size

    def flush(self) -> None:
        pass
