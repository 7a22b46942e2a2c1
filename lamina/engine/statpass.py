"""One stat pass over the build context per build, shared by the memo and the walk.

A rebuild whose build memo misses (`steps.replay`: one file touched, a
`--label` changed) has already lstat'ed every entry of the context for the
memo's fingerprint when COPY walks it again. `fingerprint` keeps what that
pass saw, compactly (per directory: its sorted names and one packed record
of stat fields per name, ~80 bytes an entry), and the context walk takes a
directory's listing from here instead of calling lstat again (`take`; each
directory once, so a second walk of it, or a later build, reads the disk).
A COPY's directory keys (`steps.copyadd.dirkeys`) look at a listing without
taking it (`listing`), or `scan` a directory the pass did not see.

What is kept is forgotten when the build ends (`forget`, called by the
executor), so a listing is never older than the build that made it: a file
changed since is caught where a stale stat is always caught, by the copy's
check of each file against the stat its key was made from.

Imports only the stdlib: the no-op rebuild, which imports this, is judged
on its start-up time.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from stat import S_ISDIR
from typing import Any, NamedTuple

__all__ = ["Listing", "drop", "fingerprint", "forget", "listing", "scan", "stats", "take"]

# st_mode, st_uid, st_gid, st_nlink, st_size, st_mtime_ns, st_ctime_ns, st_ino, st_dev, st_rdev
_FIELDS = struct.Struct("<IIIIQqqQQQ")
CTIME_AT = 24  # the offset of st_ctime_ns in a packed record
RECORD_SIZE = _FIELDS.size
_lock = threading.Lock()


class Listing(NamedTuple):
    """One directory as a stat pass saw it: names joined by "/" ("/" never occurs in a
    name: one string per directory, not one object per entry), their packed lstat
    fields in the same order, and the wall clock (ns) before the directory was read."""

    names: str
    packed: bytes
    since: int


# context real path -> directory (relative, "" for the root) -> its listing
_seen: dict[str, dict[str, Listing]] = {}


def scan(directory: str, since: int = 0) -> tuple[Listing, list[str]]:
    """The listing of `directory` (by name) and the names of its subdirectories.
    `since`: the clock reading to record (taken now when 0). Raises OSError."""
    since = since or time.time_ns()
    pack, lstat = _FIELDS.pack, os.lstat
    # Names, then lstat relative to the directory's descriptor: no DirEntry objects, and
    # the kernel resolves one name, not the whole path (a quarter of the pass's time).
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = sorted(os.listdir(fd))
        found = [lstat(name, dir_fd=fd) for name in names]
    finally:
        os.close(fd)
    packed = b"".join(
        [
            pack(st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                 st.st_ino, st.st_dev, st.st_rdev)
            for st in found
        ]
    )  # fmt: skip
    dirs = [name for name, st in zip(names, found, strict=True) if S_ISDIR(st.st_mode)]
    return Listing("/".join(names), packed, since), dirs


def fingerprint(root: str | os.PathLike[str], h: Any) -> None:
    """Feed the stat identity of every entry under `root` into `h` (no file is read),
    and keep what was seen for the walk of the same build (see the module docstring).

    Each directory goes in as its path, its names and their packed lstat fields
    (mode, owner, links, size, mtime, ctime, inode, device, rdev): one update
    per directory, not a formatted line per entry.
    """
    top = os.fspath(root)
    seen: dict[str, Listing] = {}
    since = time.time_ns()  # one reading for the pass: earlier than any directory's read
    h.update(b"%d\0%s\0" % (len(top), _encode(top)))
    pending = [(top, "")]
    while pending:
        directory, rel = pending.pop()
        found, dirs = scan(directory, since)
        seen[rel] = found
        names = _encode(found.names)
        h.update(b"%d\0%s\0%d\0%s\0%s" % (len(rel), _encode(rel), len(names), names, found.packed))
        prefix = f"{rel}/" if rel else ""
        pending.extend((f"{directory}/{name}", prefix + name) for name in dirs)
    with _lock:
        _seen.clear()  # one context at a time: a process building many keeps one listing
        _seen[os.path.realpath(top)] = seen


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def listing(root: str, rel: str) -> Listing | None:
    """The listing the fingerprint saw of directory `rel` of the context whose real path
    is `root`, left in place for the walk; None when it has none."""
    with _lock:
        found = _seen.get(root)
        return found.get(rel) if found is not None else None


def stats(found: Listing) -> list[tuple[str, os.stat_result]]:
    """The entries (name, lstat) of a listing, by name."""
    if not found.names:
        return []
    result = []
    for name, (mode, uid, gid, nlink, size, mtime_ns, ctime_ns, ino, dev, rdev) in zip(
        found.names.split("/"), _FIELDS.iter_unpack(found.packed), strict=True
    ):
        times = (mtime_ns // 1_000_000_000, ctime_ns // 1_000_000_000, 0.0, mtime_ns / 1e9, ctime_ns / 1e9)
        fields = (mode, ino, dev, nlink, uid, gid, size, 0, *times, 0, mtime_ns, ctime_ns, 0, 0, rdev)
        result.append((name, os.stat_result(fields)))
    return result


def take(root: str, rel: str) -> list[tuple[str, os.stat_result]] | None:
    """The entries (name, lstat) the fingerprint saw in directory `rel` of the context
    whose real path is `root`, sorted by name; None when it has none. Each directory once."""
    if not _seen:
        return None
    with _lock:
        listing = _seen.get(root)
        found = listing.pop(rel, None) if listing is not None else None
    return stats(found) if found is not None else None


def drop(root: str, rel: str) -> None:
    """Forget the listing of directory `rel` (its walk is done another way)."""
    with _lock:
        found = _seen.get(root)
        if found is not None:
            found.pop(rel, None)


def forget() -> None:
    """Drop what the fingerprint kept (the end of a build)."""
    with _lock:
        _seen.clear()
