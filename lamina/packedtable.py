"""Fixed-size keys to fixed-size values, packed: one bytearray of rows and an index.

A dict of a million bytes keys and values holds two objects and a slot per
entry (~230 bytes with a set beside it); a big build context has a million
files (issue 22). Here a row is the key's bytes followed by the value's, all
rows in one bytearray, and an open-addressing table of row numbers
(`array('I')`, at most half full: ~10 bytes an entry) finds a key: a row
costs its own bytes plus about ten.

Rows are only ever appended. Adding a key that is there already appends a
row that supersedes the old one (`find` reaches the newest first); the old
row stays, so a caller writing rows out keeps the order it saw and `latest`
says which row is current. Lookups hash the key with Python's `hash` of
bytes: a table lives in one process, whose hash seed never changes.

Stdlib only, at the package's top (as `errors`): the cache's stat table, a
COPY's prior records and the layer walk's hard-link table (`oci/`, which
imports nothing of the cache) all use it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

__all__ = ["PackedTable"]

_MIN_SLOTS = 16


class PackedTable:
    """Rows of `key_size` + `value_size` bytes; see the module docstring. Not thread-safe
    for writers: callers serialise `add` and `set_value` (readers may run beside them only
    when no row is being added)."""

    __slots__ = ("_index", "_last", "key_size", "row_size", "rows")

    def __init__(self, key_size: int, value_size: int, rows: bytearray | None = None) -> None:
        """`rows`: packed rows to start from, kept as the table's own (a torn last row
        is dropped), later ones superseding earlier ones of the same key."""
        self.key_size = key_size
        self.row_size = key_size + value_size
        self.rows = rows if rows is not None else bytearray()
        del self.rows[len(self.rows) - len(self.rows) % self.row_size :]
        # The index and its mask in one attribute: a reader in another thread sees both
        # old or both new, never one of each.
        self._index: tuple[array[int], int] = (array("I"), 0)
        # The last key found (the very object) and its row: a copy asks about one file's
        # key two or three times in a row (its digest, its xattrs, its record).
        self._last: tuple[bytes | None, int] = (None, -1)
        self._reindex(len(self))

    def __len__(self) -> int:
        """Rows held, superseded ones included."""
        return len(self.rows) // self.row_size

    def _reindex(self, count: int) -> None:
        """A new index with room for `count` rows at most half full, every row entered,
        the newest first (so that a key's newest row is the one its probe meets first)."""
        slots = _MIN_SLOTS
        while slots < 2 * count:
            slots *= 2
        index = array("I", bytes(4 * slots))
        mask = slots - 1
        rows, size, cut = self.rows, self.row_size, self.key_size
        for row in range(len(self) - 1, -1, -1):  # a loop, not a function call per row
            at = row * size
            slot = hash(bytes(rows[at : at + cut])) & mask
            while index[slot]:
                slot = (slot + 1) & mask
            index[slot] = row + 1  # 0 marks an empty slot
        self._index = (index, mask)

    def find(self, key: bytes) -> int:
        """The newest row of `key`, or -1."""
        last = self._last
        if last[0] is key:
            return last[1]
        (index, mask), rows, size = self._index, self.rows, self.row_size
        slot = hash(key) & mask
        while True:
            row = index[slot]
            if not row:
                return -1
            if rows.startswith(key, (row - 1) * size):
                self._last = (key, row - 1)  # until the next add
                return row - 1
            slot = (slot + 1) & mask

    def get(self, key: bytes) -> bytes | None:
        """The value of `key`'s newest row, or None."""
        row = self.find(key)
        return None if row < 0 else self.value(row)

    def value(self, row: int) -> bytes:
        at = row * self.row_size
        return bytes(self.rows[at + self.key_size : at + self.row_size])

    def key(self, row: int) -> bytes:
        at = row * self.row_size
        return bytes(self.rows[at : at + self.key_size])

    def latest(self, row: int) -> bool:
        """Whether `row` is its key's newest."""
        return self.find(self.key(row)) == row

    def add(self, key: bytes, value: bytes) -> int:
        """Append a row (superseding any of the same key); its number."""
        slot, _ = self._probe(key, value)
        return self._append(key, value, slot)  # the old row's slot, if any, names the new row

    def setdefault(self, key: bytes, value: bytes) -> int:
        """The newest row of `key`; when it has none, a new row of `key` and `value` (its
        number is then the table's length before the call). One probe where `find`
        then `add` make two."""
        slot, found = self._probe(key, value)
        return found - 1 if found else self._append(key, value, slot)

    def _probe(self, key: bytes, value: bytes) -> tuple[int, int]:
        """The index slot of `key`'s newest row, or of the empty slot its probe ends at, and
        what the slot holds (row + 1, or 0); `value` is only checked for its length."""
        if len(key) != self.key_size or len(key) + len(value) != self.row_size:
            raise ValueError(f"a row is {self.key_size} + {self.row_size - self.key_size} bytes")
        (index, mask), rows, size = self._index, self.rows, self.row_size
        slot = hash(key) & mask
        while found := index[slot]:
            if rows.startswith(key, (found - 1) * size):
                return slot, found
            slot = (slot + 1) & mask
        return slot, 0

    def _append(self, key: bytes, value: bytes, slot: int) -> int:
        """Append a row, entered at `slot` (from `_probe`) or by a new index; its number."""
        row = len(self)
        self.rows += key + value
        self._last = (None, -1)
        index = self._index[0]
        if 2 * (row + 1) > len(index):
            self._reindex(2 * (row + 1))  # doubling: each row re-entered O(1) times on average
        else:
            index[slot] = row + 1
        return row

    def set_value(self, row: int, value: bytes) -> None:
        """Overwrite a row's value in place (same key, same length)."""
        at = row * self.row_size + self.key_size
        if len(value) != self.row_size - self.key_size:
            raise ValueError("a value of the wrong length")
        self.rows[at : at + len(value)] = value

    def chunks(self, rows: Iterator[int] | None = None, size: int = 1 << 20) -> Iterator[bytes]:
        """The packed rows (all, or those numbered by `rows`, in that order), about
        `size` bytes at a time: for writing out without a copy of the whole table."""
        if rows is None:
            step = max(1, size // self.row_size) * self.row_size
            for at in range(0, len(self.rows), step):
                yield bytes(self.rows[at : at + step])
            return
        batch = bytearray()
        for row in rows:
            at = row * self.row_size
            batch += self.rows[at : at + self.row_size]
            if len(batch) >= size:
                yield bytes(batch)
                batch.clear()
        if batch:
            yield bytes(batch)
