"""One entry of a layer: the value that layer writers consume and readers yield.

A snapshot (overlay upper dir, copy-and-compare diff), a directory walk and
a tar reader all produce `LayerEntry` values; the layer writer turns a
sorted sequence of them into a tar stream. Whiteouts are already in OCI form
here (`.wh.NAME`, `.wh..wh..opq` as empty regular files).
"""

from __future__ import annotations

import dataclasses
import enum
import stat
from collections.abc import Callable
from typing import BinaryIO


class EntryType(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"  # `linkname` is another path in the same layer
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


_MODE_TYPES = {
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFCHR: EntryType.CHAR,
    stat.S_IFBLK: EntryType.BLOCK,
    stat.S_IFIFO: EntryType.FIFO,
}


def type_of_mode(st_mode: int) -> EntryType | None:
    """The entry type of a stat mode; None for a socket, which no layer holds."""
    return _MODE_TYPES.get(stat.S_IFMT(st_mode))


@dataclasses.dataclass(frozen=True, slots=True)
class LayerEntry:
    path: str  # relative, '/'-separated, no leading '/' or './', no trailing '/'
    type: EntryType
    mode: int = 0o644  # permission bits incl. setuid/setgid/sticky, no type bits
    uid: int = 0
    gid: int = 0
    size: int = 0  # bytes of content for FILE, else 0
    mtime: int = 0  # seconds since the epoch
    linkname: str = ""  # symlink target, or hardlink target path
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()  # sorted by name
    # A fresh reader of exactly `size` bytes, for FILE entries.
    open: Callable[[], BinaryIO] | None = dataclasses.field(default=None, compare=False)
    # Whether a later HARDLINK of the same layer may name this FILE: False where its maker
    # knows none will (a walk's file of one link), so the writer need not remember its path.
    linkable: bool = dataclasses.field(default=True, compare=False)


@dataclasses.dataclass(frozen=True, slots=True)
class Verbatim:
    """Consecutive whole tar members taken as they are from an earlier layer's tar
    (`oci.donor`): the entries `first` to `last`, which a walk would encode as exactly
    `data` (headers, content and padding). `files` are those of them that are regular
    files, which later hard links of the same layer may name, in order, joined by NUL
    (one string, not a string each: a rerun COPY's layer has a million of them)."""

    first: str
    last: str
    files: str
    data: bytes
