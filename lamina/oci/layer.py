"""Layer writer: sorted LayerEntry values -> one deterministic tar stream.

One pass produces the compressed stream, its digest and size, and the
digest of the uncompressed tar (the diff_id). The stdlib `tarfile` runs in
mode 'w' over `_HashingSink`, a forward-only writer with `tell()`: stream
mode 'w|' re-copies its whole buffer on every write (37 MB/s here).

Determinism, so that the same input gives the same bytes:
- entries must arrive in `entry_key` order (see `sorted_entries`); the
  writer checks the order instead of sorting, so it never holds a layer's
  entry list in memory;
- PAX format; uname/gname empty; uid/gid/mode as given; mtimes clamped to
  SOURCE_DATE_EPOCH when it is set; no atime/ctime;
- xattrs as `SCHILY.xattr.NAME` PAX records, in name order;
- compressors with fixed parameters and no timestamps (compression.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tarfile
from collections.abc import Iterable
from typing import BinaryIO

from lamina.errors import LayerError
from lamina.oci.compression import (
    CHUNK,
    Compression,
    Encoder,
    HashingReader,
    encoder,
    open_decompressed,
    sniff_stream,
)
from lamina.oci.digest import Digest
from lamina.oci.entry import EntryType, LayerEntry

__all__ = [
    "Compression",
    "LayerInfo",
    "describe_layer",
    "entry_key",
    "recompress",
    "sorted_entries",
    "write_layer",
]

_TAR_TYPES = {
    EntryType.FILE: tarfile.REGTYPE,
    EntryType.DIR: tarfile.DIRTYPE,
    EntryType.SYMLINK: tarfile.SYMTYPE,
    EntryType.HARDLINK: tarfile.LNKTYPE,
    EntryType.CHAR: tarfile.CHRTYPE,
    EntryType.BLOCK: tarfile.BLKTYPE,
    EntryType.FIFO: tarfile.FIFOTYPE,
}

XATTR_PAX_PREFIX = "SCHILY.xattr."


@dataclasses.dataclass(frozen=True, slots=True)
class LayerInfo:
    """The facts of a written layer blob."""

    digest: Digest  # of the compressed bytes (the blob)
    diff_id: Digest  # of the uncompressed tar
    size: int  # of the compressed bytes
    media_type: str

    @property
    def compression(self) -> Compression:
        return Compression.from_media_type(self.media_type)


def entry_key(path: str) -> tuple[bytes, ...]:
    """Sort key of a layer path: component-wise, bytewise.

    This is the order of a depth-first walk with each directory's names
    sorted, so a directory comes right before its contents.
    """
    return tuple(part.encode("utf-8", "surrogateescape") for part in path.split("/"))


def sorted_entries(entries: Iterable[LayerEntry]) -> list[LayerEntry]:
    """`entries` in the order `write_layer` wants (holds them all in memory)."""
    return sorted(entries, key=lambda entry: entry_key(entry.path))


def write_layer(
    entries: Iterable[LayerEntry],
    out: BinaryIO,
    compression: Compression,
    *,
    source_date_epoch: int | None = None,
) -> LayerInfo:
    """Write `entries` as a tar stream, compressed, to `out`, in one pass.

    `entries` must be sorted by `entry_key(path)` with no duplicate paths
    (`sorted_entries` sorts a list); a HARDLINK's `linkname` must be an
    earlier path of the same layer. Only `out.write` is called on `out`.
    """
    sink = _HashingSink(out, encoder(compression))
    # copybufsize: tarfile's default of 16 KiB costs a write() per 16 KiB.
    with tarfile.TarFile(
        fileobj=sink,  # type: ignore[arg-type]
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
        copybufsize=CHUNK,
    ) as tar:
        previous: tuple[bytes, ...] | None = None
        seen_files: set[str] = set()
        for entry in entries:
            key = _check_entry(entry, previous, seen_files)
            previous = key
            if entry.type is EntryType.FILE:
                seen_files.add(entry.path)
            _add(tar, entry, source_date_epoch)
    return sink.finish(compression)


def recompress(
    blob: BinaryIO,
    source: Compression | None,
    target: Compression,
    out: BinaryIO,
) -> LayerInfo:
    """Re-encode a layer blob: decode `blob` (`source`, or sniffed when None)
    and encode it as `target` into `out`. The tar bytes, hence the diff_id,
    are unchanged."""
    sink = _HashingSink(out, encoder(target))
    reader = open_decompressed(blob, source)
    while chunk := reader.read(CHUNK):
        sink.write(chunk)
    return sink.finish(target)


def describe_layer(blob: BinaryIO, compression: Compression | None = None) -> LayerInfo:
    """Recompute a blob's digest, size and diff_id from its bytes (streamed).

    `compression` None sniffs it from the magic; the media type reported is
    the OCI one for that compression.
    """
    compressed = HashingReader(blob)
    stream: BinaryIO = compressed  # type: ignore[assignment]
    if compression is None:
        compression, stream = sniff_stream(stream)
    reader = open_decompressed(stream, compression)
    diff = hashlib.sha256()
    while chunk := reader.read(CHUNK):
        diff.update(chunk)
    # Bytes after the end of the compressed stream still belong to the blob.
    while compressed.read(CHUNK):
        pass
    return LayerInfo(
        digest=Digest("sha256", compressed.hash.hexdigest()),
        diff_id=Digest("sha256", diff.hexdigest()),
        size=compressed.count,
        media_type=compression.media_type,
    )


def _check_entry(
    entry: LayerEntry, previous: tuple[bytes, ...] | None, seen_files: set[str]
) -> tuple[bytes, ...]:
    path = entry.path
    parts = path.split("/")
    if not path or any(part in ("", ".", "..") for part in parts) or "\0" in path:
        raise LayerError(f"write layer: {path!r}: not a clean relative path")
    key = entry_key(path)
    if previous is not None and key <= previous:
        what = "duplicate path" if key == previous else "entries out of order (use sorted_entries)"
        raise LayerError(f"write layer: {path}: {what}")
    if entry.type is EntryType.HARDLINK and entry.linkname not in seen_files:
        raise LayerError(
            f"write layer: {path}: hard link target {entry.linkname!r} is not an earlier file of this layer"
        )
    if entry.type is EntryType.FILE and entry.size and entry.open is None:
        raise LayerError(f"write layer: {path}: file of {entry.size} bytes has no opener")
    return key


def _add(tar: tarfile.TarFile, entry: LayerEntry, source_date_epoch: int | None) -> None:
    info = tarfile.TarInfo(entry.path)
    info.type = _TAR_TYPES[entry.type]
    info.mode = entry.mode & 0o7777
    info.uid = entry.uid
    info.gid = entry.gid
    info.uname = ""
    info.gname = ""
    mtime = entry.mtime
    if source_date_epoch is not None and mtime > source_date_epoch:
        mtime = source_date_epoch
    info.mtime = mtime
    if entry.type in (EntryType.SYMLINK, EntryType.HARDLINK):
        info.linkname = entry.linkname
    if entry.type in (EntryType.CHAR, EntryType.BLOCK):
        info.devmajor = entry.devmajor
        info.devminor = entry.devminor
    if entry.xattrs:
        info.pax_headers = {
            XATTR_PAX_PREFIX + name: value.decode("utf-8", "surrogateescape")
            for name, value in sorted(entry.xattrs)
        }
    if entry.type is not EntryType.FILE or not entry.size:
        info.size = 0
        tar.addfile(info)
        return
    info.size = entry.size
    assert entry.open is not None  # checked in _check_entry
    try:
        with entry.open() as content:
            tar.addfile(info, _FullReads(content))
    except OSError as err:
        if str(err) == "unexpected end of data":  # tarfile.copyfileobj's short read
            raise LayerError(f"write layer: {entry.path}: file shorter than its {entry.size} bytes") from err
        raise LayerError(f"write layer: {entry.path}: {err.strerror or err}") from err


class _HashingSink:
    """Forward-only tar destination: hashes the tar bytes, compresses them,
    and hashes and counts the compressed bytes on their way to `out`."""

    def __init__(self, out: BinaryIO, enc: Encoder) -> None:
        self._out = out
        self._encoder = enc
        self._diff = hashlib.sha256()
        self._blob = hashlib.sha256()
        self._position = 0
        self._size = 0
        self._pending = bytearray()

    def tell(self) -> int:
        return self._position

    def write(self, data: bytes | memoryview) -> int:
        self._diff.update(data)
        self._position += len(data)
        # The encoder always gets whole CHUNKs: ISA-L's output depends on how
        # its input is split, and the blob must depend on the tar bytes only
        # (so `recompress` and `write_layer` agree, whatever tarfile does).
        view = memoryview(data).cast("B")
        if self._pending:
            taken = CHUNK - len(self._pending)
            self._pending += view[:taken]
            view = view[taken:]
            if len(self._pending) < CHUNK:
                return len(data)
            self._emit(self._encoder.compress(self._pending))
            self._pending.clear()
        while len(view) >= CHUNK:
            self._emit(self._encoder.compress(view[:CHUNK]))
            view = view[CHUNK:]
        self._pending += view
        return len(data)

    def _emit(self, compressed: bytes) -> None:
        if compressed:
            self._blob.update(compressed)
            self._size += len(compressed)
            self._out.write(compressed)

    def finish(self, compression: Compression) -> LayerInfo:
        if self._pending:
            self._emit(self._encoder.compress(self._pending))
        self._emit(self._encoder.flush())
        return LayerInfo(
            digest=Digest("sha256", self._blob.hexdigest()),
            diff_id=Digest("sha256", self._diff.hexdigest()),
            size=self._size,
            media_type=compression.media_type,
        )


class _FullReads:
    """tarfile takes a short read for the end of the file; openers may give
    raw streams (pipes, decoders) whose reads are short before the end."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner

    def read(self, size: int) -> bytes:
        data = self._inner.read(size)
        if len(data) >= size or not data:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            more = self._inner.read(size - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)
