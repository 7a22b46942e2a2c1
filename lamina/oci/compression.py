"""Layer compressions: what they are called, how to encode and decode them.

Encoders are chunk functions (`compress(bytes) -> bytes`, `flush() -> bytes`)
so that the layer writer can hash the compressed bytes on their way out.
Both encoders are deterministic: gzip is written with mtime 0, no file name
and a fixed OS byte; zstd with fixed parameters. zstd's multi-threaded output
does not depend on the number of worker threads (as long as it is >= 1), so
a layer has the same digest on a 2-core laptop and a 64-core builder.

`isal` and `zstandard` are imported inside functions: importing lamina must
stay cheap.
"""

from __future__ import annotations

import enum
import io
import os
from collections.abc import Callable
from typing import BinaryIO, Protocol

from lamina.errors import LayerError
from lamina.oci.digest import Digest
from lamina.oci.image import (
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_ZSTD,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
)

# ISA-L levels run 0-3; 1 and 2 are the fast ones (~1 GB/s a core here) and
# compress like zlib's level 4-6 on real file trees.
GZIP_LEVEL = 1
ZSTD_LEVEL = 3
# Always at least one worker: zstd's multi-threaded format differs from the
# single-threaded one, but not between worker counts. Twice the cores (4 on
# two): the caller fills one job while the oldest is flushed in order, so with
# as many workers as cores about one compresses at a time (1 MB jobs, level 3
# on 2 cores: 2 workers 207 MB/s with 0.42 CPU-s per 100 MB, 4 workers 368
# MB/s with 0.38; the same bytes).
ZSTD_WORKERS = max(2, min(8, 2 * (os.cpu_count() or 1)))
# Small jobs bound the multi-threaded compressor's buffers (the default job
# size for level 3 costs ~50 MB more RSS) at no measurable cost in ratio.
# Part of the output format: changing it changes every zstd digest.
ZSTD_JOB_SIZE = 1 << 20

CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"

    @property
    def media_type(self) -> str:
        """The OCI layer media type of a layer in this compression."""
        return _OCI_LAYER_TYPES[self]

    @property
    def docker_media_type(self) -> str:
        """The Docker (schema 2) layer media type of a layer in this compression."""
        return _DOCKER_LAYER_TYPES[self]

    @classmethod
    def parse(cls, name: str) -> Compression:
        """Parse a user-given name (`gzip`, `zstd`, `none`/`uncompressed`)."""
        lowered = name.strip().lower()
        if lowered == "uncompressed":
            return cls.NONE
        try:
            return cls(lowered)
        except ValueError:
            raise LayerError(f"unknown compression {name!r}: choose gzip, zstd or none") from None

    @classmethod
    def from_media_type(cls, media_type: str) -> Compression:
        """The compression a layer media type (OCI or Docker) declares; LayerError for
        anything that is not a layer."""
        try:
            return _LAYER_TYPES[media_type]
        except KeyError:
            raise LayerError(f"unsupported layer media type {media_type!r}") from None

    @classmethod
    def sniff(cls, head: bytes) -> Compression:
        """Guess the compression from the first bytes of a stream (at least 4)."""
        if head.startswith(_GZIP_MAGIC):
            return cls.GZIP
        if head.startswith(_ZSTD_MAGIC):
            return cls.ZSTD
        return cls.NONE


_OCI_LAYER_TYPES = {
    Compression.NONE: OCI_LAYER,
    Compression.GZIP: OCI_LAYER_GZIP,
    Compression.ZSTD: OCI_LAYER_ZSTD,
}
_DOCKER_LAYER_TYPES = {
    Compression.NONE: DOCKER_LAYER,
    Compression.GZIP: DOCKER_LAYER_GZIP,
    Compression.ZSTD: DOCKER_LAYER_ZSTD,
}
_LAYER_TYPES: dict[str, Compression] = {
    **{media_type: c for c, media_type in _OCI_LAYER_TYPES.items()},
    **{media_type: c for c, media_type in _DOCKER_LAYER_TYPES.items()},
    # Non-distributable layers: the same bytes, a different promise about pushing.
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}


class Encoder(Protocol):
    def compress(self, data: bytes | memoryview, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes | memoryview, /) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


class _Zstd:
    """zstandard's compressobj with a `flush()` that ends the frame."""

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        import zstandard

        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=ZSTD_WORKERS, job_size=ZSTD_JOB_SIZE, write_checksum=True
        )
        compressor = zstandard.ZstdCompressor(compression_params=params)
        self._obj = compressor.compressobj()

    def compress(self, data: bytes | memoryview, /) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


def encoder(compression: Compression, level: int | None = None) -> Encoder:
    """A fresh deterministic encoder for one stream.

    `level` is BuildKit's `compression-level=`: gzip 0-9 as zlib (and Go's
    compress/gzip) number them, zstd's own levels. None is lamina's default
    (ISA-L level 1 for gzip, zstd 3). An explicit gzip level is zlib's, not
    ISA-L's 0-3 scale: level 9 then means what it means to BuildKit.
    """
    if compression is Compression.GZIP:
        if level is not None:
            import zlib

            if not 0 <= level <= 9:
                raise LayerError(f"gzip compression level {level}: use 0..9")
            # wbits 31: gzip wrapper; zlib writes mtime 0 and no name for a raw stream.
            return zlib.compressobj(level, zlib.DEFLATED, 31)
        from isal import isal_zlib

        # wbits 31: gzip wrapper; ISA-L writes mtime 0, no name, OS 0xff.
        return isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 31)
    if compression is Compression.ZSTD:
        if level is not None and not 0 <= level <= 22:
            raise LayerError(f"zstd compression level {level}: use 0..22")
        return _Zstd(ZSTD_LEVEL if level is None else level)
    return _Identity()


def open_decompressed(stream: BinaryIO, compression: Compression | None = None) -> BinaryIO:
    """A reader of the uncompressed bytes of `stream`; `None` sniffs the magic.

    Decoding errors surface as LayerError from `read()`.
    """
    if compression is None:
        compression, stream = sniff_stream(stream)
    if compression is Compression.NONE:
        return stream
    return _Checked(_decoder(stream, compression), compression)


def sniff_stream(stream: BinaryIO) -> tuple[Compression, BinaryIO]:
    """The compression of `stream` by its magic, and a reader of the same bytes."""
    head = read_upto(stream, 4)
    return Compression.sniff(head), _Prefixed(head, stream)  # type: ignore[return-value]


class _Reader(io.RawIOBase):
    """A raw reader defined by its `read`; `readinto`, which buffered readers
    and tarfile call, follows from it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


class TeeReader(_Reader):
    """Passes every byte read from `inner` to `sink` as well (a file's `write`, a hash's `update`)."""

    def __init__(self, inner: BinaryIO, sink: Callable[[bytes], object]) -> None:
        self._inner = inner
        self._sink = sink

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._sink(data)
        return data


class HashingReader(TeeReader):
    """Hashes (sha256) and counts the bytes read through it."""

    def __init__(self, inner: BinaryIO) -> None:
        import hashlib

        super().__init__(inner, self._take)
        self.hash = hashlib.sha256()
        self.count = 0

    def _take(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    @property
    def digest(self) -> Digest:
        return Digest("sha256", self.hash.hexdigest())


def hash_decoded(
    stream: BinaryIO, compression: Compression, inspect: Callable[[BinaryIO], object] | None = None
) -> tuple[Digest, int]:
    """Digest and size of the decoded bytes of `stream`, in one pass.

    `inspect`, if given, reads the decoded bytes first (to check or copy
    them); what it leaves is read after it. Then `stream` is read to its end:
    bytes after the compressed data still belong to a blob, and a wrapper
    that hashes or copies `stream` must see them all.
    """
    decoded = HashingReader(open_decompressed(stream, compression))
    if inspect is not None:
        inspect(decoded)  # type: ignore[arg-type]
    drain(decoded)  # type: ignore[arg-type]
    drain(stream)
    return decoded.digest, decoded.count


def drain(reader: BinaryIO) -> None:
    """Read `reader` to its end, for what its wrappers do with the bytes."""
    while reader.read(CHUNK):
        pass


def _decoder(stream: BinaryIO, compression: Compression) -> BinaryIO:
    if compression is Compression.GZIP:
        from isal import igzip

        return igzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    return _ZstdReader(stream)  # type: ignore[return-value]


def read_upto(stream: BinaryIO, n: int) -> bytes:
    """`n` bytes of `stream`, fewer only at its end (a raw stream may return short reads before it)."""
    data = stream.read(n)
    if len(data) < n:
        parts = [data]
        got = len(data)
        while got < n and (more := stream.read(n - got)):
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


class _Prefixed(_Reader):
    """`head` followed by the rest of `stream`: sniffing without seeking."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size < 0:
                head, self._head = self._head, b""
                return head + self._stream.read()
            head, self._head = self._head[:size], self._head[size:]
            return head
        return self._stream.read(size)


class _ZstdReader(_Reader):
    """Decodes concatenated zstd frames; a stream cut inside a frame is an error.

    zstandard's `stream_reader` bounds its output per read (a frame of RLE
    blocks expands 32768-fold, so unbounded decoding of hostile input could
    exhaust memory), but returns a short result, silently, when its input
    ends mid-frame. `_FrameTracker` follows the frame structure of the bytes
    on their way in, to tell a clean end from a cut.
    """

    def __init__(self, stream: BinaryIO) -> None:
        import zstandard

        self._source = _FrameTracker(stream)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self._source, read_size=CHUNK, read_across_frames=True, closefd=False
        )

    def read(self, size: int = -1) -> bytes:
        data = self._reader.read(size)
        if size < 0 or (size and not data):  # at the end
            drain(self._source)  # type: ignore[arg-type]  # anything the decoder left unread
            self._source.check_complete()
        return data


class _FrameTracker:
    """Passes bytes through while walking zstd's frame format (RFC 8878):
    frame header, blocks (3-byte headers with their sizes), optional
    checksum; skippable frames are skipped."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self._state = "magic"
        self._want = 4  # bytes the current field needs
        self._field = bytearray()
        self._skip = 0  # bytes of block content or skippable frame to pass
        self._checksum = False

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._feed(memoryview(data))
        return data

    def check_complete(self) -> None:
        if self._state != "magic" or self._field or self._skip:
            raise LayerError("corrupt zstd stream: truncated inside a frame")

    def _feed(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            if self._skip:
                step = min(self._skip, len(data) - pos)
                self._skip -= step
                pos += step
                continue
            step = min(self._want - len(self._field), len(data) - pos)
            self._field += data[pos : pos + step]
            pos += step
            if len(self._field) == self._want:
                field = bytes(self._field)
                self._field.clear()
                self._advance(field)

    def _advance(self, field: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(field, "little")
            if magic == 0xFD2FB528:
                self._state, self._want = "descriptor", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._want = "skippable", 4
            else:
                raise LayerError("corrupt zstd stream: bad frame magic")
        elif state == "skippable":
            self._skip = int.from_bytes(field, "little")
            self._state, self._want = "magic", 4
        elif state == "descriptor":
            fhd = field[0]
            single_segment = (fhd >> 5) & 1
            self._checksum = bool((fhd >> 2) & 1)
            content_size = (single_segment, 2, 4, 8)[fhd >> 6]
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3] + content_size
            self._skip = rest
            self._state, self._want = "block", 3
        elif state == "block":
            header = int.from_bytes(field, "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise LayerError("corrupt zstd stream: reserved block type")
            self._skip = 1 if kind == 1 else size
            if last:
                if self._checksum:
                    self._skip += 4
                self._state, self._want = "magic", 4


class _Checked(_Reader):
    """Turns a decoder's exceptions (zlib, zstd, EOF) into LayerError."""

    def __init__(self, inner: BinaryIO, compression: Compression) -> None:
        self._inner = inner
        self._compression = compression

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._inner.read(size)
        except LayerError:
            raise
        except Exception as err:  # zlib.error, zstd.ZstdError, EOFError, OSError...
            raise LayerError(f"corrupt {self._compression.value} stream: {err}") from err
        return data
