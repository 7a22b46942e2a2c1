"""A COPY's items, packed: what `Selection.items` holds (issue 22's memory goal).

A million-file context is a million items; as objects (a CopyItem, its
TreeEntry, their two paths and the stat key) each cost ~400 bytes, for the
whole build. Here items are kept in runs that share a source directory and
a destination directory (a directory walk makes such runs): per run the two
directory paths once, the names joined into one string, and one packed
record per item (`_RECORD`, 69 bytes: type, the entry's mode and owner, its
link count, the item's mode and owner, and the stat key, which holds the
size and mtime): ~80 bytes an item. Iterating makes each CopyItem (and its
TreeEntry) anew, equal to the one appended; a consumer holds only the ones
it is working on.

An item that does not fit a record (a symlink, a device, a socket, a name
that differs between source and destination, a stat key of another shape)
is kept as the object itself; there are few of them in a big context.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator

from lamina.engine.context import TreeEntry
from lamina.oci.entry import EntryType

__all__ = ["CopyItem", "Items"]

# type code (_ODD: the item is in the run's `odd`), entry mode, uid, gid, nlink,
# item mode, uid, gid, stat key (statcache.stat_key: dev, ino, size, mtime_ns, ctime_ns)
_RECORD = struct.Struct("<BHIIIHII40s")
_KEY = struct.Struct("<QQQqq")
_TYPES = (EntryType.FILE, EntryType.DIR)
_CODE = {kind: code for code, kind in enumerate(_TYPES)}
_ODD = 255
_FILE = _CODE[EntryType.FILE]
_BLANK = _RECORD.pack(_ODD, 0, 0, 0, 0, 0, 0, 0, b"")


@dataclasses.dataclass(slots=True)  # not frozen: one per source file, frozen's __init__ is 4x slower
class CopyItem:
    """One path to write: where it comes from and what it will be (read-only by convention)."""

    dest: str  # relative to the destination root, clean, never ""
    entry: TreeEntry  # the source (its `path` is in the source tree)
    mode: int
    uid: int
    gid: int


class _Run:
    """Items with one source directory and one destination directory, in order."""

    __slots__ = ("dest", "names", "odd", "records", "source")

    def __init__(self, source: str, dest: str) -> None:
        self.source = source
        self.dest = dest
        self.names: list[str] | str = []  # joined by "/" (never in a name) once sealed
        self.records: bytearray | bytes = bytearray()
        self.odd: dict[int, CopyItem] | None = None

    def seal(self) -> None:
        """Packed for good: one string and one bytes object (no spare capacity)."""
        if isinstance(self.names, list):
            self.names = "/".join(self.names)
            self.records = bytes(self.records)

    def __iter__(self) -> Iterator[CopyItem]:
        names = self.names.split("/") if isinstance(self.names, str) else self.names
        source = f"{self.source}/" if self.source else ""
        dest = f"{self.dest}/" if self.dest else ""
        odd = self.odd
        unpack = _KEY.unpack
        for at, (name, fields) in enumerate(zip(names, _RECORD.iter_unpack(self.records), strict=True)):
            code, mode, uid, gid, nlink, item_mode, item_uid, item_gid, key = fields
            if code == _ODD:
                assert odd is not None
                yield odd[at]
                continue
            _, _, size, mtime_ns, _ = unpack(key)
            kind = _TYPES[code]
            if kind is not EntryType.FILE:
                size = 0
            entry = TreeEntry(source + name, kind, mode, uid, gid, size, mtime_ns, "", 0, key, False, nlink)
            yield CopyItem(dest + name, entry, item_mode, item_uid, item_gid)


class Items:
    """The items of a selection in write order; `append` them, then iterate (see the
    module docstring). Not thread-safe while appending."""

    __slots__ = ("_count", "_open", "_runs")

    def __init__(self) -> None:
        self._runs: list[_Run] = []
        self._open: _Run | None = None  # the last run, still appended to
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[CopyItem]:
        for run in self._runs:
            yield from run

    def __contains__(self, item: object) -> bool:
        return any(mine == item for mine in self)

    def append(self, item: CopyItem) -> None:
        entry = item.entry
        source, _, name = entry.path.rpartition("/")
        dest, _, dest_name = item.dest.rpartition("/")
        run = self._open
        if run is None or run.source != source or run.dest != dest:
            if run is not None:
                run.seal()
            run = self._open = _Run(source, dest)
            self._runs.append(run)
        names, records = run.names, run.records
        assert isinstance(names, list) and isinstance(records, bytearray)
        record = _record(item, name, dest_name)
        if record is None:
            record = _BLANK
            if run.odd is None:
                run.odd = {}
            run.odd[len(names)] = item
            name = ""
        names.append(name)
        records += record
        self._count += 1

    def seal(self) -> None:
        """Appending is over: the last run packed too."""
        if self._open is not None:
            self._open.seal()
            self._open = None


def _record(item: CopyItem, name: str, dest_name: str) -> bytes | None:
    """The record of `item`, or None when iterating one would not give `item` back."""
    entry = item.entry
    code = _CODE.get(entry.type)
    key = entry.key
    if code is None or name != dest_name or entry.socket or entry.linkname or entry.rdev:
        return None
    if len(key) != _KEY.size:
        return None
    try:
        # the size and mtime iteration takes from the stat key
        if key[24:32] != entry.mtime_ns.to_bytes(8, "little", signed=True):
            return None
        if entry.size != (int.from_bytes(key[16:24], "little") if code == _FILE else 0):
            return None
        mode, uid, gid = entry.mode, entry.uid, entry.gid
        return _RECORD.pack(code, mode, uid, gid, entry.nlink, item.mode, item.uid, item.gid, key)
    except (struct.error, OverflowError):  # a mode or id past the record's fields
        return None
