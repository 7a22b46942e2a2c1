"""The layer writer's worker thread: layers larger than a CHUNK are compressed
beside the reading; the bytes, digests and errors must not change."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import threading

import pytest

from lamina.errors import LayerError
from lamina.oci.compression import CHUNK, Compression
from lamina.oci.entry import EntryType, LayerEntry
from lamina.oci.layer import recompress, write_layer


def _file(path: str, data: bytes, size: int | None = None) -> LayerEntry:
    return LayerEntry(
        path=path,
        type=EntryType.FILE,
        mode=0o644,
        size=len(data) if size is None else size,
        open=lambda: io.BytesIO(data),
    )


def _entries() -> list[LayerEntry]:
    """Small and large files mixed, so writes straddle CHUNK boundaries."""
    entries = [LayerEntry(path="d", type=EntryType.DIR, mode=0o755)]
    for i in range(40):
        entries.append(_file(f"d/small{i:02}", b"line %d\n" % i * (97 * i + 1)))
    entries.append(_file("d/zbig1", os.urandom(CHUNK + 12345)))
    entries.append(_file("d/zbig2", b"text " * (3 * CHUNK // 5)))
    return entries


class _FailingOut(io.RawIOBase):
    def __init__(self, after: int) -> None:
        self.left = after

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.left <= 0:
            raise OSError(28, "No space left on device")
        self.left -= len(data)
        return len(data)


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD])
def test_large_layer_digests_match_its_bytes(compression: Compression) -> None:
    out = io.BytesIO()
    info = write_layer(_entries(), out, compression)
    blob = out.getvalue()
    assert info.size == len(blob) > CHUNK // 2
    assert info.digest.hex == hashlib.sha256(blob).hexdigest()
    if compression is Compression.GZIP:
        assert info.diff_id.hex == hashlib.sha256(gzip.decompress(blob)).hexdigest()


def test_large_layer_same_bytes_as_recompressing_its_tar() -> None:
    """The blob depends on the tar bytes only, not on how the writes were cut."""
    entries = _entries()
    tar, gz = io.BytesIO(), io.BytesIO()
    plain = write_layer(entries, tar, Compression.NONE)
    direct = write_layer(entries, gz, Compression.GZIP)
    again = io.BytesIO()
    redone = recompress(io.BytesIO(tar.getvalue()), Compression.NONE, Compression.GZIP, again)
    assert again.getvalue() == gz.getvalue()
    assert (redone.digest, redone.diff_id) == (direct.digest, direct.diff_id)
    assert direct.diff_id == plain.diff_id == plain.digest


def test_write_failure_in_the_worker_reaches_the_caller() -> None:
    before = threading.active_count()
    # Raised while a file's content is written, it names that entry (as without the thread).
    with pytest.raises((OSError, LayerError), match="No space left"):
        write_layer(_entries(), _FailingOut(after=1000), Compression.NONE)
    assert threading.active_count() == before


def test_bad_entry_after_a_large_one_stops_the_worker() -> None:
    before = threading.active_count()
    entries = [*_entries(), _file("e", b"short", size=10)]
    with pytest.raises(LayerError, match="e: file shorter than its 10 bytes"):
        write_layer(entries, io.BytesIO(), Compression.GZIP)
    assert threading.active_count() == before
