"""Reading layer dirs whose directories shut out their owner (rootless builds).

Rootless, a layer dir holds its files as the caller (or a mapped id) with the
image's modes: a directory of mode 0644 (`COPY --chmod=0644 dir /dir`) or 0124
(`RUN chmod 124 dir`) cannot be listed or searched by its owner outside the
user namespace, where BuildKit, as root, reads it. While such trees are read
(`opened`: COPY --from's materialised tree, a type=local export), each
directory this process owns that lacks u+rx gets it (a regular file lacking u+r,
as `COPY --chmod=0124` leaves it, u+r), and its mode back after;
readers take the true mode from `true_stat`, so nothing written shows the grant.

Several lamina processes read one cache's layers at once, so a grant is shared
state, kept beside the trees in the directory holding them (`unpacked/` for a
cache's layers; the tree's own parent otherwise):

    .lamina-grants    flock'd exclusively while a grant is made or given back;
                      holds the table of grants: path, inode, true mode and the
                      mode the grant left (an inode changed since is not ours)
    .lamina-readers   flock'd shared by every process reading a tree there

A process loads the table before it walks (a mode another process raised is
read as the table's), and only the last reader (the readers lock taken
exclusively without waiting) gives modes back, then removes both files. A
killed reader's grants stay in the table until the next last reader. Within a
process, grants are counted per inode, so threads (stages in parallel) and
nested readers keep them until the last one is done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

_NEEDED = stat.S_IRUSR | stat.S_IXUSR
_LOCK = threading.Lock()
_EXTRA = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
_EXTRA += ("st_blksize", "st_blocks", "st_rdev")
TABLE = ".lamina-grants"
READERS = ".lamina-readers"


class _Grant:
    """A raised mode: the true st_mode, where it is (path, and the st_mode the chmod left), the
    directory whose table records it, and how many of this process's readers hold it."""

    __slots__ = ("granted", "holders", "mode", "path", "place")

    def __init__(self, mode: int, path: str, granted: int, place: str, holders: int) -> None:
        self.mode, self.path, self.granted, self.place, self.holders = mode, path, granted, place, holders


class _Place:
    """This process's readers of the trees in one directory: its shared flock on READERS."""

    def __init__(self) -> None:
        self.readers = 0
        self.fd = -1  # READERS, flock'd shared while readers > 0; -1 where no lock file can be made


_GRANTED: dict[tuple[int, int], _Grant] = {}  # (dev, ino) -> grant
_PLACES: dict[str, _Place] = {}


@contextlib.contextmanager
def opened(roots: Sequence[Path | str], base: Path | str | None = None) -> Iterator[None]:
    """While inside, every directory under `roots` this process owns can be listed and searched,
    and every regular file it owns read; with `base`, the directories from `base` down to each
    root too (so a root below a shut directory is reached)."""
    if os.geteuid() == 0:  # root reads them as they are
        yield
        return
    held: list[tuple[int, int]] = []
    places: list[str] = []
    try:
        for root in roots:
            top = os.fspath(root if base is None else base)
            place = os.path.dirname(os.path.abspath(top).rstrip("/")) or "/"
            places.append(place)
            _open_tree(os.fspath(root), held, None if base is None else os.fspath(base), place)
        yield
    finally:
        _release(held, places)


def true_stat(st: os.stat_result) -> os.stat_result:
    """`st` with the mode its file has outside `opened` (itself when not granted)."""
    if not _GRANTED or stat.S_ISLNK(st.st_mode):
        return st
    with _LOCK:
        grant = _GRANTED.get((st.st_dev, st.st_ino))
        mode = None if grant is None else grant.mode
    if mode is None:
        return st
    fields = list(st)
    fields[0] = mode
    return os.stat_result(fields, {name: getattr(st, name) for name in _EXTRA})


@contextlib.contextmanager
def _table_lock(place: str) -> Iterator[int]:
    """TABLE in `place`, flock'd exclusively (-1 where it cannot be made: this process alone)."""
    path = os.path.join(place, TABLE)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            yield -1  # a directory not ours, read-only: nothing to share a table through
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_nlink and os.lstat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by the last reader meanwhile: a new one
    try:
        yield fd
    finally:
        os.close(fd)


def _read_table(fd: int) -> list[list]:
    if fd < 0:
        return []
    data = b""
    while chunk := os.pread(fd, 1 << 16, len(data)):
        data += chunk
    try:
        rows = json.loads(data) if data else []
    except ValueError:
        return []  # torn by a killed writer: its grants are lost to the table, not its modes
    return [row for row in rows if isinstance(row, list) and len(row) == 5]


def _write_table(fd: int, rows: list[list]) -> None:
    if fd < 0:
        return
    data = json.dumps(rows).encode() if rows else b""
    # Over the old table, padded with spaces to its length (JSON allows them), then cut:
    # killed between the two, the table still reads; cut first, every grant was lost.
    os.pwrite(fd, data + b" " * (os.fstat(fd).st_size - len(data)), 0)
    os.ftruncate(fd, len(data))


def _still(path: str, dev: int, ino: int, granted: int) -> os.stat_result | None:
    """`path`'s stat when it is still the inode a grant left (same inode, untouched since)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    # Not ctime: a reader may set times inside (an export's SOURCE_DATE_EPOCH clamp).
    return st if (st.st_dev, st.st_ino, st.st_mode) == (dev, ino, granted) else None


def _join_place(place: str) -> None:
    """Count a reader of `place` in this process; the first takes the shared READERS lock."""
    entry = _PLACES.setdefault(place, _Place())
    entry.readers += 1
    if entry.readers == 1:
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(os.path.join(place, READERS), flags, 0o600)
        except OSError:
            return
        fcntl.flock(fd, fcntl.LOCK_SH)  # never waits: its exclusive holder holds TABLE too
        entry.fd = fd


def _open_tree(root: str, held: list[tuple[int, int]], base: str | None, place: str) -> None:
    """Grant u+rx to `root`, the directories below it (top-down, so each is reachable) and
    those from `base` down to it; u+r to the regular files below it."""
    uid = os.geteuid()
    with _table_lock(place) as table_fd:
        rows = _read_table(table_fd)
        added = False
        with _LOCK:
            _join_place(place)
            for path, mode, dev, ino, granted in rows:  # grants other processes made
                key = (dev, ino)
                if key not in _GRANTED and _still(path, dev, ino, granted) is not None:
                    _GRANTED[key] = _Grant(mode, path, granted, place, 0)
        above = [] if base is None else _between(base, root)
        pending: list[str] = []
        with _LOCK:  # modes read and changed under the lock: no release comes between
            for path in [*above, root]:
                try:
                    st = os.lstat(path)
                except (FileNotFoundError, NotADirectoryError, PermissionError):
                    break
                if path is not root and not stat.S_ISDIR(st.st_mode):
                    break  # a file, or a symlink the host would follow out of the tree
                added |= _grant(path, st, uid, held, place, rows)
            else:
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
                            added |= _grant(entry.path, st, uid, held, place, rows)
                            if stat.S_ISDIR(st.st_mode):
                                pending.append(entry.path)
                except (FileNotFoundError, PermissionError):  # gone, or another id's, shut
                    continue
        if added:
            _write_table(table_fd, rows)


def _between(base: str, root: str) -> list[str]:
    """The directories from `base` (included) down to `root`'s parent."""
    rel = os.path.relpath(root, base)
    if rel == "." or rel.startswith(".."):
        return []
    parts = rel.split(os.sep)[:-1]
    return [os.path.join(base, *parts[:i]) for i in range(len(parts) + 1)]


def _grant(
    path: str, st: os.stat_result, uid: int, held: list[tuple[int, int]], place: str, rows: list[list]
) -> bool:
    """Join the grant `path` has, or make one if it lacks what a reader needs (with _LOCK
    held); whether a grant was made (and added to `rows`, the table)."""
    if stat.S_ISDIR(st.st_mode):
        needed = _NEEDED
    elif stat.S_ISREG(st.st_mode):
        needed = stat.S_IRUSR
    else:
        return False
    key = (st.st_dev, st.st_ino)
    grant = _GRANTED.get(key)
    if grant is not None:
        grant.holders += 1
        held.append(key)
        return False
    if st.st_mode & needed == needed or st.st_uid != uid:
        return False
    os.chmod(path, stat.S_IMODE(st.st_mode) | needed)
    granted = st.st_mode | needed
    path = os.path.abspath(path)
    _GRANTED[key] = _Grant(st.st_mode, path, granted, place, 1)
    rows.append([path, st.st_mode, key[0], key[1], granted])
    held.append(key)
    return True


def _release(held: list[tuple[int, int]], places: list[str]) -> None:
    """Let go of the grants `held` names; in each place this process no longer reads, give
    every mode of the table back if no other process reads there either."""
    with _LOCK:
        for key in held:
            _GRANTED[key].holders -= 1
    for place in places:
        with _table_lock(place) as table_fd, _LOCK:
            entry = _PLACES.get(place)
            if entry is None:  # failed before it joined
                continue
            entry.readers -= 1
            if entry.readers:
                continue
            del _PLACES[place]
            last = _leave(place, entry.fd)
            rows = _read_table(table_fd) if table_fd >= 0 else _own_rows(place)
            kept = []
            for row in reversed(rows):  # deepest first: each given back while its parent is open
                path, mode, dev, ino, granted = row
                grant = _GRANTED.get((dev, ino))
                if grant is not None and grant.holders > 0:  # a reader of another place holds it
                    kept.append(row)
                    continue
                _GRANTED.pop((dev, ino), None)
                if last and _still(path, dev, ino, granted) is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.chmod(path, stat.S_IMODE(mode))
                elif not last:
                    kept.append(row)
            kept.reverse()
            _write_table(table_fd, kept)
            if last and not kept and table_fd >= 0:
                for name in (READERS, TABLE):  # both locks held: no one is between
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(place, name))


def _own_rows(place: str) -> list[list]:
    """Where no table can be kept: this process's grants in `place`, as table rows."""
    return [[g.path, g.mode, key[0], key[1], g.granted] for key, g in _GRANTED.items() if g.place == place]


def _leave(place: str, fd: int) -> bool:
    """Drop this process's shared READERS lock; whether no other process reads `place` (with
    TABLE held, so no reader comes in meanwhile)."""
    if fd < 0:
        return True  # no lock file: no other process could share a table here either
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # converts ours: fails while others hold theirs
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def give_back(place: Path | str) -> int:
    """What a killed reader left in `place` (its table and lock files): every mode in the
    table given back and both files removed, when no process reads there; how many modes."""
    place = os.fspath(place)
    with _table_lock(place) as table_fd:
        if table_fd < 0:
            return 0
        try:
            fd = os.open(
                os.path.join(place, READERS), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError:
            return 0
        if not _leave(place, fd):
            return 0  # read by a live process: its last reader gives them back
        given = 0
        for path, mode, dev, ino, granted in reversed(_read_table(table_fd)):
            if _still(path, dev, ino, granted) is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(path, stat.S_IMODE(mode))
                    given += 1
        for name in (READERS, TABLE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(place, name))
        return given
