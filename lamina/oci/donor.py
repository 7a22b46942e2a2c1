"""Content for a new layer's files from an earlier layer's tar (a COPY rerun after a small change).

A COPY that reruns hard-links each unchanged file from its last run's layer
directory (steps/copyadd/placement.py), so the new layer directory and the
old one share those inodes. The old layer's blob already holds each such
file's bytes: `DonorTar` reads that tar forward, in the layer writer's
order (`layer.entry_key`), and hands the writer a member's content when the
new layer's file at the same path is the very inode the old tar was written
from. The new blob is then the bytes a full read would give, by construction
(a published layer directory never changes), with one `lstat` per unchanged
file instead of opening and reading it.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from typing import BinaryIO

from lamina.errors import LaminaError, LayerError
from lamina.oci.layer import BLOCK, entry_key

__all__ = ["DonorTar"]

_BUFFER = 1 << 20


class DonorTar:
    """An earlier layer's uncompressed tar (`stream`, written by `layer.write_layer` from
    the directory `root`), read forward once; `opener()` is what `walk.entries_from_tree`
    asks for each regular file. Closing it closes `stream`."""

    def __init__(self, stream: BinaryIO, root: str) -> None:
        self._stream = io.BufferedReader(stream, _BUFFER)  # type: ignore[arg-type]  # read forward in blocks
        self._root = root
        self._head: tuple[str, bytes, int] | None = None  # path, typeflag, size
        self._done = False
        self.reused = 0  # files whose content came from here

    def close(self) -> None:
        self._stream.close()

    def opener(self, layer_path: str, st: os.stat_result) -> Callable[[], BinaryIO] | None:
        """The content of the file at `layer_path` (lstat `st`) from the old tar, if it is
        the same inode the old layer holds there; None to read it from disk."""
        if self._done and self._head is None:
            return None
        try:
            data = self._content(layer_path, st.st_size)
        except (OSError, LaminaError):  # a damaged or vanished donor: the files are read from disk
            self._done, self._head = True, None
            return None
        if data is None:
            return None
        try:
            old = os.lstat(os.path.join(self._root, layer_path))
        except OSError:
            return None
        if not stat.S_ISREG(old.st_mode) or (old.st_dev, old.st_ino) != (st.st_dev, st.st_ino):
            return None
        self.reused += 1
        return lambda: io.BytesIO(data)

    def _content(self, path: str, size: int) -> bytes | None:
        """Move past every member before `path`; a regular file member at `path` of `size`
        bytes gives its content (consumed), any other leaves the reader where it is."""
        key = None  # the sort key, made only when the paths differ (seldom: they go in step)
        while True:
            head = self._peek()
            if head is None:
                return None
            member, typeflag, member_size = head
            same = member == path
            if not same:
                key = key or entry_key(path)
                if entry_key(member) > key:
                    return None
            self._head = None
            if same and typeflag in (b"0", b"\0") and member_size == size:
                data = self._read(size)
                self._skip_padding(size)
                return data
            self._skip(member_size)
            if same:
                return None

    def _peek(self) -> tuple[str, bytes, int] | None:
        if self._head is None and not self._done:
            self._head = self._next_header()
            self._done = self._head is None
        return self._head

    def _next_header(self) -> tuple[str, bytes, int] | None:
        """The next member's (path, typeflag, size), its content left to read."""
        pax: dict[bytes, bytes] = {}
        while True:
            block = self._stream.read(BLOCK)
            if len(block) < BLOCK or block == bytes(BLOCK):
                return None  # the end of the archive
            typeflag = block[156:157]
            size = _octal(block[124:136])
            if typeflag == b"x":
                pax = _pax_records(self._read(size))
                self._skip_padding(size)
                continue
            if typeflag == b"g":
                self._skip(size)
                continue
            name = pax.get(b"path") or _cstring(block[0:100])
            prefix = _cstring(block[345:500])
            if b"path" not in pax and prefix:
                name = prefix + b"/" + name
            if b"size" in pax:
                size = int(pax[b"size"])
            path = name.decode("utf-8", "surrogateescape").rstrip("/")
            return path, typeflag, size

    def _read(self, size: int) -> bytes:
        data = self._stream.read(size)
        if len(data) != size:
            raise LayerError("the earlier layer's tar ends inside a member")
        return data

    def _skip(self, size: int) -> None:
        remaining = size + (-size % BLOCK)
        while remaining:
            chunk = self._stream.read(min(remaining, _BUFFER))
            if not chunk:
                raise LayerError("the earlier layer's tar ends inside a member")
            remaining -= len(chunk)

    def _skip_padding(self, size: int) -> None:
        if size % BLOCK:
            self._stream.read(-size % BLOCK)


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _cstring(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    at = 0
    while at < len(data):
        space = data.index(b" ", at)
        length = int(data[at:space])
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        records[key] = value
        at += length
    return records
