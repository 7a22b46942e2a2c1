"""pull/push between a scripted registry (httpx.MockTransport) and a real store: order and atomicity."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
from pathlib import Path

import httpx
import pytest

from lamina.cache.store import Store
from lamina.cache.transfer import pull, push
from lamina.errors import DigestMismatch
from lamina.oci.digest import Digest
from lamina.oci.image import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, ImageConfig, Manifest
from lamina.oci.reference import parse_reference
from lamina.oci.registry import RegistryClient

REF = parse_reference("localhost:5000/app:1")


def make_layer(name: str) -> tuple[bytes, Digest]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = name.encode() * 5000
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0), Digest.of_bytes(raw.getvalue())


class FakeRegistry:
    """Serves one image; `corrupt` names layer digests whose bytes it alters."""

    def __init__(self, layers: int = 3) -> None:
        self.blobs: dict[str, bytes] = {}
        descriptors, diff_ids = [], []
        for i in range(layers):
            blob, diff_id = make_layer(f"file{i}")
            digest = Digest.of_bytes(blob)
            self.blobs[str(digest)] = blob
            descriptors.append(Descriptor(OCI_LAYER_GZIP, digest, len(blob)))
            diff_ids.append(diff_id)
        config = ImageConfig(diff_ids=tuple(diff_ids)).to_bytes()
        self.blobs[str(Digest.of_bytes(config))] = config
        self.manifest = Manifest(
            Descriptor(OCI_CONFIG, Digest.of_bytes(config), len(config)), tuple(descriptors)
        ).to_bytes()
        self.layers = descriptors
        self.corrupt: set[str] = set()
        self.fetched: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        kind, tail = request.url.path.split("/")[-2:]
        if kind == "manifests":
            digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()
            headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest}
            return httpx.Response(200, content=self.manifest, headers=headers)
        if kind == "blobs" and tail in self.blobs:
            with self.lock:
                self.fetched.append(tail)
            data = self.blobs[tail]
            if tail in self.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 1])
            return httpx.Response(200, content=data)
        return httpx.Response(404)


def temp_files(store_root: Path) -> list[str]:
    return [p.name for p in (store_root / "blobs" / "sha256").iterdir() if p.name.startswith(".tmp")]


def test_pull_stores_blobs_then_names_the_image(tmp_path: Path) -> None:
    registry = FakeRegistry()
    with Store(tmp_path / "s") as store, RegistryClient(transport=httpx.MockTransport(registry)) as client:
        result = pull(client, store, REF)
        assert result.record.name == "localhost:5000/app:1"
        assert result.fetched == 3
        for layer in registry.layers:
            assert store.has_blob(layer.digest)
        # A second pull fetches no blob: config and layers are already stored.
        registry.fetched.clear()
        assert pull(client, store, REF).fetched == 0
        assert len(registry.fetched) == 0


def test_one_corrupt_layer_leaves_no_name_and_no_half_blob(tmp_path: Path) -> None:
    registry = FakeRegistry(layers=4)
    bad = registry.layers[2].digest
    registry.corrupt.add(str(bad))
    root = tmp_path / "s"
    with Store(root) as store, RegistryClient(transport=httpx.MockTransport(registry)) as client:
        with pytest.raises(DigestMismatch) as info:
            pull(client, store, REF)
        assert str(bad) in str(info.value)
        assert store.images() == ()
        assert not store.has_blob(bad)
        assert temp_files(root) == []
        # The registry is fixed; the retry downloads only what is still missing.
        registry.corrupt.clear()
        registry.fetched.clear()
        result = pull(client, store, REF)
        assert str(bad) in registry.fetched
        assert result.fetched <= 4
        assert store.resolve("localhost:5000/app:1").manifest == Digest.of_bytes(registry.manifest)


def test_push_sends_blobs_before_the_manifest(tmp_path: Path) -> None:
    source = FakeRegistry(layers=2)
    order: list[str] = []
    received: dict[str, bytes] = {}

    def sink(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        order.append(f"{request.method} {path.split('/')[-2]}")
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/dst/blobs/uploads/u"})
        if request.method == "PUT" and "/blobs/" in path:
            received[request.url.params["digest"]] = request.read()
            return httpx.Response(201)
        if request.method == "PUT":
            body = request.read()
            return httpx.Response(201, headers={"Docker-Content-Digest": str(Digest.of_bytes(body))})
        return httpx.Response(405)

    with Store(tmp_path / "s") as store:
        with RegistryClient(transport=httpx.MockTransport(source)) as client:
            pulled = pull(client, store, REF)
        with RegistryClient(transport=httpx.MockTransport(sink)) as client:
            result = push(client, store, "localhost:5000/app:1", parse_reference("localhost:5000/dst:2"))
    assert result.digest == pulled.record.manifest
    assert result.uploaded == 3
    assert order[-1] == "PUT manifests"
    assert all(not entry.endswith("manifests") for entry in order[:-1])
    for digest, data in received.items():
        assert source.blobs[digest] == data
