"""One stat pass over the build context per build, shared by the memo and the walk.

A rebuild whose build memo misses (`steps.replay`: one file touched, a
`--label` changed) has already lstat'ed every entry of the context for the
memo's fingerprint when COPY walks it again. `fingerprint` keeps what that
pass saw, compactly (per directory: its sorted names and one packed record
of stat fields per name, ~80 bytes an entry), and the context walk takes a
directory's listing from here instead of calling lstat again (`take`; each
directory once, so a second walk of it, or a later build, reads the disk).

What is kept is forgotten when the build ends (`forget`, called by the
executor), so a listing is never older than the build that made it: a file
changed since is caught where a stale stat is always caught, by the copy's
check of each file against the stat its key was made from.

Imports only the stdlib: the no-op rebuild, which imports this, is judged
on its start-up time.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from typing import Any

__all__ = ["fingerprint", "forget", "take"]

# st_mode, st_uid, st_gid, st_nlink, st_size, st_mtime_ns, st_ctime_ns, st_ino, st_dev, st_rdev
_FIELDS = struct.Struct("<IIIIQqqQQQ")
_lock = threading.Lock()
# context real path -> directory (relative, "" for the root) -> (names joined by "/", packed stats)
_seen: dict[str, dict[str, tuple[str, bytes]]] = {}


def fingerprint(root: str | os.PathLike[str], h: Any) -> None:
    """Feed the stat identity of every entry under `root` into `h` (no file is read),
    and keep what was seen for the walk of the same build (see the module docstring)."""
    top = os.fspath(root)
    listing: dict[str, tuple[str, bytes]] = {}
    pack = _FIELDS.pack
    pending = [(top, "")]
    while pending:
        directory, rel = pending.pop()
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        packed = []
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            h.update(
                f"{entry.path}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0"
                f"{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}\n".encode(
                    "utf-8", "surrogateescape"
                )
            )
            fields = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size, st.st_mtime_ns)
            packed.append(pack(*fields, st.st_ctime_ns, st.st_ino, st.st_dev, st.st_rdev))
            if stat.S_ISDIR(st.st_mode):
                pending.append((entry.path, f"{rel}/{entry.name}" if rel else entry.name))
        names = [entry.name for entry in entries]
        # "/" never occurs in a name: one string per directory, not one object per entry
        listing[rel] = ("/".join(names), b"".join(packed))
    with _lock:
        _seen.clear()  # one context at a time: a process building many keeps one listing
        _seen[os.path.realpath(top)] = listing


def take(root: str, rel: str) -> list[tuple[str, os.stat_result]] | None:
    """The entries (name, lstat) the fingerprint saw in directory `rel` of the context
    whose real path is `root`, sorted by name; None when it has none. Each directory once."""
    if not _seen:
        return None
    with _lock:
        listing = _seen.get(root)
        found = listing.pop(rel, None) if listing is not None else None
    if found is None:
        return None
    names, packed = found
    if not names:
        return []
    result = []
    for name, (mode, uid, gid, nlink, size, mtime_ns, ctime_ns, ino, dev, rdev) in zip(
        names.split("/"), _FIELDS.iter_unpack(packed), strict=True
    ):
        times = (mtime_ns // 1_000_000_000, ctime_ns // 1_000_000_000, 0.0, mtime_ns / 1e9, ctime_ns / 1e9)
        fields = (mode, ino, dev, nlink, uid, gid, size, 0, *times, 0, mtime_ns, ctime_ns, 0, 0, rdev)
        result.append((name, os.stat_result(fields)))
    return result


def forget() -> None:
    """Drop what the fingerprint kept (the end of a build)."""
    with _lock:
        _seen.clear()
