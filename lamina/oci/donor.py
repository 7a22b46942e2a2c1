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

It also gives whole members (`same_files`, `take`: `walk.Holder`), so that
most of such a layer costs no Python per file. A member's bytes are a function
of the inode (type, mode, owner, mtime, size, xattrs, lamina's
`user.lamina.*` records as `recorded.restore` applies them), its path, the
hard-link choice (a file, or a link to the first path of its inode) and
SOURCE_DATE_EPOCH. A directory's regular file that the old layer dir lists at
the same name with the same inode number (`d_ino`, checked against `st_ino`
and the device once per directory, old and new) is that inode; the walk
gives each the link target it would write, and a member is taken only when
its path and its kind (a regular file where the walk writes one, a hard link
to that same target where it writes a link) agree. The epoch is the donor's
(engine.output picks a blob of the same one), and so is the id mapping: the
donor serves only where the caller's ids are read as they are (not inside a
helper's user namespace), as for the store's blob records, which map a layer
dir and epoch to one blob whoever wrote it. So a taken member is what the
walk would write, byte for byte: nothing about a file is trusted that the
old tar's writer did not itself derive from that same inode. That includes
the records: a rerun COPY's donor is the last run of that COPY, whose files
COPY wrote, not a RUN (whose upper dir is where a forged record could come
from, refused by sandbox._forged before any layer is written), and a
`user.lamina.*` record turns a member into what the walk makes of it (a
device placeholder is a device member, not a regular file one: not taken).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Sequence
from typing import BinaryIO, NamedTuple

from lamina.errors import LaminaError, LayerError
from lamina.oci.layer import BLOCK, entry_key

__all__ = ["DonorTar"]

_BUFFER = 1 << 20
_RUN = 1 << 20  # bytes of members taken at once (a bigger file is read by `opener`)


class _Member(NamedTuple):
    """A member's header, read; its content is next in the stream."""

    path: str
    typeflag: bytes
    size: int
    linkname: str  # a hard link's or symlink's target
    header: bytes | None  # every header block of it as read (None: one `take` refuses, a "g" before it)


class DonorTar:
    """An earlier layer's uncompressed tar (`stream`, written by `layer.write_layer` from
    the directory `root`), read forward once; `opener()` is what `walk.entries_from_tree`
    asks for each regular file. Closing it closes `stream`."""

    def __init__(self, stream: BinaryIO, root: str) -> None:
        self._stream = io.BufferedReader(stream, _BUFFER)  # type: ignore[arg-type]  # read forward in blocks
        self._root = root
        self._head: _Member | None = None
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

    def same_files(self, layer_dir: str, host_dir: str, regular: dict[str, int]) -> tuple[int, set[str]]:
        """`walk.Holder.same_files`: the names in `regular` (name -> d_ino of the regular
        files of the new layer's `host_dir`) whose inode the old layer dir holds at the same
        path as a regular file, and their device; none where that cannot be told from the
        listings (d_ino not st_ino, another device, a directory not there)."""
        if self._done and self._head is None:
            return 0, set()
        old_dir = os.path.join(self._root, layer_dir) if layer_dir else self._root
        try:
            with os.scandir(old_dir) as it:
                old = {dirent.name: dirent.inode() for dirent in it if dirent.is_file(follow_symlinks=False)}
            same = {name for name, _ in regular.items() & old.items()}
            if not same:
                return 0, same
            name = next(iter(same))
            was = os.lstat(os.path.join(old_dir, name))
            now = os.lstat(os.path.join(host_dir, name))
        except OSError:
            return 0, set()
        inode = regular[name]  # the old listing's too
        if not stat.S_ISREG(was.st_mode) or was.st_dev != now.st_dev or {was.st_ino, now.st_ino} != {inode}:
            return 0, set()
        return was.st_dev, same

    def take(self, paths: Sequence[str], links: Sequence[str], start: int) -> tuple[int, bytes]:
        """`walk.Holder.take`: the members of `paths[start:]` while each is what the walk
        would write (its path; a regular file where `links[i]` is the path itself, else a
        hard link to `links[i]`), up to about `_RUN` bytes; the reader is left at the first
        member not taken."""
        if self._done and self._head is None:
            return 0, b""
        taken: list[bytes] = []
        count = size = 0
        read = self._stream.read
        try:
            if not self._reach(paths[start]):
                return 0, b""
            for i in range(start, len(paths)):
                path = paths[i]
                if self._head is None and not self._done and links[i] == path:
                    # Most members are one ustar block, a regular file whose path fills the
                    # name field (lamina's writer leaves the prefix field empty): matched
                    # without parsing; any other is parsed.
                    block = read(BLOCK)
                    name = path.encode("utf-8", "surrogateescape")
                    end = len(name)
                    if (
                        len(block) == BLOCK
                        and end < 100
                        and block[156] == _REGULAR
                        and block[end] == 0
                        and block[345] == 0
                        and block.startswith(name)
                        and (member_size := int(block[124:135], 8)) <= _RUN
                    ):
                        padded = member_size + (-member_size % BLOCK)
                        taken += (block, self._read(padded))
                        count += 1
                        size += BLOCK + padded
                        if size >= _RUN:
                            break
                        continue
                    self._head = self._next_header(block)
                    self._done = self._head is None
                head = self._peek()
                if head is None or head.header is None or head.path != path:
                    break
                if links[i] == path:
                    if head.typeflag != b"0" or head.size > _RUN:
                        break
                elif head.typeflag != b"1" or head.linkname != links[i]:
                    break
                padded = head.size + (-head.size % BLOCK)
                taken += (head.header, self._read(padded))
                self._head = None
                count += 1
                size += len(head.header) + padded
                if size >= _RUN:
                    break
        except (OSError, ValueError, LaminaError):  # a damaged or vanished donor: files are read
            self._done, self._head = True, None
            return 0, b""
        return count, b"".join(taken)

    def _content(self, path: str, size: int) -> bytes | None:
        """Move past every member before `path`; a regular file member at `path` of `size`
        bytes gives its content (consumed), any other leaves the reader where it is."""
        if not self._reach(path):
            return None
        head = self._head
        assert head is not None  # `_reach` found it
        self._head = None
        if head.typeflag in (b"0", b"\0") and head.size == size:
            data = self._read(size)
            self._skip_padding(size)
            return data
        self._skip(head.size)
        return None

    def _reach(self, path: str) -> bool:
        """Move past every member before `path`: whether the next one is `path`'s (not consumed)."""
        key = None  # the sort key, made only when the paths differ (seldom: they go in step)
        while (head := self._peek()) is not None:
            if head.path == path:
                return True
            key = key or entry_key(path)
            if entry_key(head.path) > key:
                return False
            self._head = None
            self._skip(head.size)
        return False

    def _peek(self) -> _Member | None:
        if self._head is None and not self._done:
            self._head = self._next_header()
            self._done = self._head is None
        return self._head

    def _next_header(self, block: bytes = b"") -> _Member | None:
        """The next member's header, its content left to read; `block`, its first block if
        that was read already."""
        pax: dict[bytes, bytes] = {}
        blocks: list[bytes] | None = []
        while True:
            block = block or self._stream.read(BLOCK)
            if len(block) < BLOCK or block == _ZEROS:
                return None  # the end of the archive
            typeflag = block[156:157]
            size = _octal(block[124:136])
            if typeflag == b"x":
                data = self._read(size + (-size % BLOCK))
                pax = _pax_records(data[:size])
                if blocks is not None:
                    blocks += (block, data)
                block = b""
                continue
            if typeflag == b"g":
                self._skip(size)
                blocks = None  # no writer of lamina's makes one: not a member to take as it is
                block = b""
                continue
            name = pax.get(b"path") or _cstring(block[0:100])
            prefix = _cstring(block[345:500])
            if b"path" not in pax and prefix:
                name = prefix + b"/" + name
            if b"size" in pax:
                size = int(pax[b"size"])
            linkname = b""
            if typeflag in (b"1", b"2"):
                linkname = pax.get(b"linkpath") or _cstring(block[157:257])
            if blocks is not None:
                blocks.append(block)
            return _Member(
                name.decode("utf-8", "surrogateescape").rstrip("/"),
                typeflag,
                size,
                linkname.decode("utf-8", "surrogateescape"),
                None if blocks is None else b"".join(blocks),
            )

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


_ZEROS = bytes(BLOCK)
_REGULAR = ord("0")  # a regular file's typeflag


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
