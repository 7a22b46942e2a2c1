"""A persistent stat cache: (device, inode, size, mtime_ns, ctime_ns) -> sha256.

A no-op rebuild must not re-read the build context. Every file's content
digest is remembered under its stat identity; when a walk finds the same
identity again, the digest is taken from here and the file is not opened.
Any write to a file changes its ctime, so a stale entry is never hit —
except for a write in the same clock tick as the hash (the kernel's
timestamps are coarse), so an entry is only kept when the file's ctime was
at least `_SETTLE_NS` older than the end of the hash ("racy git" rule).

Each record also says whether the file carries no image xattrs (`plain`):
a COPY must key and copy a file's xattrs, and setting or removing one
moves the ctime, so an unchanged identity known plain needs no listxattr
on a rebuild.

Storage is one small binary file of fixed-size records per build context,
loaded whole into one packed table (`lamina.packedtable`: the records as they
are on disk, ~83 bytes a file in memory where a dict and a set of them took
~250; a million-file context holds a million, issue 22). New digests are
appended to it; it is replaced atomically by rename when it needs pruning or
is torn. Several lamina processes may share it: a writer merges what is on
disk before replacing it, and a lost update only costs a re-hash, never a
wrong digest.

A cold build of a big context (issue 22) reads each file once: small files
on the calling thread (threads only contend for the interpreter there),
large ones on a few threads, a bounded window at a time; the bytes of small
ones are kept for the COPY that writes them (`take`), up to a budget.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from lamina.packedtable import PackedTable

__all__ = ["StatCache", "StatKey", "hash_file", "key_size", "stat_key"]

# st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns packed as `_KEY`: 73 bytes of memory
# where a tuple of five ints costs ~190, and the form the shard stores (issue 22).
StatKey = bytes

_MAGIC = b"lamina-statcache-2\n"
_RECORD = struct.Struct("<QQQqq32sB")  # StatKey, sha256, 1 when the file has no image xattrs
_KEY = struct.Struct("<QQQqq")
_DIGEST = 32  # a row's value: the digest, then the plain flag
_PLAIN = b"\1"
_pack = _KEY.pack
_SIZE = struct.Struct("<Q")
_SETTLE_NS = 100_000_000  # far above any kernel timestamp granularity
_SLACK = 10_000  # stale entries a shard may carry before it is pruned to what a build used
_SHARD_DAYS = 30
_SMALL = 256 * 1024  # files up to this size are read in one call, on the calling thread
_CHUNK = 1 << 20
_WINDOW = 8  # large files in flight per hashing thread: bounded work, however big the context
_KEEP_FILE = 64 * 1024  # a build context's files up to this size are kept after hashing ...
_KEEP_BUDGET = 8 * 1024 * 1024  # ... up to this many bytes in all (with _KEPT_OVERHEAD), for the COPY
_KEPT_OVERHEAD = 200  # an entry's objects beside its bytes (key, bytes header, dict slot)
_PROGRESS_FROM = 2_000  # files to hash before progress is shown (a big context's first build)
_PROGRESS_EVERY = 0.1  # seconds between progress reports

# files hashed, files to hash, bytes hashed; called with files hashed == files to hash at the end
Progress = Callable[[int, int, int], None]
DIR_NAME = "statcache"


def stat_key(st: os.stat_result) -> StatKey:
    return _pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def key_size(key: StatKey) -> int:
    """The st_size of a StatKey."""
    return _SIZE.unpack_from(key, 16)[0]  # type: ignore[no-any-return]


def hash_file(path: str | os.PathLike[str], size: int = -1) -> tuple[bytes, os.stat_result]:
    """sha256 of a file's bytes, with the stat of the open file after reading it.

    Never follows a symlink and never blocks on a FIFO swapped in for the file.
    `size`, the size lstat saw, lets a small file be read in one call.
    """
    digest, after, _ = _hash_file(path, size)
    return digest, after


def _hash_file(path: str | os.PathLike[str], size: int) -> tuple[bytes, os.stat_result, bytes | None]:
    """`hash_file`, and the file's bytes when one read of `size` bytes held them all."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        if 0 <= size <= _SMALL:
            # One read asking for a byte more than lstat saw; only a short
            # read or a file that grew reads on to the end (and a change while
            # reading is caught by the stat after).
            data = os.read(fd, size + 1)
            h = hashlib.sha256(data)
            if len(data) == size:
                return h.digest(), os.fstat(fd), data
            while data := os.read(fd, _CHUNK):
                h.update(data)
            return h.digest(), os.fstat(fd), None
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            digest = hashlib.file_digest(f, "sha256").digest()
        return digest, os.fstat(fd), None
    finally:
        os.close(fd)


class _Shard:
    """The digests of one scope (one build context), loaded from one file.

    One packed table of the shard's records (`_RECORD`: the StatKey, then the
    digest and the plain flag): rows before `loaded` are what the file held,
    the rest were added by this process and are what `save` appends. `used`
    has a byte per loaded row, 1 once a lookup found it (what pruning keeps).
    """

    __slots__ = ("loaded", "path", "table", "used")

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.table = PackedTable(_KEY.size, _DIGEST + 1, _load(path) if path is not None else bytearray())
        self.loaded = len(self.table)
        self.used = bytearray(self.loaded)

    def used_count(self) -> int:
        """Records this build looked up or added."""
        return len(self.table) - self.loaded + self.used.count(1)

    def saved(self) -> None:
        """Everything is on disk now (and counts as used: this build made or saw it)."""
        self.used += b"\1" * (len(self.table) - self.loaded)
        self.loaded = len(self.table)


class StatCache:
    """Digests of files by stat identity, persisted under `<directory>/statcache/`.

    Digests are grouped by *scope*, one file per scope (the build context's
    real path), so a no-op rebuild loads only its own context's entries.
    Scope None is kept in memory only: a stage's merged root filesystem is
    a fresh copy every build, its inodes never come back. `directory=None`
    keeps everything in memory. Use as a context manager, or call
    `save()`; nothing is written unless a new digest was added. Safe to
    share between the executor's threads.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory / DIR_NAME if directory is not None else None
        self._shards: dict[str | None, _Shard] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        # Told how the hashing of a persistent scope's (a build context's) files goes,
        # when there are many to read: `lamina build`'s "load build context" line.
        self.progress: Progress | None = None
        # The bytes of small build-context files read for their digest, for COPY to
        # write without reading them again (each file read once per build; see take).
        self._kept: dict[bytes, bytes] = {}
        self._kept_bytes = 0
        self._held: set[str | None] = set()  # scopes a build used whole (hold)
        self._batches: _Progress | None = None  # the progress of hashing() calls, if any
        # Set when the build is stopping (Ctrl-C, SIGTERM): hashing, and the walks of the
        # context that check it (`check_stop`), end with KeyboardInterrupt at the next file
        # or directory, not after a million of them.
        self.stop: threading.Event | None = None

    def check_stop(self) -> None:
        """Raise KeyboardInterrupt once `stop` is set."""
        if self.stop is not None and self.stop.is_set():
            raise KeyboardInterrupt

    def take(self, key: StatKey) -> bytes | None:
        """The content of the build-context file of stat identity `key`, if this
        process read it for its digest (once: it is forgotten here)."""
        data = self._kept.pop(key, None)
        if data is not None:
            with self._lock:
                self._kept_bytes -= len(data) + _KEPT_OVERHEAD
        return data

    def _keep(self, key: bytes, data: bytes) -> None:
        with self._lock:
            cost = len(data) + _KEPT_OVERHEAD
            if self._kept_bytes + cost <= _KEEP_BUDGET:
                self._kept[key] = data
                self._kept_bytes += cost

    def __enter__(self) -> StatCache:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.save()

    def shard_path(self, scope: str) -> Path | None:
        if self.directory is None:
            return None
        name = hashlib.sha256(scope.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return self.directory / f"{name}.bin"

    def _shard(self, scope: str | None) -> _Shard:
        shard = self._shards.get(scope)
        if shard is None:
            with self._lock:
                shard = self._shards.get(scope)
                if shard is None:
                    shard = _Shard(self.shard_path(scope) if scope is not None else None)
                    self._shards[scope] = shard
        return shard

    def known(self, key: StatKey, scope: str | None = None) -> bytes | None:
        """The digest kept for identity `key`, if any (no file is read, no count kept)."""
        table = self._shard(scope).table
        row = table.find(key)
        return None if row < 0 else table.value(row)[:_DIGEST]

    def plain(self, key: StatKey, scope: str | None = None) -> bool:
        """Whether the file of stat identity `key` is known to carry no image xattrs."""
        table = self._shard(scope).table
        row = table.find(key)
        return row >= 0 and table.rows[(row + 1) * table.row_size - 1] == 1

    def note_plain(self, key: StatKey, scope: str | None = None) -> None:
        """Remember that the file of identity `key` carries no image xattrs (kept with
        its digest: only an identity whose digest is kept, hence settled, is noted)."""
        shard = self._shard(scope)
        table = shard.table
        with self._lock:
            row = table.find(key)
            if row < 0 or table.rows[(row + 1) * table.row_size - 1] == 1:
                return
            value = table.value(row)[:_DIGEST] + _PLAIN
            if row >= shard.loaded:
                table.set_value(row, value)  # not on disk yet: saved with its flag
            else:
                table.add(key, value)  # a newer record, appended by save

    def hold(self, scope: str | None) -> None:
        """This build relied on every digest of `scope` without looking each up (a COPY
        keyed from directory records, steps.copyadd.dirkeys): none is pruned as unused."""
        self._held.add(scope)

    @contextlib.contextmanager
    def hashing(self, files: int) -> Iterator[None]:
        """One progress count for the `digest_many` calls made inside, for a caller that
        digests a big context a batch at a time (so that a million files' entries are
        never all alive at once): it counts towards `files`, the files the batches hold
        (some may be known already), and ends at the number hashed."""
        report = self.progress
        batches = _Progress(report, files) if report is not None and files >= _PROGRESS_FROM else None
        self._batches = batches
        try:
            yield
        finally:
            self._batches = None
            if batches is not None and batches.files_done:
                batches.total = batches.files_done
                batches.file_done(0, counted=False)  # the last report: done of done

    def size(self, scope: str | None) -> int:
        """How many digest records the scope holds (loading it)."""
        return len(self._shard(scope).table)

    def digest(self, path: str | os.PathLike[str], key: StatKey, scope: str | None = None) -> bytes:
        """The sha256 of the regular file at `path`, whose `stat_key` of its lstat is `key`."""
        return self.digest_many([(os.fspath(path), key)], scope)[0]

    def digest_many(
        self, items: Sequence[tuple[str, StatKey]], scope: str | None = None, root: str | None = None
    ) -> list[bytes]:
        """`digest` for many files; the ones not cached are read, large ones on a few threads.

        With `root`, the paths of `items` are relative to it (joined only for
        the files that are read).

        Small files are hashed on the calling thread: for them the cost is the
        system calls and the interpreter, which threads only contend for.
        hashlib and reads of large files release the GIL, so those go to a
        pool, a bounded window of them at a time, and are hashed on every
        core while the calling thread reads the small ones. A warm context
        never starts a thread.
        """
        shard = self._shard(scope)
        table, loaded, used = shard.table, shard.loaded, shard.used
        find, rows, size = table.find, table.rows, table.row_size
        cut = _KEY.size
        found: list[bytes | None] = []
        missing: list[int] = []
        for i, (_, key) in enumerate(items):  # a loop, not a call per file: this is the hit path
            row = find(key)
            if row < 0:
                missing.append(i)
                found.append(None)
                continue
            if row < loaded:
                used[row] = 1
            at = row * size + cut
            found.append(bytes(rows[at : at + _DIGEST]))
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        if not missing:
            return found  # type: ignore[return-value]
        lock = self._lock
        report = self.progress if scope is not None and len(missing) >= _PROGRESS_FROM else None
        progress = _Progress(report, len(missing)) if report is not None else None
        if scope is not None and self._batches is not None:
            progress = self._batches  # one of several batches (hashing)

        keep = scope is not None
        check_stop = self.check_stop

        def record(i: int, digest: bytes, after: os.stat_result, data: bytes | None = None) -> None:
            check_stop()
            key = items[i][1]
            unchanged = stat_key(after) == key
            # Keep it only if nothing changed while reading and the file has
            # settled: a later write in the same timestamp tick would go unseen.
            if unchanged and time.time_ns() - after.st_ctime_ns > _SETTLE_NS:
                with lock:  # the executor's threads may add to one shard at once
                    table.add(key, digest + b"\0")
            if keep and unchanged and data is not None and len(data) <= _KEEP_FILE:
                self._keep(key, data)  # exactly the bytes the digest is of
            found[i] = digest
            if progress is not None:
                progress.file_done(after.st_size)

        def path(i: int) -> str:
            return f"{root}/{items[i][0]}" if root is not None else items[i][0]

        def size(i: int) -> int:
            return key_size(items[i][1])

        large = [i for i in missing if size(i) > _SMALL]
        small = [i for i in missing if size(i) <= _SMALL] if large else missing
        if len(large) < 2:
            for i in missing:
                record(i, *_hash_file(path(i), size(i)))
            return found  # type: ignore[return-value]
        _hash_on_pool(size, small, large, path, record)
        return found  # type: ignore[return-value]

    def save(self) -> None:
        """Write new digests to disk: appended to the shard (a rebuild that hashed
        a few files writes a few records, not the whole context's), or the shard
        rewritten, merged with what other processes wrote, when it needs pruning."""
        with self._lock:
            for scope, shard in self._shards.items():
                if shard.path is None or len(shard.table) == shard.loaded:
                    continue
                with contextlib.suppress(OSError):  # an unwritable cache only costs re-hashing
                    # Bound a shard to about its context's size: drop what this
                    # build did not see once stale entries dominate.
                    held = scope in self._held
                    used = len(shard.table) if held else shard.used_count()
                    stale = len(shard.table) > 2 * used + _SLACK
                    if stale or not _append(shard.path, shard.table, shard.loaded):
                        _rewrite(shard.path, shard, prune=stale and not held)
                    _forget_old_shards(shard.path.parent)
                shard.saved()


class _Progress:
    """Reports (files done, of `total`, bytes done) at most every _PROGRESS_EVERY, and at the last file."""

    def __init__(self, report: Progress, total: int) -> None:
        self.report = report
        self.total = total
        self.files_done = self.bytes_done = 0
        self.reported = time.monotonic()

    def file_done(self, size: int, *, counted: bool = True) -> None:
        self.files_done += counted
        self.bytes_done += size
        if self.files_done == self.total or time.monotonic() - self.reported >= _PROGRESS_EVERY:
            self.reported = time.monotonic()
            with contextlib.suppress(Exception):  # a display never fails the build
                self.report(self.files_done, self.total, self.bytes_done)


def _hash_on_pool(
    size: Callable[[int], int],
    small: list[int],
    large: list[int],
    path: Callable[[int], str],
    record: Callable[[int, bytes, os.stat_result, bytes | None], None],
) -> None:
    """Hash `small` on this thread while a pool hashes `large`, a bounded window at a time; `record` each."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    workers = min(4, os.cpu_count() or 1)
    queued = iter(large)
    pending: deque[tuple[int, Future[tuple[bytes, os.stat_result, bytes | None]]]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:

            def refill() -> None:
                while len(pending) < workers * _WINDOW:
                    i = next(queued, None)
                    if i is None:
                        return
                    pending.append((i, pool.submit(_hash_file, path(i), size(i))))

            refill()
            for i in small:
                record(i, *_hash_file(path(i), size(i)))
                while pending and pending[0][1].done():
                    j, future = pending.popleft()
                    record(j, *future.result())
                    refill()
            while pending:
                j, future = pending.popleft()
                record(j, *future.result())
                refill()
        finally:
            for _, future in pending:
                future.cancel()


def _forget_old_shards(directory: Path) -> None:
    """Remove shards of contexts not built for `_SHARD_DAYS` days."""
    cutoff = time.time() - _SHARD_DAYS * 86400
    with os.scandir(directory) as it:
        for entry in it:
            stale = entry.name.endswith(".bin") or entry.name.startswith(".tmp-")  # or a crashed write
            if stale and entry.stat().st_mtime < cutoff:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _load(path: Path) -> bytearray:
    """The records of the shard at `path`, read into the buffer the table keeps (empty
    when it is missing, unreadable or foreign; a torn last record is left for the
    table to drop)."""
    try:
        with open(path, "rb", buffering=0) as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                return bytearray()
            rows = bytearray(max(0, os.fstat(f.fileno()).st_size - len(_MAGIC)))
            got = f.readinto(rows)
            del rows[got:]  # it shrank since (another process rewrote it): what was read
            return rows
    except OSError:
        return bytearray()  # missing or unreadable: an empty cache, never an error


def _append(path: Path, table: PackedTable, start: int) -> bool:
    """Append the table's rows from `start` on to an existing, whole shard; False when
    there is none to append to."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if (size - len(_MAGIC)) % _RECORD.size or os.pread(fd, len(_MAGIC), 0) != _MAGIC:
            return False  # torn or foreign: rewritten whole
        try:
            with memoryview(table.rows) as rows:
                data = rows[start * table.row_size :]
                while data:
                    data = data[os.write(fd, data) :]
        except OSError:
            os.ftruncate(fd, size)  # never leave a torn record for records to follow
            raise
        return True
    finally:
        os.close(fd)


def _rewrite(path: Path, shard: _Shard, *, prune: bool) -> None:
    """Replace the shard by rename: with `prune`, only the records this build used or
    added; else what the file holds that this process lacks (another process's appends),
    then this process's records. Written a chunk at a time, never a second table."""
    table = shard.table
    chunks: Iterator[bytes]
    if prune:
        used, loaded = shard.used, shard.loaded
        chunks = table.chunks(row for row in range(len(table)) if row >= loaded or used[row])
    else:
        chunks = itertools.chain(_theirs(path, table), table.chunks())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-statcache-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC)
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _theirs(path: Path, table: PackedTable) -> Iterator[bytes]:
    """The whole records of the shard at `path` whose keys `table` lacks, a chunk at a time."""
    size, cut = _RECORD.size, _KEY.size
    try:
        f = open(path, "rb")  # noqa: SIM115 (a generator's file, closed by its with)
    except OSError:
        return
    with f:
        if f.read(len(_MAGIC)) != _MAGIC:
            return
        while data := f.read(size * 8192):
            whole = len(data) - len(data) % size  # a torn tail is dropped
            rows = range(0, whole, size)
            kept = [data[at : at + size] for at in rows if table.find(data[at : at + cut]) < 0]
            if kept:
                yield b"".join(kept)
            if whole < len(data):
                return
