"""What a COPY wrote, kept on disk for its next run (issue 22's memory goal).

A rebuild after a small change hard-links the files the last run of the
same COPY wrote (`placement`), so it needs, for each destination path, the
record of the file written there (`WRITTEN`). A 1,000,000-file COPY writes
a million of them: they are never held as objects, nor as one string.

- While the copy runs, `placement.Written` compresses each record as it is
  made and spools the stream to a file under the store's `copies/`.
- `keep` names that file after the COPY's position (`where`, one file per
  position, replaced by each run) and the layer directory it describes.
- The next run `load`s it a chunk at a time into a `PriorFiles` table keyed
  by an 8-byte hash of the destination, each row a 16-byte hash of what the
  file held (digest, mode, owner, mtime, size) beside its inode and flags
  (~45 bytes a file with the index, where the whole records took ~100, a
  dict of paths and records ~220, and the base64 text of the stream three
  transient copies of it).

Two destinations whose hashes collide would only cost a copy: a record is
trusted only for the file whose inode, size, mtime, mode, owner and digest
it names (`placement._Writer.link_prior`), at the destination's own path.

A record also says whether its file's source had other hard links (`IN_GROUP`):
only such a file can be one inode under several destinations of the layer, and
the next run links one of those inodes for one hard-linked source (or one
destination) alone, so that a link broken in the context (`cp -p a b.new &&
mv b.new b`: same bytes, mode and times) is broken in the layer too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from lamina.packedtable import PackedTable

__all__ = [
    "DIR_NAME",
    "FORMAT",
    "HAS_XATTRS",
    "IN_GROUP",
    "WRITTEN",
    "PriorFiles",
    "encode",
    "keep",
    "load",
    "read_written",
    "spool_dir",
]

DIR_NAME = "copies"
# A plain file a copy wrote: sha256 of its bytes, mode, uid, gid, mtime_ns, size, its
# inode on disk, flags (HAS_XATTRS, IN_GROUP). In a copy's stream each follows its
# destination path (`_DEST`: the length of the UTF-8 path, then the path).
WRITTEN = struct.Struct("<32sIIIqQQB")
HAS_XATTRS = 1  # it was given xattrs
IN_GROUP = 2  # its source had other hard links (st_nlink > 1): its inode may be at other destinations
# What the step's cache record names (`format`) for streams of these records: one written
# before IN_GROUP (which says nothing of hard links) is not used.
FORMAT = 2
_DEST = struct.Struct("<H")
SAME = WRITTEN.size - 9  # the part of a record that says what the file holds (not where)
# Bytes of blake2b naming a destination in the table (two that collide cost a copy: the
# inode a record names is checked at the destination's own path), and of a record's `SAME`.
_HASH = 8
_FIELDS_HASH = 16
_CHUNK = 1 << 20  # compressed bytes read at a time
_DAYS = 30  # files of COPY positions not built for this long are removed


def encode(dest: str, record: bytes) -> bytes:
    """One destination and its `WRITTEN` record, as a copy's stream holds them."""
    name = dest.encode("utf-8", "surrogateescape")
    return _DEST.pack(len(name)) + name + record


def _name_key(dest: str) -> bytes:
    return hashlib.blake2b(dest.encode("utf-8", "surrogateescape"), digest_size=_HASH).digest()


def _fields_key(record: bytes) -> bytes:
    return hashlib.blake2b(record[:SAME], digest_size=_FIELDS_HASH).digest()


class PriorFiles:
    """The `WRITTEN` record of each destination (the last one a stream gave for it), held
    as a hash of what its file holds (`SAME`) beside its inode and flags: 33 bytes a row."""

    __slots__ = ("_table",)

    def __init__(self) -> None:
        self._table = PackedTable(_HASH, _FIELDS_HASH + WRITTEN.size - SAME)

    def __len__(self) -> int:
        return len(self._table)

    def get(self, dest: str, wanted: bytes) -> bytes | None:
        """The record of `dest` when the file written there held what `wanted` (a `WRITTEN`
        record, inode and flags aside) says, with that file's inode and flags; else None."""
        row = self._table.get(_name_key(dest))
        if row is None or row[:_FIELDS_HASH] != _fields_key(wanted):
            return None
        return wanted[:SAME] + row[_FIELDS_HASH:]

    def add(self, dest: str, record: bytes) -> None:
        self._table.add(_name_key(dest), _fields_key(record) + record[SAME:])


def read_written(chunks: Iterable[bytes]) -> PriorFiles:
    """The records of a copy's (decompressed) stream, given in chunks cut anywhere.

    Raises ValueError for a torn record."""
    files = PriorFiles()
    size, head = WRITTEN.size, _DEST.size
    pending = b""
    for chunk in chunks:
        data = pending + chunk if pending else chunk
        at, end = 0, len(data)
        while at + head <= end:
            (length,) = _DEST.unpack_from(data, at)
            stop = at + head + length + size
            if stop > end:
                break
            dest = data[at + head : at + head + length].decode("utf-8", "surrogateescape")
            files.add(dest, data[stop - size : stop])
            at = stop
        pending = data[at:]
    if pending:
        raise ValueError("torn record of a copy")
    return files


def spool_dir(store_root: Path) -> Path:
    """Where a running copy spools its records (the store's file system: renamed, not copied)."""
    return store_root / DIR_NAME


def _path(store_root: Path, where: str, dir_id: str) -> Path:
    position = hashlib.sha256(where.encode()).hexdigest()[:32]
    return store_root / DIR_NAME / f"{position}-{dir_id}.bin"


def load(store_root: Path, where: str, dir_id: str) -> PriorFiles | None:
    """What the run of the COPY at `where` that made layer dir `dir_id` wrote; None when
    its file is gone or torn (the copy then writes every file)."""
    path = _path(store_root, where, dir_id)
    try:
        with open(path, "rb") as f:
            with contextlib.suppress(OSError):
                os.utime(f.fileno())  # in use: not one to forget
            return read_written(_inflate(f))
    except (OSError, ValueError, zlib.error):
        return None


def _inflate(f: object) -> Iterable[bytes]:
    inflate = zlib.decompressobj()
    read = f.read  # type: ignore[attr-defined]
    while chunk := read(_CHUNK):
        yield inflate.decompress(chunk)
    yield inflate.flush()
    if not inflate.eof:
        raise ValueError("truncated record of a copy")


def keep(spooled: Path, store_root: Path, where: str, dir_id: str) -> None:
    """Name the spooled stream of a finished copy (replacing the position's older ones)."""
    path = _path(store_root, where, dir_id)
    os.replace(spooled, path)
    prefix = path.name.partition("-")[0] + "-"
    cutoff = time.time() - _DAYS * 86400
    with os.scandir(path.parent) as it:
        for entry in it:
            older = entry.name.startswith(prefix) and entry.name != path.name
            stale = not older and entry.stat(follow_symlinks=False).st_mtime < cutoff  # or a crashed spool
            if older or stale:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
