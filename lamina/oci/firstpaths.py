"""A tree walk's hard-link table: (device, inode) -> the first path met with that inode.

A COPY that reruns links every unchanged file from its last layer, so each
of a million files has two links and must be entered here (issue 22). A
dict of tuple keys to path strings costs ~200 bytes an entry; here an entry
is a row of a `PackedTable` per device (inode -> ordinal, ~20 bytes) and
its path's name in one joined string per directory (the prefix once).
A path is rebuilt only when a later link asks for it.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right
from collections.abc import Sequence

from lamina.packedtable import PackedTable

__all__ = ["FirstPaths"]

_INODE = struct.Struct("<Q")
_ORDINAL = struct.Struct("<I")


class FirstPaths:
    """The first path of each inode entered; see the module docstring."""

    __slots__ = ("_count", "_groups", "_starts", "_tables")

    def __init__(self) -> None:
        self._tables: dict[int, PackedTable] = {}
        # Each group of entered paths: (prefix, its names joined by NUL), and the ordinal of
        # its first name in `_starts`.
        self._groups: list[tuple[str, str]] = []
        self._starts = array("Q")
        self._count = 0  # paths entered

    def first(self, device: int, inode: int, path: str) -> str:
        """The first path entered for this inode; `path`, entered now, when it is new."""
        return self.firsts(device, "", [(path, inode)])[0]

    def firsts(self, device: int, prefix: str, files: Sequence[tuple[str, int]]) -> list[str]:
        """`first` for each (name, inode) of `files` in order, their paths `prefix + name`."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = PackedTable(_INODE.size, _ORDINAL.size)
        start = self._count
        found: list[str] = []
        names: list[str] = []
        pack, ordinal, enter = _INODE.pack, _ORDINAL.pack, table.setdefault
        for name, inode in files:
            new = len(table)
            row = enter(pack(inode), ordinal(start + len(names)))
            if row < new:  # entered before: a hard link
                found.append(self._path(_ORDINAL.unpack(table.value(row))[0], prefix, names, start))
                continue
            names.append(name)
            found.append(prefix + name)
        if names:
            self._groups.append((prefix, "\0".join(names)))
            self._starts.append(start)
            self._count += len(names)
        return found

    def _path(self, ordinal: int, prefix: str, pending: list[str], start: int) -> str:
        """The path of `ordinal`: an earlier group's, or one of `pending` (this group's so far)."""
        if ordinal >= start:
            return prefix + pending[ordinal - start]
        at = bisect_right(self._starts, ordinal) - 1
        group_prefix, joined = self._groups[at]
        return group_prefix + joined.split("\0")[ordinal - self._starts[at]]
