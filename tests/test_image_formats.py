"""Images in and out of the store: OCI archives, layout dirs, docker-archives, hostile files.

Every test that produces an image file ends with validate_image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lamina.cache.images import load_image_file, save_image, stored_image
from lamina.cache.store import Store
from lamina.errors import DigestMismatch, ImageFormatError, ImageNotFound, StoreError
from lamina.oci.compression import Compression, encoder
from lamina.oci.digest import Digest
from lamina.oci.image import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Index, Manifest
from lamina.oci.layout import ExportImage, write_oci_layout
from lamina.oci.validate import validate_image
from tests.support import BUSYBOX, BUSYBOX_NAME, schema

NAME = BUSYBOX_NAME


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def _tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:  # type: ignore[assignment]
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def _layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _compress(data: bytes, compression: Compression) -> bytes:
    enc = encoder(compression)
    return enc.compress(data) + enc.flush()


def _docker_archive(
    path: Path, layers: list[bytes], tags: list[str], layer_names: list[str] | None = None
) -> Path:
    """A docker-archive by hand: layers given as stored (compressed or not)."""
    diff_ids = []
    for blob in layers:
        raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        if blob[:4] == b"\x28\xb5\x2f\xfd":
            import zstandard

            raw = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = layer_names or [f"l{i}/layer.tar" for i in range(len(layers))]
    files = {config_name: config, **dict(zip(names, layers, strict=True))}
    files["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": tags, "Layers": names}]).encode()
    return _tar(path, files)


@pytest.fixture
def loaded(store: Store, busybox_image: Path) -> Store:
    load_image_file(store, busybox_image)
    return store


# --- round trips --------------------------------------------------------------------


def test_load_then_save_gives_the_same_manifest_and_bytes(
    loaded: Store, busybox_image: Path, tmp_path: Path
) -> None:
    record = loaded.resolve(NAME)
    out = tmp_path / "out.tar"
    descriptor = save_image(loaded, "lamina-test/busybox:1.35", out)
    assert descriptor.digest == record.manifest
    assert out.read_bytes() == busybox_image.read_bytes()
    assert validate_image(out)[0].manifest.digest == record.manifest


@pytest.mark.parametrize(
    ("fmt", "compression"), [("oci", None), ("oci", "zstd"), ("oci", "none"), ("docker", None)]
)
def test_saving_twice_gives_identical_bytes(
    loaded: Store, tmp_path: Path, fmt: str, compression: str | None
) -> None:
    wanted = Compression(compression) if compression else None
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    save_image(loaded, NAME, first, format=fmt, compression=wanted)
    save_image(loaded, NAME, second, format=fmt, compression=wanted)
    assert first.read_bytes() == second.read_bytes()
    validate_image(first)


def test_oci_archive_layout_and_annotations(loaded: Store, tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    save_image(loaded, NAME, out)
    members = _members(out)
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = Index.from_bytes(members["index.json"])
    (entry,) = index.manifests
    assert entry.annotation("org.opencontainers.image.ref.name") == "1.35"
    assert entry.annotation("io.containerd.image.name") == NAME
    manifest = Manifest.from_bytes(members[f"blobs/sha256/{entry.digest.hex}"])
    (docker,) = json.loads(members["manifest.json"])
    assert docker["RepoTags"] == ["lamina-test/busybox:1.35"]
    assert docker["Config"] == f"blobs/sha256/{manifest.config.digest.hex}"
    assert docker["Layers"] == [f"blobs/sha256/{layer.digest.hex}" for layer in manifest.layers]
    with tarfile.open(out) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == sorted(i.name for i in infos)
    assert {(i.mtime, i.uid, i.gid, i.uname) for i in infos} == {(0, 0, 0, "")}
    validate_image(out)


@pytest.mark.skipif(not schema.available(), reason="conformance schemas not found")
def test_saved_documents_are_schema_valid(loaded: Store, tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    save_image(loaded, NAME, out, compression=Compression.ZSTD)
    members = _members(out)
    schema.check_document(members["oci-layout"], "application/vnd.oci.layout.header.v1+json")
    schema.check_document(members["index.json"], OCI_INDEX)
    index = Index.from_bytes(members["index.json"])
    manifest_bytes = members[f"blobs/sha256/{index.manifests[0].digest.hex}"]
    schema.check_document(manifest_bytes, OCI_MANIFEST)
    manifest = Manifest.from_bytes(manifest_bytes)
    schema.check_document(members[f"blobs/sha256/{manifest.config.digest.hex}"], OCI_CONFIG)
    validate_image(out)


def test_recompressed_blob_is_made_once_and_reused(loaded: Store, tmp_path: Path) -> None:
    _, image = stored_image(loaded, NAME)
    save_image(loaded, NAME, tmp_path / "a.tar", compression=Compression.ZSTD)
    blobs = loaded.du().blob_count
    assert len(loaded.layers_for_diff_id(image.diff_ids[0])) == 2
    save_image(loaded, NAME, tmp_path / "b.tar", compression=Compression.ZSTD)
    assert loaded.du().blob_count == blobs
    validate_image(tmp_path / "b.tar")


def test_docker_format_loads_back_with_the_same_config(loaded: Store, tmp_path: Path) -> None:
    out = tmp_path / "docker.tar"
    save_image(loaded, NAME, out, format="docker")
    members = _members(out)
    (entry,) = json.loads(members["manifest.json"])
    assert entry["RepoTags"] == ["lamina-test/busybox:1.35"]
    assert json.loads(members["repositories"]) == {
        "lamina-test/busybox": {"1.35": entry["Layers"][0].split("/")[0]}
    }
    validate_image(out)
    with Store(tmp_path / "other") as other:
        (record,) = load_image_file(other, out, "copy:1")
        assert record.name == "docker.io/library/copy:1"
        _, original = stored_image(loaded, NAME)
        _, copy = stored_image(other, "copy:1")
        assert copy.config_bytes == original.config_bytes
        assert copy.diff_ids == original.diff_ids


def test_layout_directory_loads(loaded: Store, tmp_path: Path) -> None:
    record, image = stored_image(loaded, NAME)
    manifest = Manifest.from_bytes(image.manifest_bytes)
    layout = tmp_path / "layout"
    write_oci_layout(layout, [ExportImage(None, image.manifest, manifest.config, manifest.layers)], loaded)
    with pytest.raises(ImageFormatError, match="-t"):  # the index entry names no image
        load_image_file(loaded, layout)
    (copy,) = load_image_file(loaded, layout, "fromdir:1")
    assert copy.manifest == record.manifest
    validate_image(layout)


@pytest.mark.parametrize("kinds", [("none",), ("gzip",), ("zstd",), ("none", "gzip", "zstd")])
def test_docker_archive_with_any_layer_compression(
    store: Store, tmp_path: Path, kinds: tuple[str, ...]
) -> None:
    layers = [_compress(_layer_tar({f"f{i}": b"x" * 100 * i}), Compression(k)) for i, k in enumerate(kinds)]
    archive = _docker_archive(tmp_path / "d.tar", layers, ["example.com/a/b:2"])
    (record,) = load_image_file(store, archive)
    assert record.name == "example.com/a/b:2"
    out = tmp_path / "out.tar"
    save_image(store, "example.com/a/b:2", out)
    validate_image(out)
    validate_image(archive)


def test_docker_archive_loaded_twice_gives_the_same_manifest(store: Store, tmp_path: Path) -> None:
    archive = _docker_archive(tmp_path / "d.tar", [_layer_tar({"a": b"1"})], ["a:1"])
    (first,) = load_image_file(store, archive)
    (second,) = load_image_file(store, archive, "b:1")
    assert first.manifest == second.manifest


@pytest.mark.skipif(not BUSYBOX.exists(), reason="/bin/busybox missing")
def test_loads_archives_written_by_another_tool(store: Store, tmp_path: Path) -> None:
    """../shared/bench/mkbase.py writes both formats with the stdlib; lamina reads both."""
    mkbase = Path("/work/shared/bench/mkbase.py")
    if not mkbase.exists():
        pytest.skip("mkbase.py not found")
    subprocess.run([sys.executable, str(mkbase), str(tmp_path)], check=True, capture_output=True)
    (oci,) = load_image_file(store, tmp_path / "busybox-oci.tar")
    load_image_file(store, tmp_path / "busybox-docker.tar", "from-docker:1")
    assert oci.name == NAME
    _, a = stored_image(store, NAME)
    _, b = stored_image(store, "from-docker:1")
    assert a.config_bytes == b.config_bytes
    save_image(store, NAME, tmp_path / "again.tar")
    assert validate_image(tmp_path / "again.tar")[0].manifest.digest == oci.manifest


# --- names ----------------------------------------------------------------------------


def test_tag_overrides_the_name(store: Store, busybox_image: Path) -> None:
    (record,) = load_image_file(store, busybox_image, "mine:dev")
    assert record.name == "docker.io/library/mine:dev"
    with pytest.raises(ImageNotFound):
        store.resolve(NAME)


def test_bad_tag_is_refused_before_copying(store: Store, busybox_image: Path) -> None:
    with pytest.raises(StoreError, match="invalid reference"):
        load_image_file(store, busybox_image, "Upper:1")
    assert store.du().blob_count == 0


def test_tag_with_several_images_is_refused(store: Store, tmp_path: Path) -> None:
    one = _docker_archive(tmp_path / "1.tar", [_layer_tar({"a": b"1"})], ["a:1"])
    two = _docker_archive(tmp_path / "2.tar", [_layer_tar({"b": b"2"})], ["b:1"], ["l1/layer.tar"])
    merged = _members(one) | _members(two)
    merged["manifest.json"] = json.dumps(
        json.loads(_members(one)["manifest.json"]) + json.loads(_members(two)["manifest.json"])
    ).encode()
    both = _tar(tmp_path / "both.tar", merged)
    with pytest.raises(ImageFormatError, match="2 images"):
        load_image_file(store, both, "x:1")
    assert len(load_image_file(store, both)) == 2


def test_rmi_then_gc_frees_the_blobs(loaded: Store) -> None:
    assert loaded.du().blob_count == 3
    loaded.untag(NAME)
    loaded.gc()
    assert loaded.du().blob_count == 0


# --- hostile and broken files -----------------------------------------------------------


def test_member_escaping_with_dotdot_is_refused(store: Store, tmp_path: Path) -> None:
    bad = _tar(tmp_path / "bad.tar", {"../index.json": b"{}", "oci-layout": b"{}"})
    with pytest.raises(ImageFormatError, match=r"escapes the archive"):
        load_image_file(store, bad)


def test_absolute_member_is_refused(store: Store, tmp_path: Path) -> None:
    bad = _tar(tmp_path / "bad.tar", {"/etc/manifest.json": b"[]"})
    with pytest.raises(ImageFormatError, match="absolute"):
        load_image_file(store, bad)


def test_oversized_manifest_is_refused_unread(store: Store, tmp_path: Path) -> None:
    bad = _tar(tmp_path / "bad.tar", {"manifest.json": b"[" + b" " * (5 << 20) + b"]"})
    with pytest.raises(ImageFormatError, match="more than"):
        load_image_file(store, bad)


def test_not_an_image_archive(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError, match="neither an OCI layout"):
        load_image_file(store, _tar(tmp_path / "x.tar", {"hello": b"world"}))
    (tmp_path / "junk").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageFormatError, match="not a readable tar"):
        load_image_file(store, tmp_path / "junk")


def test_tampered_layer_is_refused_and_nothing_is_named(
    store: Store, busybox_image: Path, tmp_path: Path
) -> None:
    members = _members(busybox_image)
    index = Index.from_bytes(members["index.json"])
    manifest = Manifest.from_bytes(members[f"blobs/sha256/{index.manifests[0].digest.hex}"])
    path = f"blobs/sha256/{manifest.layers[0].digest.hex}"
    layer = bytearray(members[path])
    layer[-20] ^= 0xFF
    members[path] = bytes(layer)
    bad = _tar(tmp_path / "bad.tar", members)
    with pytest.raises(DigestMismatch):
        load_image_file(store, bad)
    assert store.images() == ()
    assert not store.has_blob(manifest.layers[0].digest)
    with pytest.raises(ImageFormatError, match="layer 0"):
        validate_image(bad)


def test_wrong_diff_id_is_refused(store: Store, tmp_path: Path) -> None:
    archive = _docker_archive(
        tmp_path / "d.tar", [_compress(_layer_tar({"a": b"1"}), Compression.GZIP)], ["a:1"]
    )
    members = _members(archive)
    (config_name,) = [n for n in members if n.endswith(".json") and n != "manifest.json"]
    config = json.loads(members[config_name])
    config["rootfs"]["diff_ids"] = [str(Digest.of_bytes(b"lie"))]
    data = json.dumps(config).encode()
    members.pop(config_name)
    members[hashlib.sha256(data).hexdigest() + ".json"] = data
    entry = json.loads(members["manifest.json"])
    entry[0]["Config"] = hashlib.sha256(data).hexdigest() + ".json"
    members["manifest.json"] = json.dumps(entry).encode()
    with pytest.raises(DigestMismatch, match="the tar hashes to"):
        load_image_file(store, _tar(tmp_path / "bad.tar", members))
    assert store.images() == ()


def test_manifest_blob_with_wrong_digest_is_refused(
    store: Store, busybox_image: Path, tmp_path: Path
) -> None:
    members = _members(busybox_image)
    index = Index.from_bytes(members["index.json"])
    path = f"blobs/sha256/{index.manifests[0].digest.hex}"
    members[path] = members[path].replace(b'"schemaVersion":2', b'"schemaVersion": 2')
    data = members[path]
    members["index.json"] = members["index.json"].replace(
        f'"size":{index.manifests[0].size}'.encode(), f'"size":{len(data)}'.encode()
    )
    with pytest.raises(ImageFormatError, match="different digest"):
        load_image_file(store, _tar(tmp_path / "bad.tar", members))


def test_truncated_gzip_layer_is_refused(store: Store, tmp_path: Path) -> None:
    blob = _compress(_layer_tar({"a": b"z" * 5000}), Compression.GZIP)
    archive = _docker_archive(tmp_path / "d.tar", [blob], ["a:1"])
    members = _members(archive)
    members["l0/layer.tar"] = blob[: len(blob) // 2]
    with pytest.raises((ImageFormatError, DigestMismatch)):
        load_image_file(store, _tar(tmp_path / "bad.tar", members))
    assert store.images() == ()


def test_config_named_by_the_wrong_digest_is_refused(store: Store, tmp_path: Path) -> None:
    archive = _docker_archive(tmp_path / "d.tar", [_layer_tar({"a": b"1"})], ["a:1"])
    members = _members(archive)
    (config_name,) = [n for n in members if n.endswith(".json") and n != "manifest.json"]
    members[config_name] = members[config_name].replace(b'"os": "linux"', b'"os": "linux" ')
    with pytest.raises(ImageFormatError, match="not the digest in its name"):
        load_image_file(store, _tar(tmp_path / "bad.tar", members))


def test_layout_dir_blob_symlinked_outside_is_refused(loaded: Store, tmp_path: Path) -> None:
    _, image = stored_image(loaded, NAME)
    manifest = Manifest.from_bytes(image.manifest_bytes)
    layout = tmp_path / "layout"
    write_oci_layout(layout, [ExportImage(NAME, image.manifest, manifest.config, manifest.layers)], loaded)
    outside = tmp_path / "outside"
    blob = layout / "blobs" / "sha256" / manifest.config.digest.hex
    blob.rename(outside)
    blob.symlink_to(outside)
    with pytest.raises(ImageFormatError, match="outside the layout"):
        load_image_file(loaded, layout)


def test_gzipped_archive_loads(loaded: Store, tmp_path: Path) -> None:
    """`docker save img | gzip > img.tar.gz` is a common way to ship images."""
    out = tmp_path / "docker.tar"
    save_image(loaded, NAME, out, format="docker")
    zipped = tmp_path / "docker.tar.gz"
    zipped.write_bytes(gzip.compress(out.read_bytes()))
    with Store(tmp_path / "other") as other:
        (record,) = load_image_file(other, zipped)
        assert record.name == NAME
    validate_image(zipped)


def test_layout_dir_with_a_fifo_blob_does_not_hang(loaded: Store, tmp_path: Path) -> None:
    _, image = stored_image(loaded, NAME)
    manifest = Manifest.from_bytes(image.manifest_bytes)
    layout = tmp_path / "layout"
    write_oci_layout(layout, [ExportImage(NAME, image.manifest, manifest.config, manifest.layers)], loaded)
    blob = layout / "blobs" / "sha256" / manifest.config.digest.hex
    blob.unlink()
    os.mkfifo(blob)
    with pytest.raises(ImageFormatError, match="not a regular file"):
        load_image_file(loaded, layout)


def test_validate_stored_finds_a_rotten_blob(loaded: Store) -> None:
    from lamina.cache.images import validate_stored

    image = validate_stored(loaded, NAME)
    path = loaded.blob_path(image.layers[0].digest)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageFormatError, match="layer 0"):
        validate_stored(loaded, NAME)
