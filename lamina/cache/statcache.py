"""A persistent stat cache: (device, inode, size, mtime_ns, ctime_ns) -> sha256.

A no-op rebuild must not re-read the build context. Every file's content
digest is remembered under its stat identity; when a walk finds the same
identity again, the digest is taken from here and the file is not opened.
Any write to a file changes its ctime, so a stale entry is never hit —
except for a write in the same clock tick as the hash (the kernel's
timestamps are coarse), so an entry is only kept when the file's ctime was
at least `_SETTLE_NS` older than the end of the hash ("racy git" rule).

Storage is one small binary file of fixed-size records, loaded whole (a
dict lookup per file is the cheapest thing a no-op rebuild can do) and
replaced atomically by rename when new digests were added. Several lamina
processes may share it: a writer merges what is on disk before replacing
it, and a lost update only costs a re-hash, never a wrong digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["StatCache", "StatKey", "hash_file", "stat_key"]

StatKey = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns

_MAGIC = b"lamina-statcache-1\n"
_RECORD = struct.Struct("<QQQqq32s")
_SETTLE_NS = 100_000_000  # far above any kernel timestamp granularity
_MAX_ENTRIES = 500_000  # beyond this, entries unused by this process are dropped
_PARALLEL_FROM = 16  # fewer files than this are hashed on the calling thread
FILE_NAME = "statcache.bin"


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(path: str | os.PathLike[str]) -> tuple[bytes, os.stat_result]:
    """sha256 of a file's bytes, with the stat of the open file after reading it.

    Never follows a symlink and never blocks on a FIFO swapped in for the file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.fspath(path)}: not a regular file")
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            digest = hashlib.file_digest(f, "sha256").digest()
        return digest, os.fstat(fd)
    finally:
        os.close(fd)


class StatCache:
    """Digests of files by stat identity, persisted in `<directory>/statcache.bin`.

    `directory=None` keeps everything in memory (tests, one-off walks).
    Use as a context manager, or call `save()`; nothing is written unless
    a new digest was added.
    """

    def __init__(self, directory: Path | None) -> None:
        self.path = directory / FILE_NAME if directory is not None else None
        self._entries: dict[StatKey, bytes] = {}
        self._new: dict[StatKey, bytes] = {}
        self._used: set[StatKey] = set()
        self.hits = 0
        self.misses = 0
        if self.path is not None:
            self._entries = _load(self.path)

    def __enter__(self) -> StatCache:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.save()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: StatKey) -> bytes | None:
        digest = self._entries.get(key)
        if digest is not None:
            self._used.add(key)
        return digest

    def digest(self, path: str | os.PathLike[str], key: StatKey) -> bytes:
        """The sha256 of the regular file at `path`, whose `stat_key` of its lstat is `key`."""
        digest = self._entries.get(key)
        if digest is not None:
            self.hits += 1
            self._used.add(key)
            return digest
        self.misses += 1
        digest, after = hash_file(path)
        self._remember(key, digest, after)
        return digest

    def digest_many(self, items: Sequence[tuple[str, StatKey]]) -> list[bytes]:
        """`digest` for many files; the ones not cached are hashed on a few threads.

        hashlib and file reads release the GIL, so a cold context hashes on
        every core; a warm one never starts a thread.
        """
        found = [self._entries.get(key) for _, key in items]
        missing = [i for i, digest in enumerate(found) if digest is None]
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        for _, key in items:
            self._used.add(key)
        if len(missing) < _PARALLEL_FROM:
            results = [hash_file(items[i][0]) for i in missing]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                results = list(pool.map(hash_file, (items[i][0] for i in missing)))
        for i, (digest, after) in zip(missing, results, strict=True):
            self._remember(items[i][1], digest, after)
            found[i] = digest
        return [d for d in found if d is not None]

    def _remember(self, key: StatKey, digest: bytes, after: os.stat_result) -> None:
        # Keep it only if nothing changed while reading and the file has
        # settled: a later write in the same timestamp tick would go unseen.
        if stat_key(after) == key and time.time_ns() - after.st_ctime_ns > _SETTLE_NS:
            self._entries[key] = digest
            self._new[key] = digest
            self._used.add(key)

    def save(self) -> None:
        """Write new digests to disk (merged with what other processes wrote)."""
        if self.path is None or not self._new:
            return
        merged = _load(self.path)
        merged.update(self._entries)
        if len(merged) > _MAX_ENTRIES:
            merged = {k: v for k, v in merged.items() if k in self._used or k in self._new}
        with contextlib.suppress(OSError):  # an unwritable cache only costs re-hashing
            _store(self.path, merged)
        self._entries = merged
        self._new = {}


def _load(path: Path) -> dict[StatKey, bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError:
        return {}  # an unreadable cache is an empty cache, never an error
    if not data.startswith(_MAGIC):
        return {}
    body = memoryview(data)[len(_MAGIC) :]
    usable = len(body) - len(body) % _RECORD.size  # a torn tail is ignored
    return {
        (dev, ino, size, mtime, ctime): digest
        for dev, ino, size, mtime, ctime, digest in _RECORD.iter_unpack(body[:usable])
    }


def _store(path: Path, entries: dict[StatKey, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-statcache-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC)
            f.write(b"".join(_RECORD.pack(*key, digest) for key, digest in entries.items()))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
