"""Build cache shared through a registry: one manifest per step key, verified on import."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.cache.remote import CACHE_CONFIG, CacheEntry, entry_reference, export_entries, import_entry
from lamina.cache.store import Store
from lamina.errors import RegistryError
from lamina.oci.digest import Digest
from lamina.oci.image import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor
from lamina.oci.reference import parse_reference
from lamina.oci.registry import RegistryClient
from tests import registry_server

pytestmark = pytest.mark.skipif(registry_server.REGISTRY is None, reason="docker-registry is not installed")


def key_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def layer_tar(name: str, content: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def stored_entry(
    store: Store, step: str, compression: str = "gzip", diff_id: Digest | None = None
) -> CacheEntry:
    tar = layer_tar(f"{step}.txt", f"made by {step}\n".encode() * 100)
    if compression == "gzip":
        blob, media_type = gzip.compress(tar, mtime=0), OCI_LAYER_GZIP
    else:
        import zstandard

        blob, media_type = zstandard.ZstdCompressor().compress(tar), OCI_LAYER_ZSTD
    info = store.put_bytes(blob)
    result = json.dumps({"layer": step, "created": "2024-01-01T00:00:00Z"})
    layer = Descriptor(media_type, info.digest, info.size)
    return CacheEntry(key_of(step), result, layer, diff_id or Digest.of_bytes(tar))


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    with Store(tmp_path / "a") as a, Store(tmp_path / "b") as b:
        yield a, b


def test_export_then_import_on_a_fresh_store(
    registry: registry_server.Registry, stores: tuple[Store, Store]
) -> None:
    here, there = stores
    cache = parse_reference(f"{registry.host}/team/cache:main")
    entries = [
        stored_entry(here, "step1"),
        stored_entry(here, "step2", "zstd"),
        CacheEntry(key_of("metadata-only"), '{"layer": null}'),
    ]
    with RegistryClient() as client:
        assert export_entries(client, here, cache, entries) == 3
        assert export_entries(client, here, cache, entries) == 0  # already there: nothing written
        for entry in entries:
            got = import_entry(client, there, cache, entry.key)
            assert got == entry
            if entry.layer is not None:
                assert there.has_blob(entry.layer.digest)
                record = there.layer(entry.layer.digest)
                assert record is not None and record.diff_id == entry.diff_id
        assert import_entry(client, there, cache, key_of("never built")) is None


def test_entry_is_a_plain_oci_manifest_under_its_own_tag(
    registry: registry_server.Registry, stores: tuple[Store, Store]
) -> None:
    if registry_server.SKOPEO is None:
        pytest.skip("skopeo is not installed")
    here, _ = stores
    cache = parse_reference(f"{registry.host}/plain/cache")
    entry = stored_entry(here, "plain")
    with RegistryClient() as client:
        export_entries(client, here, cache, [entry])
    tag = entry_reference(cache, entry.key)
    assert tag.tag == f"latest-{entry.key.split(':')[1]}"
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{tag}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    manifest = json.loads(raw)
    assert manifest["config"]["mediaType"] == CACHE_CONFIG
    assert manifest["annotations"]["dev.lamina.cache.key"] == entry.key


def test_corrupted_layer_in_registry_is_a_miss_with_a_warning(
    registry: registry_server.Registry, stores: tuple[Store, Store]
) -> None:
    here, there = stores
    cache = parse_reference(f"{registry.host}/corrupt/cache:x")
    entry = stored_entry(here, "to-corrupt")
    assert entry.layer is not None
    with RegistryClient() as client:
        export_entries(client, here, cache, [entry])
        hexdigest = entry.layer.digest.hex
        data = registry.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
        content = bytearray(data.read_bytes())
        content[-10] ^= 0xFF
        data.write_bytes(bytes(content))
        warnings: list[str] = []
        assert import_entry(client, there, cache, entry.key, warn=warnings.append) is None
    assert len(warnings) == 1 and "content hashes to" in warnings[0] and "rebuilding" in warnings[0]
    assert not there.has_blob(entry.layer.digest)
    assert there.layer(entry.layer.digest) is None


def test_layer_not_matching_its_diff_id_is_a_miss(
    registry: registry_server.Registry, stores: tuple[Store, Store]
) -> None:
    here, there = stores
    cache = parse_reference(f"{registry.host}/lying/cache:x")
    entry = stored_entry(here, "liar", diff_id=Digest.of_bytes(b"something else"))
    warnings: list[str] = []
    with RegistryClient() as client:
        export_entries(client, here, cache, [entry])
        assert import_entry(client, there, cache, entry.key, warn=warnings.append) is None
    assert len(warnings) == 1 and "unpacks to" in warnings[0]
    assert entry.layer is not None and there.layer(entry.layer.digest) is None


def test_concurrent_exporters_of_the_same_keys(registry: registry_server.Registry, tmp_path: Path) -> None:
    cache = parse_reference(f"{registry.host}/racy/cache:ci")
    errors: list[BaseException] = []
    exported: list[CacheEntry] = []

    def exporter(n: int) -> None:
        try:
            with Store(tmp_path / f"s{n}") as store, RegistryClient() as client:
                entries = [stored_entry(store, f"shared{i}") for i in range(3)]
                exported.extend(entries)
                export_entries(client, store, cache, entries)
        except BaseException as err:  # reported below; a thread cannot raise into the test
            errors.append(err)

    threads = [threading.Thread(target=exporter, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Store(tmp_path / "reader") as store, RegistryClient() as client:
        for i in range(3):
            got = import_entry(client, store, cache, key_of(f"shared{i}"))
            assert got is not None and got in exported


def test_bad_key_is_refused() -> None:
    with pytest.raises(RegistryError):
        entry_reference(parse_reference("h:1/c:x"), "md5:abc")
