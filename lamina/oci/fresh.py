"""The bytes a COPY just wrote, by inode, for the layer writer of the same process.

A cold COPY reads each context file once, for its digest, and writes the
new layer's file from those bytes (cache.statcache keeps them). Writing the
layer's tar would read every file a third time: instead the copy leaves
the bytes here, and the tar writer takes them (once) for the file it walks
to, when that is the very inode, unchanged since: same size, mtime and
ctime (no one can set a ctime, so any later write or utime shows). Bounded:
past `_BUDGET` bytes, files are read from disk as before.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["clear", "forget", "keep", "opener"]

_BUDGET = 16 << 20
_OVERHEAD = 120  # a dict slot, the key tuple and the bytes object's header, roughly

_lock = threading.Lock()
_table: dict[tuple[int, int], tuple[int, int, bytes]] = {}  # (dev, ino) -> (mtime_ns, ctime_ns, bytes)
_used = 0


def keep(st: os.stat_result, data: bytes) -> None:
    """Remember `data` as the content of the file of `st` (its fstat once written and stamped)."""
    global _used
    if len(data) != st.st_size:
        return
    with _lock:
        key = (st.st_dev, st.st_ino)
        old = _table.pop(key, None)
        if old is not None:
            _used -= len(old[2]) + _OVERHEAD
        if _used + len(data) + _OVERHEAD <= _BUDGET:
            _table[key] = (st.st_mtime_ns, st.st_ctime_ns, data)
            _used += len(data) + _OVERHEAD


def forget(st: os.stat_result) -> None:
    """Drop what is kept for the inode of `st`: a file just made there without kept bytes
    may have a freed kept file's inode and, with coarse timestamps, its size and times too."""
    global _used
    if not _table:
        return
    with _lock:
        old = _table.pop((st.st_dev, st.st_ino), None)
        if old is not None:
            _used -= len(old[2]) + _OVERHEAD


def clear() -> None:
    """Drop everything kept: at the end of a build (engine.executor), so bytes a COPY left
    for a layer that was never written (a stage only copied from) do not outlive it, and
    a later build in the same process (the Python API) never meets them at a reused inode."""
    global _used
    with _lock:
        _table.clear()
        _used = 0


def opener(layer_path: str, st: os.stat_result) -> Callable[[], BinaryIO] | None:
    """A reader of the kept bytes of the file of lstat `st`, if it is unchanged since (once)."""
    global _used
    if not _table:
        return None
    with _lock:
        found = _table.pop((st.st_dev, st.st_ino), None)
        if found is None:
            return None
        _used -= len(found[2]) + _OVERHEAD
    mtime_ns, ctime_ns, data = found
    if (mtime_ns, ctime_ns, len(data)) != (st.st_mtime_ns, st.st_ctime_ns, st.st_size):
        return None
    return lambda: io.BytesIO(data)
