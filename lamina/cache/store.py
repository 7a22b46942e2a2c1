"""The content-addressed store: blobs, unpacked layers and the index.

Layout under the root (see `default_cache_root` for where that is):

    blobs/sha256/<hex>       content; immutable once it has a name
    blobs/sha256/.tmp-*      writes in flight (same directory: rename is atomic)
    unpacked/<hex>/          a layer unpacked, keyed by its diff_id
    unpacked/.tmp-*/         unpacks in flight
    index.db (-wal, -shm)    SQLite in WAL mode: names, layers, cache results (no-copy-on-write)
    lock                     flock: shared while a Store is open, exclusive for gc
    open.lock                flock: openers take turns setting up the index

Invariants, and what keeps them:
- A name under blobs/ always holds exactly the bytes its digest says. Bytes
  are written to a temporary file, fsynced, hashed while written, compared
  with the expected digest and only then renamed; a crash or a mismatch
  leaves at most a `.tmp-*` file, which gc removes.
- An unpacked/<hex> directory is complete: it is filled under a temporary
  name and renamed. When two processes unpack the same layer, the first
  rename wins and the loser drops its copy.
- Several lamina processes share one store. Blob and unpack publishing is
  rename-based and needs no lock; SQLite serialises the index (WAL, busy
  timeout); gc takes the store lock exclusively so that nothing it deletes
  is in use.

Typical use by the executor:

    with Store(default_cache_root(os.environ)) as store:
        with store.blob_writer() as out:                      # nothing named yet
            info = write_layer(entries, out, Compression.GZIP)  # lamina.oci.layer
            blob = out.commit(info.digest)                    # verified, fsynced, renamed
        store.record_layer(LayerRecord(blob.digest, info.diff_id, info.media_type, blob.size))
        store.cache_put(key, json.dumps(result), refs=[blob.digest, info.diff_id])

The API, by kind (all methods are safe to call from several threads):
- blobs: `blob_writer()`, `put_blob(stream, expected, size)`, `put_bytes`,
  `has_blob`, `blob_path`, `blob_size`, `open_blob`, `read_blob(digest, limit)`;
- layers: `record_layer(LayerRecord)`, `layer(blob)`, `layers_for_diff_id`,
  `find_layer(diff_id, media_types)` (reuse a compression made earlier);
- unpacked trees: `new_unpack_dir()`, `publish_unpacked(tmp, diff_id)`,
  `unpacked_path(diff_id)`, `has_unpacked`, `touch_unpacked`;
- names: `tag(name, manifest, size=, created=)`, `resolve`, `images`, `untag`;
  `add_pending(manifest, compression, layers)` (a build's image whose new layers are
  still uncompressed tars: `resolve` and `images` compress them on first use, see
  "Pending images" below), `lookup` and `names` (as tagged, nothing made);
- build cache: `cache_get(key)`, `cache_put(key, result, refs)`, `cache_delete`;
- housekeeping: `du()`, `gc(cache_older_than=, drop_all=, keep_bytes=)`.
Loading, saving and committing whole images is in lamina.cache.images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lamina.cache.topdir import mark_no_cow, mark_top_dir
from lamina.errors import (
    DigestMismatch,
    DiskFull,
    ImageNotFound,
    LaminaError,
    StoreBusy,
    StoreError,
    is_disk_full,
)
from lamina.oci.digest import Digest

if TYPE_CHECKING:
    import sqlite3

    from lamina.oci.compression import Compression

CHUNK = 1 << 20
_BUSY_TIMEOUT_S = 60.0
_LAST_USED_GRAIN_S = 60.0  # gc ages cache entries in hours: a minute's precision is plenty
_STALE_TMP_S = 24 * 3600  # a temp file this old belongs to a dead process
_SCHEMA_VERSION = 2  # 2: the pending table
_SQLITE_FULL = 13  # "database or disk is full": sqlite3.SQLITE_FULL from Python 3.11.4 on
_SQLITE_IOERR = 10  # "disk I/O error", the primary code of SQLITE_IOERR_WRITE, _FSYNC, _SHMSIZE, ...
_SQLITE_CANTOPEN = 14  # "unable to open database file": also a -wal or -shm file it could not make
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    manifest TEXT NOT NULL,
    size INTEGER NOT NULL,
    created TEXT NOT NULL,
    tagged_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layers (
    blob TEXT PRIMARY KEY,
    diff_id TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS layers_by_diff_id ON layers (diff_id);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,
    result TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cache_refs (
    key TEXT NOT NULL REFERENCES cache (key) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    PRIMARY KEY (key, digest)
);
CREATE TABLE IF NOT EXISTS unpacked (
    diff_id TEXT PRIMARY KEY,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    manifest TEXT PRIMARY KEY,
    compression TEXT NOT NULL,
    layers TEXT NOT NULL,
    made TEXT NOT NULL DEFAULT ''
);
"""


def default_cache_root(environ: Mapping[str, str]) -> Path:
    """`$LAMINA_CACHE`, else `$XDG_CACHE_HOME/lamina`, else `~/.cache/lamina`."""
    if environ.get("LAMINA_CACHE"):
        return Path(environ["LAMINA_CACHE"])
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]) / "lamina"
    home = environ.get("HOME")
    if not home:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    return Path(home) / ".cache" / "lamina"


@dataclasses.dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: Digest
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class LayerRecord:
    """A layer blob and what it is: the diff_id of its tar and how it is compressed."""

    blob: Digest
    diff_id: Digest
    media_type: str
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRecord:
    name: str
    manifest: Digest
    size: int  # bytes of config and layer blobs as stored
    created: str  # the config's `created`, RFC 3339, or "" when it has none
    # A pending image `images` could not make (a store this user cannot write, a stored tar
    # that no longer hashes): why, and its image ID; `manifest` is then the pending one.
    unmade: str = ""
    image_id: Digest | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    blobs: int
    blob_count: int
    unpacked: int
    unpacked_count: int
    index: int
    derived: int = 0  # DERIVED_DIRS: COPY's records, directory keys, the stat cache
    derived_count: int = 0

    @property
    def total(self) -> int:
        return self.blobs + self.unpacked + self.index + self.derived


@dataclasses.dataclass(frozen=True, slots=True)
class GcReport:
    blobs_removed: int
    unpacked_removed: int
    cache_entries_removed: int
    bytes_freed: int
    size_after: int | None = None  # the store's size when gc finished, when it measured it (keep_bytes)

    def __add__(self, other: GcReport) -> GcReport:
        return GcReport(
            self.blobs_removed + other.blobs_removed,
            self.unpacked_removed + other.unpacked_removed,
            self.cache_entries_removed + other.cache_entries_removed,
            self.bytes_freed + other.bytes_freed,
            other.size_after if other.size_after is not None else self.size_after,
        )


class BlobWriter:
    """A forward-only file that hashes and counts what it is given.

    Nothing has a real name until `commit()`; leaving the `with` block
    without committing (or with an exception) removes the temporary file.
    `tell()` is there for tarfile, which asks for the position.
    """

    def __init__(self, directory: Path) -> None:
        import hashlib  # here: a store that is only read (save, images) never loads OpenSSL
        import tempfile

        fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        crash_point("blob-write")
        try:
            self._file.write(data)
        except OSError as err:
            raise self._failed(err) from err
        self._hash.update(data)
        self._size += len(data)
        return len(data)

    def _failed(self, err: OSError) -> LaminaError:
        """A write error as the user should read it: a full disk names the blob being written,
        not the bytes coming in (a load must not call its input corrupt)."""
        if is_disk_full(err):
            return DiskFull.writing(self._path, err)
        return StoreError(f"write {self._path}: {err.strerror or err}")

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        self._file.flush()

    def writable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        return self._size

    def commit(self, expected: Digest | None = None, size: int | None = None) -> BlobInfo:
        """Check the digest (and size), fsync and give the blob its name."""
        if self._done:
            raise StoreError("blob writer already committed or aborted")
        digest = Digest("sha256", self._hash.hexdigest())
        try:
            if expected is not None and expected != digest:
                raise DigestMismatch(
                    f"blob {expected}: the bytes hash to {digest} ({self._size} bytes), not stored"
                )
            if size is not None and size != self._size:
                raise DigestMismatch(f"blob {digest}: {self._size} bytes, expected {size}")
            try:
                self._file.flush()
                os.fchmod(self._file.fileno(), 0o444)  # content-addressed: never edited in place
                os.fsync(self._file.fileno())
                self._file.close()
            except OSError as err:  # the last buffered bytes find the disk full
                raise self._failed(err) from err
            final = self._path.parent / digest.hex
            crash_point("blob-commit")
            os.replace(self._path, final)  # an existing blob has the same bytes
            _fsync_dir(self._path.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return BlobInfo(digest, self._size)

    def abort(self) -> None:
        self._done = True
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


# --- crash points (tests only) ---------------------------------------------------------------
# tests/test_crash_safety.py kills builds at chosen moments: with
# LAMINA_TEST_CRASH_AT=POINT:N[:SECONDS] the Nth pass of POINT in this process SIGKILLs it
# (after SECONDS, from a timer, when given: "during the RUN that follows"); with
# LAMINA_TEST_CRASH_LOG=FILE every pass appends its point's name to FILE, so a test can
# count a build's moments first. Unset (always, outside those tests) each point costs one
# environment lookup. The points are the store's writes a crash can tear: a blob half
# written (blob-write), written and fsynced but not named (blob-commit), an unpacked layer
# about to be named (unpack-publish), a cache result inside its transaction (cache-put),
# an image name (tag), and a new upper or unpack dir (unpack-dir, before a step fills it).
_crash_lock = threading.Lock()
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Tests only: see the comment above."""
    log = os.environ.get("LAMINA_TEST_CRASH_LOG")
    if log:
        with _crash_lock, open(log, "a") as f:
            f.write(name + "\n")
    spec = os.environ.get("LAMINA_TEST_CRASH_AT")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, delay = rest.partition(":")
    with _crash_lock:
        _crash_counts[name] = count = _crash_counts.get(name, 0) + 1
    if count != int(nth or 1):
        return
    import signal

    if not delay:
        os.kill(os.getpid(), signal.SIGKILL)
    timer = threading.Timer(float(delay), os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Records other modules derive from builds and keep under the store, a directory each (the
# store cannot import them, DESIGN.md's import direction; tests/test_cache_derived.py checks
# the names): rebuilt when missing, so `prune -a` removes them all and `du` counts them.
# COPY's records of what it wrote (engine.steps.copyadd.priorcopy) are named
# `<position>-<layer dir>.bin`: each serves only while that layer dir is unpacked.
DERIVED_DIRS = ("copies", "dirkeys", "statcache")
_BY_LAYER_DIR = "copies"


class Store:
    """One content store on disk; open it with `with Store(root) as store:`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._unpacked = self.root / "unpacked"
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()  # one connection shared by the executor's threads
        self.read_only = False  # opened by a user who cannot write it (see open)
        self._guarded = False  # lamina.cache.sigbus watches this store's index (see open)

    # --- lifecycle -------------------------------------------------------------

    def open(self) -> Store:
        import sqlite3

        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._unpacked.mkdir(parents=True, exist_ok=True)
            mark_top_dir(self._unpacked)  # each layer dir a tree of its own (see topdir)
            try:
                self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                # a store this user may only read (another user's, a read-only mount): it
                # lists and exports; what would write fails on its own, one line
                self._lock_fd = os.open(self.root / "lock", os.O_RDONLY | os.O_CLOEXEC)
                self.read_only = True
            _flock(self._lock_fd, exclusive=False, wait=True)
            from lamina.cache.sigbus import guard_store

            # a page of the index's shared memory refused: one line, not exit 135 (where
            # that can happen: then the index's new files are made no-copy-on-write too)
            self._guarded = guard_store(self.root)
            self._db = _open_index(self.root, read_only=self.read_only, no_cow=self._guarded)
        except (OSError, sqlite3.Error) as err:
            said = self._index_error(err) if isinstance(err, sqlite3.Error) else None
            self.close()
            if isinstance(said, DiskFull):
                raise said.within(f"open store {self.root}") from err
            raise StoreError(f"open store {self.root}: {err}") from err
        return self

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            # The last connection to close checkpoints and removes the WAL file: an
            # opener meeting that halfway gets "database is locked" without waiting.
            try:
                fd: int | None = _take_open_lock(self.root)
            except OSError:  # the store was removed under us: nobody to take turns with
                fd = None
            try:
                db.close()
            finally:
                if fd is not None:
                    os.close(fd)
        if self._guarded:
            from lamina.cache.sigbus import forget_store

            forget_store(self.root)
            self._guarded = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"store {self.root} is not open")
        return self._db

    @contextlib.contextmanager
    def _sql(self) -> Iterator[sqlite3.Connection]:
        import sqlite3

        with self._mutex:
            try:
                yield self.db
            except sqlite3.Error as err:
                raise self._index_error(err) from err

    def _index_error(self, err: sqlite3.Error) -> LaminaError:
        """SQLite's error as lamina says it. A write that found no room is "database or disk is
        full" only for ENOSPC; a quota (EDQUOT) is "disk I/O error", as a failing disk is, or
        "unable to open database file" when the -wal or -shm file could not be made (btrfs
        refuses even an empty file past a qgroup limit): a 1 MiB write beside the index
        tells them apart."""
        index = self.root / "index.db"
        code = getattr(err, "sqlite_errorcode", None)
        if code == _SQLITE_FULL:
            return DiskFull(f"write {index}: No space left on device ({err})", str(index))
        if code is not None and code & 0xFF in (_SQLITE_IOERR, _SQLITE_CANTOPEN) and not self.read_only:
            from lamina.cache.room import room_refused

            refused = room_refused(self._unpacked)
            if refused is not None:
                return DiskFull(f"write {index}: {refused.strerror} ({err})", str(index))
        return StoreError(f"store index {index}: {err}")

    # --- blobs -----------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        if digest.algorithm != "sha256":
            raise StoreError(f"blob {digest}: only sha256 blobs are stored")
        return self._blobs / digest.hex

    def has_blob(self, digest: Digest) -> bool:
        return digest.algorithm == "sha256" and self.blob_path(digest).is_file()

    def blob_size(self, digest: Digest) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is not in the store") from None

    def open_blob(self, digest: Digest) -> BinaryIO:
        """A fresh reader of the blob's bytes."""
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is not in the store") from None

    def read_blob(self, digest: Digest, limit: int) -> bytes:
        """The whole blob, refusing (without reading) one larger than `limit` bytes."""
        size = self.blob_size(digest)
        if size > limit:
            raise StoreError(f"blob {digest}: {size} bytes, more than the {limit} expected")
        with self.open_blob(digest) as f:
            return f.read(limit + 1)

    def blob_writer(self) -> BlobWriter:
        """A writer whose `commit(expected)` publishes the blob (see BlobWriter)."""
        return BlobWriter(self._blobs)

    def put_blob(self, stream: BinaryIO, expected: Digest | None = None, size: int | None = None) -> BlobInfo:
        """Copy `stream` into the store; with `expected`, refuse bytes that hash otherwise.

        When `expected` is already stored the stream is not read at all.
        """
        if expected is not None and self.has_blob(expected):
            have = self.blob_size(expected)
            if size is None or size == have:
                return BlobInfo(expected, have)
        with self.blob_writer() as out:
            while chunk := stream.read(CHUNK):
                out.write(chunk)
            return out.commit(expected, size)

    def put_bytes(self, data: bytes, expected: Digest | None = None) -> BlobInfo:
        import io

        return self.put_blob(io.BytesIO(data), expected, len(data))

    # --- layers: blob <-> diff_id ----------------------------------------------

    def record_layer(self, layer: LayerRecord) -> None:
        """Remember that blob `layer.blob` is the tar `layer.diff_id`, compressed as its media type."""
        with self._sql() as db:
            db.execute(
                "INSERT OR REPLACE INTO layers (blob, diff_id, media_type, size) VALUES (?, ?, ?, ?)",
                (str(layer.blob), str(layer.diff_id), layer.media_type, layer.size),
            )

    def layer(self, blob: Digest) -> LayerRecord | None:
        with self._sql() as db:
            row = db.execute(
                "SELECT blob, diff_id, media_type, size FROM layers WHERE blob = ?", (str(blob),)
            ).fetchone()
        return _layer_record(row) if row else None

    def layers_for_diff_id(self, diff_id: Digest) -> tuple[LayerRecord, ...]:
        """Every stored blob of this tar (one per compression made so far), present blobs only."""
        with self._sql() as db:
            rows = db.execute(
                "SELECT blob, diff_id, media_type, size FROM layers WHERE diff_id = ? ORDER BY blob",
                (str(diff_id),),
            ).fetchall()
        records = (_layer_record(row) for row in rows)
        return tuple(r for r in records if self.has_blob(r.blob))

    def find_layer(self, diff_id: Digest, media_types: Iterable[str]) -> LayerRecord | None:
        """A stored blob of `diff_id` with one of `media_types`, to reuse instead of compressing again."""
        wanted = set(media_types)
        for record in self.layers_for_diff_id(diff_id):
            if record.media_type in wanted:
                return record
        return None

    # --- unpacked layers -------------------------------------------------------

    def unpacked_path(self, diff_id: Digest) -> Path:
        """Where the unpacked tree of `diff_id` lives (it may not exist: see has_unpacked)."""
        return self._unpacked / diff_id.hex

    def has_unpacked(self, diff_id: Digest) -> bool:
        return self.unpacked_path(diff_id).is_dir()

    def new_unpack_dir(self) -> Path:
        """An empty temporary directory on the store's file system, for publish_unpacked."""
        import tempfile

        path = Path(tempfile.mkdtemp(dir=self._unpacked, prefix=".tmp-"))
        crash_point("unpack-dir")
        return path

    def publish_unpacked(self, tmpdir: Path, diff_id: Digest) -> Path:
        """Give a fully unpacked `tmpdir` its name; if another process won, drop ours."""
        final = self.unpacked_path(diff_id)
        crash_point("unpack-publish")
        try:
            os.rename(tmpdir, final)
        except OSError as err:
            # Another process won, or the rename failed (btrfs past a qgroup limit: EDQUOT):
            # ours goes either way, or `cache verify` finds it left over.
            # FIXME: files owned by subordinate ids can only be removed inside the
            # sandbox's namespace; what is left here is cleared by gc's stale sweep.
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)
            if is_disk_full(err):
                raise DiskFull(
                    f"publish unpacked layer {diff_id}: rename to {final}: {err.strerror}", str(final)
                ) from err
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise StoreError(f"publish unpacked layer {diff_id}: {err}") from err
        self.touch_unpacked(diff_id)
        return final

    def touch_unpacked(self, diff_id: Digest) -> None:
        with self._sql() as db:
            db.execute(
                "INSERT OR REPLACE INTO unpacked (diff_id, last_used) VALUES (?, ?)",
                (str(diff_id), time.time()),
            )

    # --- image names -----------------------------------------------------------

    def tag(self, name: str, manifest: Digest, *, size: int, created: str = "") -> ImageRecord:
        """Point `name` at a manifest already in the store (replacing what it named)."""
        if not self.has_blob(manifest):
            raise StoreError(f"tag {name}: manifest {manifest} is not in the store")
        with self._sql() as db:
            same = db.execute(
                "SELECT 1 FROM images WHERE name = ? AND manifest = ? AND size = ? AND created = ?",
                (name, str(manifest), size, created),
            ).fetchone()
            if same is not None:
                return ImageRecord(name, manifest, size, created)  # nothing to write (see cache_get)
            crash_point("tag")
            db.execute(
                "INSERT OR REPLACE INTO images (name, manifest, size, created, tagged_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (name, str(manifest), size, created, time.time()),
            )
        return ImageRecord(name, manifest, size, created)

    def resolve(self, name: str) -> ImageRecord:
        """The image `name` names, its layers compressed first if it is pending (every reader
        of an image goes through here or `images`, so none sees a pending one)."""
        return self.materialised(self.lookup(name))

    def lookup(self, name: str) -> ImageRecord:
        """The image `name` names as tagged: perhaps pending (nothing is made)."""
        with self._sql() as db:
            row = db.execute(
                "SELECT name, manifest, size, created FROM images WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise ImageNotFound(f"image {name} is not in the store (see `lamina images`)")
        return _image_record(row)

    def images(self) -> tuple[ImageRecord, ...]:
        """Every named image, pending ones made (as `resolve`) when they can be: one that cannot
        be made now stays as tagged (a whole image of uncompressed tars), with `unmade` set,
        so one damaged or unwritable image does not hide the others."""
        out: list[ImageRecord] = []
        failed: dict[Digest, ImageRecord] = {}  # a pending manifest under several names: tried once
        for record in self.names():
            if record.manifest in failed:
                out.append(dataclasses.replace(failed[record.manifest], name=record.name))
                continue
            if self.read_only and self.is_pending(record.manifest):  # making it writes
                failed[record.manifest] = unmade = self._unmade(record, StoreError(self.READ_ONLY))
                out.append(unmade)
                continue
            try:
                out.append(self.materialised(record))
            except (LaminaError, OSError) as err:
                failed[record.manifest] = unmade = self._unmade(record, err)
                out.append(unmade)
        return tuple(out)

    def _unmade(self, record: ImageRecord, err: Exception) -> ImageRecord:
        from lamina.oci.image import MAX_DOCUMENT, Manifest

        image_id = None
        with contextlib.suppress(LaminaError, OSError):
            image_id = Manifest.from_bytes(self.read_blob(record.manifest, MAX_DOCUMENT)).config.digest
        return dataclasses.replace(record, unmade=str(err) or "not made", image_id=image_id)

    def names(self) -> tuple[ImageRecord, ...]:
        """Every name as tagged: pending images stay pending (`cache verify` checks them so)."""
        with self._sql() as db:
            rows = db.execute("SELECT name, manifest, size, created FROM images ORDER BY name").fetchall()
        return tuple(_image_record(row) for row in rows)

    def untag(self, name: str) -> ImageRecord:
        """Remove a name; its blobs stay until gc finds nothing else uses them."""
        record = self.lookup(name)
        with self._sql() as db:
            db.execute("DELETE FROM images WHERE name = ?", (name,))
        return record

    # --- pending images ---------------------------------------------------------
    # A `lamina build -t` image is stored with the layers the build made as uncompressed tars
    # (a valid image: its manifest names them with the tar media type) and a pending row:
    # the compression the build asked for and which layers to compress. Its config, hence
    # the image ID, is final. The first reader (`resolve`, `images`) compresses those layers
    # (on threads; the bytes depend on the tar only, lamina.oci.layer), writes the manifest
    # the build would have written, and points every name of the pending manifest at it.
    # A crash before that leaves the names on the pending manifest, a whole image; two
    # processes making the same one write the same bytes (blobs are renamed into place)
    # and the same rows, so they agree without a lock.

    # The pending manifest carries this annotation, so the same tars pending under gzip and
    # under zstd are two manifests (two rows); the manifest made has it no more.
    PENDING_ANNOTATION = "org.lamina.pending.compression"
    READ_ONLY = "the store is read-only for this user"  # why images() left one unmade

    def is_pending(self, manifest: Digest) -> bool:
        with self._sql() as db:
            row = db.execute("SELECT 1 FROM pending WHERE manifest = ?", (str(manifest),)).fetchone()
        return row is not None

    def add_pending(
        self, manifest: Digest, compression: str, layers: Iterable[tuple[int, str, Digest | None]]
    ) -> None:
        """Record the stored `manifest` as pending: its `layers` (index, memo key, layer dir's
        digest or None), uncompressed tars, are to be compressed as `compression` when the
        image is first read; each blob made is then remembered under its memo key (the
        builder's layer-blob memo, engine.output._record_blob), kept with the layer dir."""
        rows = [[i, key, str(d) if d is not None else ""] for i, key, d in layers]
        with self._sql() as db:
            db.execute(
                "INSERT OR IGNORE INTO pending (manifest, compression, layers) VALUES (?, ?, ?)",
                (str(manifest), compression, json.dumps(rows)),
            )

    def made_from(self, manifest: Digest) -> Digest | None:
        """For a pending manifest, the one made of it if that is still stored; else None."""
        with self._sql() as db:
            row = db.execute("SELECT made FROM pending WHERE manifest = ?", (str(manifest),)).fetchone()
        made = Digest.parse(row[0]) if row is not None and row[0] else None
        return made if made is not None and self.has_blob(made) else None

    def materialised(self, record: ImageRecord) -> ImageRecord:
        """`record` with a pending manifest made (see above) and its name moved to it."""
        made = self.make_pending(record.manifest)
        if made is None:
            return record
        return ImageRecord(record.name, made[0], made[1], record.created)

    def make_pending(self, manifest: Digest) -> tuple[Digest, int] | None:
        """For a pending `manifest`: the manifest made of it (now, unless made and stored
        already) and its size; every name of `manifest` is moved to it. None when not pending."""
        with self._sql() as db:
            row = db.execute(
                "SELECT compression, layers, made FROM pending WHERE manifest = ?", (str(manifest),)
            ).fetchone()
        if row is None:
            return None
        compression, layers, made = row
        if not made or not self.has_blob(Digest.parse(made)):
            rows = [(int(i), str(key), str(layer_dir)) for i, key, layer_dir in json.loads(layers)]
            made = str(self._make_pending(manifest, compression, rows))
        from lamina.oci.image import MAX_DOCUMENT, Manifest

        document = Manifest.from_bytes(self.read_blob(Digest.parse(made), MAX_DOCUMENT))
        size = document.config.size + sum(layer.size for layer in document.layers)
        crash_point("pending-made")
        with self._sql() as db, _transaction(db):
            db.execute("UPDATE pending SET made = ? WHERE manifest = ?", (made, str(manifest)))
            db.execute(
                "UPDATE images SET manifest = ?, size = ? WHERE manifest = ?", (made, size, str(manifest))
            )
        return Digest.parse(made), size

    def _make_pending(self, pending: Digest, compression: str, rows: list[tuple[int, str, str]]) -> Digest:
        """Compress the layers `rows` name (index, memo key, layer dir) in parallel; store the manifest."""
        import concurrent.futures

        from lamina.oci.compression import Compression
        from lamina.oci.image import MAX_DOCUMENT, Manifest

        manifest = Manifest.from_bytes(self.read_blob(pending, MAX_DOCUMENT), f"manifest {pending}")
        target = Compression.parse(compression)
        layers = list(manifest.layers)
        indices = [i for i, _, _ in rows]
        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(indices), os.cpu_count() or 1))) as pool:
            made = list(pool.map(lambda i: self._compress_tar(layers[i].digest, target), indices))
        for (i, key, layer_dir), record in zip(rows, made, strict=True):
            self.record_layer(record)
            layers[i] = dataclasses.replace(
                layers[i], media_type=record.media_type, digest=record.blob, size=record.size
            )
            # (not when the layer dir went, to a prune since the build: nothing to remember it by)
            if key and layer_dir and self.has_unpacked(Digest.parse(layer_dir)):
                memo = {"digest": str(record.blob), "diff_id": str(record.diff_id), "size": record.size}
                refs = [record.blob, Digest.parse(layer_dir)]
                self.cache_put(key, json.dumps({**memo, "media_type": record.media_type}), refs=refs)
        kept = tuple((k, v) for k, v in manifest.annotations if k != self.PENDING_ANNOTATION)
        data = dataclasses.replace(manifest, layers=tuple(layers), annotations=kept).to_bytes()
        return self.put_bytes(data).digest

    def _compress_tar(self, tar: Digest, target: Compression) -> LayerRecord:
        """The stored uncompressed tar `tar` compressed as `target` into a new blob."""
        from lamina.oci.compression import Compression
        from lamina.oci.layer import recompress

        with self.open_blob(tar) as blob, self.blob_writer() as out:
            info = recompress(blob, Compression.NONE, target, out)  # type: ignore[arg-type]
            if info.diff_id != tar:
                raise DigestMismatch(f"layer {tar}: the stored tar hashes to {info.diff_id}")
            committed = out.commit(info.digest, info.size)
        return LayerRecord(committed.digest, tar, info.media_type, committed.size)

    # --- cache results (the executor's key -> result table) --------------------

    def cache_get(self, key: str) -> str | None:
        """The result stored under `key` (JSON text), marking it used now; None on a miss."""
        now = time.time()
        with self._sql() as db:
            row = db.execute("SELECT result, last_used FROM cache WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            # A read that writes makes SQLite checkpoint, with fsyncs, when the store
            # closes: a no-op rebuild right after a build waited on the disk for it.
            if now - row[1] > _LAST_USED_GRAIN_S:
                db.execute("UPDATE cache SET last_used = ? WHERE key = ?", (now, key))
        return row[0]

    def cache_put(self, key: str, result: str, refs: Iterable[Digest] = ()) -> None:
        """Store `result` (JSON text) under `key`; `refs` are the blobs and diff_ids gc must keep for it."""
        now = time.time()
        with self._sql() as db, _transaction(db):
            db.execute(
                "INSERT OR REPLACE INTO cache (key, result, created, last_used) VALUES (?, ?, ?, ?)",
                (key, result, now, now),
            )
            db.execute("DELETE FROM cache_refs WHERE key = ?", (key,))
            db.executemany(
                "INSERT OR IGNORE INTO cache_refs (key, digest) VALUES (?, ?)", [(key, str(d)) for d in refs]
            )
            crash_point("cache-put")  # killed here, the transaction never happened

    def cache_delete(self, key: str) -> None:
        with self._sql() as db:
            db.execute("DELETE FROM cache WHERE key = ?", (key,))

    # --- usage and garbage collection -------------------------------------------

    def du(self) -> Usage:
        """Bytes on disk by kind: blobs, unpacked layers, the index."""
        blobs = count = 0
        for entry in os.scandir(self._blobs):
            if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                blobs += entry.stat(follow_symlinks=False).st_size
                count += 1
        unpacked = 0
        unpacked_count = 0
        seen: set[tuple[int, int]] = set()  # a COPY's layer shares inodes with its last run's
        for entry in os.scandir(self._unpacked):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                unpacked_count += 1
                unpacked += _tree_size(Path(entry.path), seen)
        index = sum(p.stat().st_size for p in self.root.glob("index.db*") if p.is_file())
        derived = [stat.st_size for _, stat in self._derived_files()]
        return Usage(blobs, count, unpacked, unpacked_count, index, sum(derived), len(derived))

    def _derived_files(self, name: str | None = None) -> Iterator[tuple[os.DirEntry[str], os.stat_result]]:
        """The files under DERIVED_DIRS (or the one `name`), with their stat."""
        for directory in DERIVED_DIRS if name is None else (name,):
            path = self.root / directory
            with contextlib.suppress(FileNotFoundError), os.scandir(path) as it:
                for entry in it:
                    if entry.is_file(follow_symlinks=False):
                        yield entry, entry.stat(follow_symlinks=False)

    def gc(
        self,
        *,
        cache_older_than: float | None = None,
        drop_all: bool = False,
        keep_bytes: int | None = None,
        remove_tree: Callable[[Path], None] | None = None,
    ) -> GcReport:
        """Remove what no image name and no cache entry needs (`lamina cache prune`).

        First drops cache entries: those not used for `cache_older_than`
        seconds, or with `drop_all` every one (every one that old, with both).
        `drop_all` also removes the unpacked trees of named images' layers
        (they are unpacked again when used). Then sweeps blobs and unpacked
        layers nothing needs. With `keep_bytes`, then drops the least recently
        used cache entries and unpacked trees until the store takes at most
        that many bytes; blobs of named images always stay, so it may not get
        there. `remove_tree` removes one unpacked layer directory; the default
        cannot remove files that subordinate ids own (rootless builds make
        them), so the API passes the sandbox's remover, which can. Needs the
        store to itself: raises StoreBusy while another lamina process has it open.
        """
        remove = remove_tree or _remove_tree
        with self.alone() as alone:
            if not alone:
                raise StoreBusy(f"gc {self.root}: another lamina process is using the store")
            cutoff = math.inf if drop_all else None
            if cache_older_than is not None:
                cutoff = time.time() - cache_older_than
            dropped = 0
            if cutoff is not None:
                with self._sql() as db:
                    dropped = db.execute("DELETE FROM cache WHERE last_used < ?", (cutoff,)).rowcount
            report = GcReport(0, 0, dropped, 0)
            legacy = self.root / "checks"  # build-check memos, files before they were cache entries
            if legacy.is_dir():
                report += GcReport(0, 0, 0, _tree_size(legacy, set()))
                remove(legacy)
            report += self._sweep(remove, unpacked_unused_since=cutoff if drop_all else None)
            if drop_all:
                report += self._drop_derived(cutoff or math.inf)
            if keep_bytes is not None:
                report += self._shrink(keep_bytes, remove)
            return report

    @contextlib.contextmanager
    def alone(self) -> Iterator[bool]:
        """Try to hold the store to ourselves (no other lamina process has it open), as gc does;
        yields whether we do. Inside, with True, every temporary file is a dead process's."""
        assert self._lock_fd is not None, "store not open"
        try:
            _flock(self._lock_fd, exclusive=True, wait=False)
        except BlockingIOError:
            _flock(self._lock_fd, exclusive=False, wait=True)  # flock conversion may drop ours
            yield False
            return
        try:
            yield True
        finally:
            _flock(self._lock_fd, exclusive=False, wait=True)

    def _needed_by_images(self) -> tuple[set[Digest], set[Digest]]:
        """The blobs named images need (index -> manifests -> config and layers), and their diff_ids."""
        from lamina.oci.image import MAX_DOCUMENT, ImageFormatError, Index, Manifest, parse_document

        with self._sql() as db:
            pending = [Digest.parse(row[0]) for row in db.execute("SELECT manifest FROM images")]
        keep: set[Digest] = set()
        while pending:
            digest = pending.pop()
            if digest in keep:
                continue
            keep.add(digest)
            if not self.has_blob(digest):
                continue
            try:
                data = self.read_blob(digest, MAX_DOCUMENT)
                media_type = parse_document(data, str(digest)).get("mediaType", "")
                if "index" in media_type or "list" in media_type:
                    pending.extend(m.digest for m in Index.from_bytes(data).manifests)
                else:
                    manifest = Manifest.from_bytes(data)
                    pending.append(manifest.config.digest)
                    pending.extend(layer.digest for layer in manifest.layers)
            except (ImageFormatError, StoreError):
                continue  # a root that is not a document keeps only itself
        diff_ids = {record.diff_id for record in map(self.layer, keep) if record is not None}
        return keep, diff_ids

    def _sweep(self, remove_tree: Callable[[Path], None], unpacked_unused_since: float | None) -> GcReport:
        """Remove the blobs and unpacked trees that neither a named image nor a cache entry needs.

        With `unpacked_unused_since`, named images' unpacked trees not used since then go too.
        """
        image_blobs, image_diff_ids = self._needed_by_images()
        with self._sql() as db:
            refs = {Digest.parse(row[0]) for row in db.execute("SELECT DISTINCT digest FROM cache_refs")}
            last_used = dict(db.execute("SELECT diff_id, last_used FROM unpacked").fetchall())
        keep = image_blobs | refs
        keep_diff_ids = set(refs)
        for digest in refs:
            record = self.layer(digest)
            if record is not None:
                keep_diff_ids.add(record.diff_id)
        if unpacked_unused_since is None:
            keep_diff_ids |= image_diff_ids
        else:
            keep_diff_ids |= {d for d in image_diff_ids if last_used.get(str(d), 0) >= unpacked_unused_since}

        freed = blobs_removed = unpacked_removed = 0
        now = time.time()
        for entry in os.scandir(self._blobs):
            stat = entry.stat(follow_symlinks=False)
            if entry.name.startswith(".tmp-"):
                if now - stat.st_mtime > _STALE_TMP_S:
                    os.unlink(entry.path)
                    freed += stat.st_size
                continue
            if Digest("sha256", entry.name) not in keep:
                os.unlink(entry.path)
                freed += stat.st_size
                blobs_removed += 1
        with self._sql() as db:
            db.execute(
                "DELETE FROM layers WHERE blob NOT IN (SELECT value FROM json_each(?))",
                (_json_list(str(d) for d in keep),),
            )
        for entry in os.scandir(self._unpacked):
            if not entry.is_dir(follow_symlinks=False):
                continue
            # .tmp-* (uppers, unpacks) and .lamina-work-* (overlay's work dirs) of dead processes
            stale_tmp = entry.name.startswith(".") and now - entry.stat().st_mtime > _STALE_TMP_S
            unused = not entry.name.startswith(".") and Digest("sha256", entry.name) not in keep_diff_ids
            if stale_tmp or unused:
                removed = self._remove_unpacked(Path(entry.path), remove_tree)
                if removed is not None:
                    freed += removed
                    unpacked_removed += 1
        with self._sql() as db:
            db.execute(
                "DELETE FROM unpacked WHERE diff_id NOT IN (SELECT value FROM json_each(?))",
                (_json_list(str(d) for d in keep_diff_ids),),
            )
        freed += self._clear_scratch(remove_tree)
        freed += self._sweep_copies(now)
        self._clear_locks()
        self._forget_pending()
        return GcReport(blobs_removed, unpacked_removed, 0, freed)

    def _sweep_copies(self, now: float) -> int:
        """Remove COPY's records of layer dirs no longer unpacked (and stale temporary
        files there); the bytes freed."""
        freed = 0
        for entry, stat in list(self._derived_files(_BY_LAYER_DIR)):
            if entry.name.startswith("."):
                gone = now - stat.st_mtime > _STALE_TMP_S
            else:
                layer_dir = entry.name.removesuffix(".bin").partition("-")[2]
                gone = not layer_dir or not (self._unpacked / layer_dir).is_dir()
            if gone:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    freed += stat.st_size
        return freed

    def _drop_derived(self, unused_since: float) -> GcReport:
        """Remove every derived record (DERIVED_DIRS) not used since `unused_since` (`prune -a`)."""
        freed = 0
        for entry, stat in list(self._derived_files()):
            if stat.st_mtime < unused_since:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    freed += stat.st_size
        return GcReport(0, 0, 0, freed)

    def _forget_pending(self) -> None:
        """Drop the pending rows whose manifest went (nothing named it any more)."""
        with self._sql() as db:
            rows = [row[0] for row in db.execute("SELECT manifest FROM pending")]
            gone = [(m,) for m in rows if not self.has_blob(Digest.parse(m))]
            db.executemany("DELETE FROM pending WHERE manifest = ?", gone)

    def _clear_locks(self) -> None:
        """Remove the step lock files under locks/ (one per step key ever built: they only
        grow). gc holds the store alone, so no build holds one; a build makes its own again."""
        locks = self.root / "locks"
        for entry in os.scandir(locks) if locks.is_dir() else ():
            if entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    @staticmethod
    def _remove_unpacked(path: Path, remove_tree: Callable[[Path], None]) -> int | None:
        """Bytes freed by removing one unpacked tree, None when it could not go."""
        size = _tree_size(path, set())
        with contextlib.suppress(OSError, LaminaError):
            remove_tree(path)  # what cannot go stays, and is not counted
        return None if os.path.exists(path) else size

    def _shrink(self, keep_bytes: int, remove_tree: Callable[[Path], None]) -> GcReport:
        """Drop the least recently used cache entries and named images' unpacked trees, oldest
        first, until the store takes at most `keep_bytes` (or nothing is left to drop).

        What an entry frees is estimated (the blobs and trees that only it refers to);
        the sweep then frees the real amount, and a short estimate (trees sharing
        inodes) makes another round.
        """
        report = GcReport(0, 0, 0, 0)
        tried: set[str] = set()  # trees asked to go: one that cannot must not be tried forever
        while (total := self.du().total) > keep_bytes:
            candidates, refs, users, pinned = self._shrink_candidates(tried)
            drop_keys, drop_trees = self._shrink_choice(
                candidates, refs, users, pinned, total - keep_bytes, tried
            )
            if not drop_keys and not drop_trees:
                break  # what is left is named images' blobs and the index
            with self._sql() as db:
                db.execute(
                    "DELETE FROM cache WHERE key IN (SELECT value FROM json_each(?))",
                    (_json_list(drop_keys),),
                )
            report += GcReport(0, 0, len(drop_keys), 0)
            for tree in drop_trees:
                removed = self._remove_unpacked(tree, remove_tree)
                if removed is not None:
                    report += GcReport(0, 1, 0, removed)
            report += self._sweep(remove_tree, unpacked_unused_since=None)
        return dataclasses.replace(report, size_after=self.du().total)

    def _shrink_candidates(
        self, tried: set[str]
    ) -> tuple[list[tuple[float, int, str]], dict[str, list[str]], dict[str, int], set[str]]:
        """What _shrink may drop, least recently used first, as (last used, kind, name): cache
        entries (kind 0) and the unpacked trees of named images' layers not yet tried (kind 1);
        with each entry's refs, how many entries use each ref, and the refs named images pin."""
        image_blobs, image_diff_ids = self._needed_by_images()
        with self._sql() as db:
            entries = db.execute("SELECT key, last_used FROM cache").fetchall()
            refs: dict[str, list[str]] = {}
            for key, digest in db.execute("SELECT key, digest FROM cache_refs"):
                refs.setdefault(key, []).append(digest)
            unpacked_used = dict(db.execute("SELECT diff_id, last_used FROM unpacked").fetchall())
        users: dict[str, int] = {}
        for digests in refs.values():
            for digest in digests:
                users[digest] = users.get(digest, 0) + 1
        pinned = {str(d) for d in image_blobs | image_diff_ids}
        # (last used, kind, name): cache entries and the unpacked trees of named images' layers
        candidates = [(used, 0, key) for key, used in entries]
        candidates += [
            (unpacked_used.get(str(d), 0.0), 1, d.hex)
            for d in image_diff_ids
            if d.algorithm == "sha256" and d.hex not in tried and (self._unpacked / d.hex).is_dir()
        ]
        candidates.sort()
        return candidates, refs, users, pinned

    def _shrink_choice(
        self,
        candidates: list[tuple[float, int, str]],
        refs: dict[str, list[str]],
        users: dict[str, int],
        pinned: set[str],
        excess: int,
        tried: set[str],
    ) -> tuple[list[str], list[Path]]:
        """The cache keys and unpacked trees to drop, oldest first, until their estimated
        size covers `excess`; a tree chosen is added to `tried`."""
        drop_keys: list[str] = []
        drop_trees: list[Path] = []
        for _, kind, name in candidates:
            if excess <= 0:
                break
            if kind == 1:
                tried.add(name)
                drop_trees.append(self._unpacked / name)
                excess -= _tree_size(self._unpacked / name, set())
                continue
            drop_keys.append(name)
            for digest in refs.get(name, ()):
                users[digest] -= 1
                if users[digest] == 0 and digest not in pinned:
                    excess -= self._bytes_of(Digest.parse(digest))
        return drop_keys, drop_trees

    def _bytes_of(self, digest: Digest) -> int:
        """What a cache ref takes: its blob, and its unpacked tree if it names one."""
        size = 0
        with contextlib.suppress(OSError, StoreError):
            size += self.blob_size(digest)
        if digest.algorithm == "sha256" and (self._unpacked / digest.hex).is_dir():
            size += _tree_size(self._unpacked / digest.hex, set())
        return size

    def _clear_scratch(self, remove_tree: Callable[[Path], None]) -> int:
        """Empty `tmp/`, where builds keep scratch dirs; a killed build (SIGKILL) leaves its own
        there. gc holds the store alone, so none is in use. Returns the bytes freed."""
        freed = 0
        scratch = self.root / "tmp"
        for entry in os.scandir(scratch) if scratch.is_dir() else ():
            path = Path(entry.path)
            is_dir = entry.is_dir(follow_symlinks=False)
            size = _tree_size(path, set()) if is_dir else entry.stat(follow_symlinks=False).st_size
            with contextlib.suppress(OSError, LaminaError):
                if is_dir:
                    remove_tree(path)
                else:
                    path.unlink()
            if not os.path.lexists(path):
                freed += size
        return freed


def _remove_tree(path: Path) -> None:
    from lamina.oci.safepath import remove_tree

    remove_tree(path)  # any depth, no recursion, never follows links


def _json_list(items: Iterable[str]) -> str:
    import json

    return json.dumps(sorted(items))


def _layer_record(row: tuple[str, str, str, int]) -> LayerRecord:
    return LayerRecord(Digest.parse(row[0]), Digest.parse(row[1]), row[2], row[3])


def _image_record(row: tuple[str, str, int, str]) -> ImageRecord:
    return ImageRecord(row[0], Digest.parse(row[1]), row[2], row[3])


def _tree_size(root: Path, seen: set[tuple[int, int]]) -> int:
    """Apparent size of a tree, each hard-linked inode not in `seen` counted once."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _open_index(root: Path, read_only: bool = False, no_cow: bool = False) -> sqlite3.Connection:
    import sqlite3

    if read_only:
        return _open_index_read_only(root)

    # Switching a new database to WAL answers "database is locked" at once, without
    # waiting on the busy timeout, when another process is doing the same: openers
    # take turns on a lock of their own (not the store lock, which gc upgrades).
    with _open_lock(root):
        if no_cow:
            _make_no_cow(root)
        db = sqlite3.connect(
            root / "index.db",
            timeout=_BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                with _transaction(db):
                    # executescript() would COMMIT first: run the statements one by one.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db


def _make_no_cow(root: Path) -> None:
    """Make the index's files that do not exist yet, empty and no-copy-on-write (btrfs).

    SQLite writes the -shm file through a memory mapping: where btrfs must find room again
    for a page it has written back (copy on write), a full disk is a SIGBUS, not an error
    SQLite could return (lamina.cache.sigbus). A no-copy-on-write file is overwritten in
    place, so only growing one needs room, and SQLite grows the -shm and -wal files with
    write(2), which fails as it should (a mapped write into a no-copy-on-write file on a
    full btrfs works since the kernel fix "btrfs: fix -ENOSPC mmap write failure on NOCOW
    files/extents", 2025; a qgroup limit still refuses it). Only an empty file takes the
    flag, and the last connection to close removes the -wal and -shm files: each first
    opener makes them again here (under open.lock, which closers take too). SQLite keeps
    the files it finds (and gives them the database file's mode).
    """
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        try:
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError:  # there already (another process has the store open), or not ours to make
            continue
        try:
            mark_no_cow(fd)
        finally:
            os.close(fd)


def _open_index_read_only(root: Path) -> sqlite3.Connection:
    """The index of a store this user cannot write. SQLite reads a WAL database so only when
    its -shm file is there (a writer has the store open) or, failing that, as immutable."""
    import sqlite3
    import urllib.parse

    uri = "file:" + urllib.parse.quote(str(root / "index.db"))
    for flags in ("?mode=ro", "?mode=ro&immutable=1"):
        db = sqlite3.connect(uri + flags, uri=True, isolation_level=None, check_same_thread=False)
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                db.close()
                raise StoreError(f"store index {root / 'index.db'}: an older lamina's, read-only here")
            return db
        except sqlite3.OperationalError:
            db.close()
    raise StoreError(f"store index {root / 'index.db'}: cannot be read by this user")


def _take_open_lock(root: Path) -> int:
    """The open.lock held exclusively: close the fd to let go."""
    fd = os.open(root / "open.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _flock(fd, exclusive=True, wait=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _open_lock(root: Path) -> Iterator[None]:
    fd = _take_open_lock(root)
    try:
        yield
    finally:
        os.close(fd)


def _flock(fd: int, *, exclusive: bool, wait: bool) -> None:
    import fcntl

    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    fcntl.flock(fd, op if wait else op | fcntl.LOCK_NB)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    # BEGIN IMMEDIATE takes the write lock up front, so two writers queue on the
    # busy timeout instead of one failing halfway with "database is locked".
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
