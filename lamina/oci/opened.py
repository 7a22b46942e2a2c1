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
def opened(roots: Sequence[Path | str], base: Path | str | None = None) -> Iterator[None]:
    """While inside, every directory under `roots` this process owns can be listed and searched,
    and every regular file it owns read; with `base`, the directories from `base` down to each
    root too (so a root below a shut directory is reached)."""
    if os.geteuid() == 0:  # root reads them as they are
        yield
        return
    held: list[tuple[str, tuple[int, int]]] = []
    try:
        for root in roots:
            _open_tree(os.fspath(root), held, None if base is None else os.fspath(base))
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


def _open_tree(root: str, held: list[tuple[str, tuple[int, int]]], base: str | None) -> None:
    """Grant u+rx to `root`, the directories below it (top-down, so each is reachable) and
    those from `base` down to it; u+r to the regular files below it."""
    uid = os.geteuid()
    above = [] if base is None else _between(base, root)
    with _LOCK:  # modes read and changed under the lock: no release comes between
        for path in [*above, root]:
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                return
            if path is not root and not stat.S_ISDIR(st.st_mode):
                return  # a file, or a symlink the host would follow out of the tree
            _grant(path, st, uid, held)
    pending = [root] if stat.S_ISDIR(st.st_mode) else []
    while pending:
        path = pending.pop()
        with _LOCK:  # one directory's entries at a time
            try:
                with os.scandir(path) as entries:
                    for entry in entries:
                        if entry.is_symlink():  # never followed
                            continue
                        st = entry.stat(follow_symlinks=False)
                        _grant(entry.path, st, uid, held)
                        if stat.S_ISDIR(st.st_mode):
                            pending.append(entry.path)
            except (FileNotFoundError, PermissionError):  # gone, or another id's, shut
                continue


def _between(base: str, root: str) -> list[str]:
    """The directories from `base` (included) down to `root`'s parent."""
    rel = os.path.relpath(root, base)
    if rel == "." or rel.startswith(".."):
        return []
    parts = rel.split(os.sep)[:-1]
    return [os.path.join(base, *parts[:i]) for i in range(len(parts) + 1)]


def _grant(path: str, st: os.stat_result, uid: int, held: list[tuple[str, tuple[int, int]]]) -> None:
    """Join the grant `path` has, or make one if it lacks what a reader needs (with _LOCK held)."""
    if stat.S_ISDIR(st.st_mode):
        needed = _NEEDED
    elif stat.S_ISREG(st.st_mode):
        needed = stat.S_IRUSR
    else:
        return
    key = (st.st_dev, st.st_ino)
    entry = _GRANTED.get(key)
    if entry is not None:
        entry[1] += 1
        held.append((path, key))
    elif st.st_mode & needed != needed and st.st_uid == uid:
        os.chmod(path, stat.S_IMODE(st.st_mode) | needed)
        _GRANTED[key] = [st.st_mode, 1]
        held.append((path, key))


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
