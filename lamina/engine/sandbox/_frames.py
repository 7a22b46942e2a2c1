"""Several byte streams over one pipe: how one helper sends every layer blob of an image.

The writer side (inside the helper) prefixes each chunk with its length
(4 bytes, big-endian); an empty frame ends the current stream and starts
the next. The reader side (the caller) is a file-like sink for the
runner's pump that routes the bytes to one output per stream, in order.
Imports only os, so the helper can use it without lamina's dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

_MAX = 1 << 20  # bytes per frame


class FrameWriter:
    """A write-only file on `fd` whose bytes arrive framed; `next()` ends a stream."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _MAX):
            part = view[start : start + _MAX]
            if part:
                self._all(len(part).to_bytes(4, "big"))
                self._all(part)
        return len(view)

    def next(self) -> None:
        self._all(b"\0\0\0\0")

    def flush(self) -> None:
        pass

    def _all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[self._write(view) :]

    def _write(self, view: memoryview) -> int:
        import os

        return os.write(self._fd, view)


class FrameReader:
    """The caller's side: `write()` takes the framed stream, each stream goes to its output in turn."""

    def __init__(self, outputs: Sequence[BinaryIO]) -> None:
        self._outputs = outputs
        self._index = 0  # the stream being received
        self._head = b""  # part of a length prefix
        self._left = 0  # bytes of the current frame still to come

    @property
    def finished(self) -> int:
        """How many streams have ended."""
        return self._index

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            if self._left:
                part = view[: self._left]
                if self._index >= len(self._outputs):
                    raise ValueError("the helper sent more layers than asked for")
                self._outputs[self._index].write(part)
                self._left -= len(part)
                view = view[len(part) :]
                continue
            need = 4 - len(self._head)
            self._head += bytes(view[:need])
            view = view[need:]
            if len(self._head) < 4:
                break
            self._left = int.from_bytes(self._head, "big")
            self._head = b""
            if not self._left:
                self._index += 1
        return size

    def flush(self) -> None:
        pass
