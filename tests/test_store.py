"""The content store: atomic blobs, unpacked layers, names, cache results, sharing."""

from __future__ import annotations

import io
import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from lamina.cache.store import LayerRecord, Store, default_cache_root
from lamina.errors import DigestMismatch, ImageNotFound, StoreBusy, StoreError
from lamina.oci.digest import Digest


def test_default_cache_root_order() -> None:
    assert default_cache_root({"LAMINA_CACHE": "/c", "XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/c")
    assert default_cache_root({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/lamina")
    assert default_cache_root({"HOME": "/h"}) == Path("/h/.cache/lamina")
    assert default_cache_root({"LAMINA_CACHE": "", "HOME": "/h"}) == Path("/h/.cache/lamina")


def test_put_blob_names_it_by_content(store: Store) -> None:
    info = store.put_bytes(b"hello")
    assert info.digest == Digest.of_bytes(b"hello")
    assert info.size == 5
    assert store.blob_path(info.digest).read_bytes() == b"hello"
    with store.open_blob(info.digest) as f:
        assert f.read() == b"hello"
    assert store.has_blob(info.digest)


def test_digest_mismatch_is_rejected_and_leaves_nothing(store: Store) -> None:
    wrong = Digest.of_bytes(b"something else")
    with pytest.raises(DigestMismatch, match="hash to"):
        store.put_blob(io.BytesIO(b"hello"), wrong)
    assert not store.has_blob(wrong)
    assert not store.has_blob(Digest.of_bytes(b"hello"))
    assert os.listdir(store.root / "blobs" / "sha256") == []


def test_size_mismatch_is_rejected(store: Store) -> None:
    with pytest.raises(DigestMismatch, match="expected 4"):
        store.put_blob(io.BytesIO(b"hello"), Digest.of_bytes(b"hello"), size=4)
    assert not store.has_blob(Digest.of_bytes(b"hello"))


def test_failing_writer_leaves_no_blob_under_a_real_name(store: Store) -> None:
    class Boom(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError("disk on fire")
            return b"x" * 1000

    with pytest.raises(OSError, match="disk on fire"):
        store.put_blob(Boom())  # type: ignore[arg-type]
    assert os.listdir(store.root / "blobs" / "sha256") == []


def test_blob_writer_without_commit_is_discarded(store: Store) -> None:
    with store.blob_writer() as out:
        out.write(b"partial")
        assert out.tell() == 7
    assert os.listdir(store.root / "blobs" / "sha256") == []


def test_read_blob_is_capped(store: Store) -> None:
    info = store.put_bytes(b"x" * 100)
    with pytest.raises(StoreError, match="more than the 10"):
        store.read_blob(info.digest, 10)
    assert store.read_blob(info.digest, 100) == b"x" * 100


def test_missing_blob_is_a_store_error(store: Store) -> None:
    with pytest.raises(StoreError, match="not in the store"):
        store.open_blob(Digest.of_bytes(b"nope"))


def test_put_existing_blob_does_not_read_the_stream(store: Store) -> None:
    info = store.put_bytes(b"hello")

    class Unreadable(io.RawIOBase):
        def read(self, n: int = -1) -> bytes:
            raise AssertionError("read")

    assert store.put_blob(Unreadable(), info.digest) == info  # type: ignore[arg-type]


def test_names_tag_resolve_untag(store: Store) -> None:
    manifest = store.put_bytes(b"{}").digest
    store.tag("docker.io/library/a:1", manifest, size=10, created="2024-01-01T00:00:00Z")
    store.tag("docker.io/library/b:1", manifest, size=10)
    assert [r.name for r in store.images()] == ["docker.io/library/a:1", "docker.io/library/b:1"]
    record = store.resolve("docker.io/library/a:1")
    assert record.manifest == manifest and record.created == "2024-01-01T00:00:00Z"
    store.untag("docker.io/library/a:1")
    with pytest.raises(ImageNotFound, match="a:1"):
        store.resolve("docker.io/library/a:1")


def test_tag_needs_the_manifest_blob(store: Store) -> None:
    with pytest.raises(StoreError, match="not in the store"):
        store.tag("x:1", Digest.of_bytes(b"absent"), size=0)


def test_layer_relation_reuses_compressed_blobs(store: Store) -> None:
    tar = store.put_bytes(b"tar bytes")
    gz = store.put_bytes(b"gzipped bytes")
    diff_id = tar.digest
    store.record_layer(
        LayerRecord(gz.digest, diff_id, "application/vnd.oci.image.layer.v1.tar+gzip", gz.size)
    )
    store.record_layer(LayerRecord(tar.digest, diff_id, "application/vnd.oci.image.layer.v1.tar", tar.size))
    assert store.layer(gz.digest) == LayerRecord(
        gz.digest, diff_id, "application/vnd.oci.image.layer.v1.tar+gzip", gz.size
    )
    found = store.find_layer(diff_id, ["application/vnd.oci.image.layer.v1.tar+gzip"])
    assert found is not None and found.blob == gz.digest
    assert store.find_layer(diff_id, ["application/vnd.oci.image.layer.v1.tar+zstd"]) is None
    assert len(store.layers_for_diff_id(diff_id)) == 2


def test_cache_get_put(store: Store) -> None:
    assert store.cache_get("k") is None
    store.cache_put("k", '{"layer": 1}')
    assert store.cache_get("k") == '{"layer": 1}'
    store.cache_put("k", '{"layer": 2}')
    assert store.cache_get("k") == '{"layer": 2}'


def test_unpacked_publish_and_lose_the_race(store: Store) -> None:
    diff_id = Digest.of_bytes(b"layer")
    first = store.new_unpack_dir()
    (first / "a").write_text("1")
    second = store.new_unpack_dir()
    (second / "a").write_text("2")
    assert not store.has_unpacked(diff_id)
    assert store.publish_unpacked(first, diff_id) == store.unpacked_path(diff_id)
    assert store.publish_unpacked(second, diff_id) == store.unpacked_path(diff_id)
    assert (store.unpacked_path(diff_id) / "a").read_text() == "1"
    assert not second.exists()


def test_index_uses_wal(store: Store) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db = sqlite3.connect(store.root / "index.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_du_by_kind(store: Store) -> None:
    store.put_bytes(b"x" * 1000)
    d = store.new_unpack_dir()
    (d / "f").write_bytes(b"y" * 500)
    os.link(d / "f", d / "g")  # a hard link counts once
    store.publish_unpacked(d, Digest.of_bytes(b"l"))
    usage = store.du()
    assert (usage.blobs, usage.blob_count) == (1000, 1)
    assert (usage.unpacked, usage.unpacked_count) == (500, 1)
    assert usage.index > 0
    assert usage.total == usage.blobs + usage.unpacked + usage.index


def test_du_counts_a_file_two_layers_share_once(store: Store) -> None:
    first = store.new_unpack_dir()
    (first / "f").write_bytes(b"y" * 500)
    second = store.new_unpack_dir()
    os.link(first / "f", second / "f")  # a re-run COPY links what did not change
    (second / "new").write_bytes(b"z" * 20)
    store.publish_unpacked(first, Digest.of_bytes(b"1"))
    store.publish_unpacked(second, Digest.of_bytes(b"2"))
    assert (store.du().unpacked, store.du().unpacked_count) == (520, 2)


def test_gc_keeps_what_names_and_cache_refs_need(store: Store) -> None:
    from lamina.oci.image import OCI_CONFIG, OCI_LAYER, Manifest, descriptor_of

    layer = store.put_bytes(b"layer tar")
    config = store.put_bytes(b'{"rootfs":{"type":"layers","diff_ids":[]}}')
    manifest = Manifest(
        descriptor_of(store.read_blob(config.digest, 100), OCI_CONFIG),
        (descriptor_of(b"layer tar", OCI_LAYER),),
    )
    man = store.put_bytes(manifest.to_bytes())
    store.tag("img:1", man.digest, size=1)
    kept_by_cache = store.put_bytes(b"cached")
    garbage = store.put_bytes(b"garbage")
    store.record_layer(LayerRecord(layer.digest, layer.digest, OCI_LAYER, layer.size))
    live = store.new_unpack_dir()
    store.publish_unpacked(live, layer.digest)
    dead = store.new_unpack_dir()
    store.publish_unpacked(dead, Digest.of_bytes(b"dead"))
    store.cache_put("k", "{}", refs=[kept_by_cache.digest])

    report = store.gc()
    assert report.blobs_removed == 1 and report.unpacked_removed == 1
    for kept in (layer, config, man, kept_by_cache):
        assert store.has_blob(kept.digest)
    assert not store.has_blob(garbage.digest)
    assert store.has_unpacked(layer.digest)
    assert not store.has_unpacked(Digest.of_bytes(b"dead"))

    store.untag("img:1")
    store.cache_delete("k")
    store.gc()
    assert store.du().blob_count == 0


def test_gc_refuses_while_another_store_is_open(store: Store) -> None:
    with Store(store.root), pytest.raises(StoreBusy):
        store.gc()
    store.gc()  # and works again once the other one closed


def _writer_process(root: str, seed: int, n: int) -> None:
    try:
        _write_and_read(root, seed, n)
    except BaseException:
        import traceback

        Path(root, f"error-{seed}.txt").write_text(traceback.format_exc())
        raise


def _write_and_read(root: str, seed: int, n: int) -> None:
    # A store per blob, as separate lamina commands do: opening and closing meet too.
    for i in range(n):
        with Store(root) as store:
            data = f"blob {i % 10}".encode() * 1000  # the two writers share half their blobs
            info = store.put_bytes(data, Digest.of_bytes(data))
            store.tag(f"w{seed}:{i}", info.digest, size=info.size)
            store.cache_put(f"{seed}-{i}", f'"{i}"', refs=[info.digest])
            assert store.read_blob(info.digest, len(data)) == data


def test_two_processes_share_one_store(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path), seed, 40)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errors = "".join(f.read_text() for f in tmp_path.glob("error-*.txt"))
    assert [p.exitcode for p in procs] == [0, 0], errors
    with Store(tmp_path) as store:
        assert len(store.images()) == 80
        assert store.du().blob_count == 10
        assert store.cache_get("2-39") == '"39"'
        for name in os.listdir(tmp_path / "blobs" / "sha256"):
            assert Digest.of_bytes(store.blob_path(Digest("sha256", name)).read_bytes()).hex == name


def _crash_mid_write(root: str) -> None:
    with Store(root) as store:
        out = store.blob_writer()
        out.write(b"half a blob")
        out.flush()
        os._exit(3)  # a crash: no commit, no cleanup


def test_crash_mid_write_leaves_only_a_temp_file_that_gc_sweeps(tmp_path: Path) -> None:
    proc = multiprocessing.get_context("spawn").Process(target=_crash_mid_write, args=(str(tmp_path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    blobs = tmp_path / "blobs" / "sha256"
    (leftover,) = os.listdir(blobs)
    assert leftover.startswith(".tmp-")
    with Store(tmp_path) as store:
        assert store.du().blob_count == 0
        store.gc()
        assert os.listdir(blobs) == [leftover]  # young: may belong to a live writer
        os.utime(blobs / leftover, (0, 0))
        store.gc()
        assert os.listdir(blobs) == []


def test_blobs_are_read_only(store: Store) -> None:
    info = store.put_bytes(b"sealed")
    assert store.blob_path(info.digest).stat().st_mode & 0o777 == 0o444
    store.put_bytes(b"sealed")  # writing the same blob again still works


def test_one_store_shared_by_threads(store: Store) -> None:
    """The executor builds independent stages in threads over one Store."""
    from concurrent.futures import ThreadPoolExecutor

    def work(i: int) -> None:
        data = f"thread blob {i % 7}".encode() * 500
        info = store.put_bytes(data)
        store.cache_put(f"k{i}", f'"{i}"', refs=[info.digest])
        store.tag(f"t:{i}", info.digest, size=info.size)
        assert store.cache_get(f"k{i}") == f'"{i}"'

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(200)))
    assert len(store.images()) == 200
    assert store.du().blob_count == 7


def test_reading_a_fresh_cache_entry_and_retagging_write_nothing(tmp_path: Path) -> None:
    # A no-op rebuild reads its memo and renews its tags; a write would make SQLite
    # checkpoint with fsyncs on close, which waits on a disk busy with the last build.
    root = tmp_path / "store"
    with Store(root) as store:
        manifest = store.put_bytes(b"{}").digest
        store.tag("app:1", manifest, size=2, created="c")
        store.cache_put("memo", '"result"')
    index = root / "index.db"
    before = index.stat().st_mtime_ns
    with Store(root) as store:
        assert store.cache_get("memo") == '"result"'
        store.tag("app:1", manifest, size=2, created="c")
    assert index.stat().st_mtime_ns == before
    with Store(root) as store:
        store.tag("app:1", manifest, size=2, created="other")  # a real change is written
    assert index.stat().st_mtime_ns != before
