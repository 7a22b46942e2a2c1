"""Reading layer dirs whose directories shut out their owner (rootless builds).

Rootless, a layer dir holds its files as the caller (or a mapped id) with the
image's modes: a directory of mode 0644 (`COPY --chmod=0644 dir /dir`) or 0124
(`RUN chmod 124 dir`) cannot be listed or searched by its owner outside the
user namespace, where BuildKit, as root, reads it. While such trees are read
(`opened`: COPY --from's materialised tree, a type=local export), each
directory this process owns that lacks u+rx gets it (a regular file lacking u+r,
as `COPY --chmod=0124` leaves it, u+r), and its mode back after;
readers take the true mode from `true_stat`, so nothing written shows the grant.

Grants are counted per directory, so threads reading the same layer at once
(stages in parallel) keep them until the last one is done. Another process
reading the same cached layer at that moment is not covered.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

_NEEDED = stat.S_IRUSR | stat.S_IXUSR
_LOCK = threading.Lock()
_GRANTED: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [true st_mode, holders]
_EXTRA = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
_EXTRA += ("st_blksize", "st_blocks", "st_rdev")


@contextlib.contextmanager
def opened(roots: Sequence[Path | str]) -> Iterator[None]:
    """While inside, every directory under `roots` this process owns can be listed and searched,
    and every regular file it owns read."""
    if os.geteuid() == 0:  # root reads them as they are
        yield
        return
    held: list[tuple[str, tuple[int, int]]] = []
    try:
        for root in roots:
            _open_tree(os.fspath(root), held)
        yield
    finally:
        _release(held)


def true_stat(st: os.stat_result) -> os.stat_result:
    """`st` with the mode its file has outside `opened` (itself when not granted)."""
    if not _GRANTED or stat.S_ISLNK(st.st_mode):
        return st
    with _LOCK:
        entry = _GRANTED.get((st.st_dev, st.st_ino))
    if entry is None:
        return st
    fields = list(st)
    fields[0] = entry[0]
    return os.stat_result(fields, {name: getattr(st, name) for name in _EXTRA})


def _open_tree(root: str, held: list[tuple[str, tuple[int, int]]]) -> None:
    """Grant u+rx to `root` and the directories below it that need it (top-down, so each is
    reachable), u+r to the regular files."""
    uid = os.geteuid()
    pending = [root]
    while pending:
        path = pending.pop()
        with _LOCK:  # the mode read and changed under the lock: a release cannot come between
            try:
                st = os.lstat(path)
            except (FileNotFoundError, PermissionError):  # gone, or under another id's shut dir
                continue
            needed = _NEEDED if stat.S_ISDIR(st.st_mode) else stat.S_IRUSR
            if not stat.S_ISDIR(st.st_mode) and not stat.S_ISREG(st.st_mode):
                continue
            key = (st.st_dev, st.st_ino)
            entry = _GRANTED.get(key)
            if entry is not None:
                entry[1] += 1
                held.append((path, key))
            elif st.st_mode & needed != needed and st.st_uid == uid:
                os.chmod(path, stat.S_IMODE(st.st_mode) | needed)
                _GRANTED[key] = [st.st_mode, 1]
                held.append((path, key))
        if not stat.S_ISDIR(st.st_mode):
            continue
        try:
            with os.scandir(path) as entries:  # symlinks are never followed
                pending.extend(e.path for e in entries if not e.is_symlink())
        except PermissionError:  # another id's, shut: reading it fails where it is read
            continue


def _release(held: list[tuple[str, tuple[int, int]]]) -> None:
    """Give back the modes of the directories `held` names (deepest first) when no one else holds them."""
    for path, key in reversed(held):
        with _LOCK:
            entry = _GRANTED[key]
            entry[1] -= 1
            if entry[1]:
                continue
            del _GRANTED[key]
            with contextlib.suppress(FileNotFoundError):
                os.chmod(path, stat.S_IMODE(entry[0]))
