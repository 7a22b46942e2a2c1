"""Helpers for the file-metadata tests (tests/test_file_metadata.py, tests/test_xattrs.py): an
image's layer tars as a test reads them, and a base image made of chosen layer entries.

layers = image_layers(archive)        # each layer's members by raw name (bytes), bottom first
top = top_layer(archive)              # the top layer's members by name (str)
pax_xattrs(member)                    # its SCHILY.xattr.* records as {name: bytes}
commit_image_of(store, name, [entries, ...])  # an image whose layers hold exactly those entries
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamina.cache.store import Store
    from lamina.oci.entry import LayerEntry

XATTR_PAX = "SCHILY.xattr."


def _manifest_and_blob(outer: tarfile.TarFile) -> tuple[dict[str, Any], Any]:
    def blob(digest: str) -> bytes:
        member = outer.extractfile("blobs/sha256/" + digest.split(":")[1])
        assert member is not None
        return member.read()

    index = json.loads(blob_of(outer, "index.json"))
    return json.loads(blob(index["manifests"][0]["digest"])), blob


def blob_of(outer: tarfile.TarFile, name: str) -> bytes:
    member = outer.extractfile(name)
    assert member is not None
    return member.read()


def image_layers(archive: Path) -> list[dict[bytes, tarfile.TarInfo]]:
    """Each layer's members, by raw name, of the image in an OCI archive (bottom first)."""
    from lamina.oci.compression import open_decompressed

    found = []
    with tarfile.open(archive) as outer:
        manifest, blob = _manifest_and_blob(outer)
        for layer in manifest["layers"]:
            data = open_decompressed(io.BytesIO(blob(layer["digest"])))
            with tarfile.open(fileobj=data, mode="r|", errors="surrogateescape") as tar:
                found.append({os.fsencode(m.name): m for m in tar})
    return found


def layer_digests(archive: Path) -> list[str]:
    """The layer blob digests the image in an OCI archive names (bottom first)."""
    with tarfile.open(archive) as outer:
        manifest, _ = _manifest_and_blob(outer)
    return [layer["digest"] for layer in manifest["layers"]]


def top_layer(archive: Path) -> dict[str, tarfile.TarInfo]:
    """The members of the image's top layer, by name."""
    return {os.fsdecode(name): member for name, member in image_layers(archive)[-1].items()}


def pax_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """A member's xattrs as its PAX `SCHILY.xattr.NAME` records hold them."""
    return {
        key[len(XATTR_PAX) :]: value.encode("utf-8", "surrogateescape")
        for key, value in member.pax_headers.items()
        if key.startswith(XATTR_PAX)
    }


def user_xattrs_work(where: Path) -> bool:
    probe = where / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def needs_user_xattrs(where: Path) -> None:
    import pytest

    if not user_xattrs_work(where):
        pytest.skip(f"the file system of {where} does not take user.* xattrs")


def commit_image_of(store: Store, name: str, layers: Sequence[Sequence[LayerEntry]]) -> list[str]:
    """Tag `name` in `store`: an image whose layers hold exactly `layers`' entries; their digests.

    Unlike a build, this writes any entry a layer can hold (device nodes, odd
    owners) whoever runs the test: nothing is made on disk.
    """
    from lamina.cache.images import commit_image
    from lamina.cache.store import LayerRecord
    from lamina.oci.compression import Compression
    from lamina.oci.image import ContainerConfig, History, ImageConfig, host_platform
    from lamina.oci.layer import sorted_entries, write_layer

    records = []
    for entries in layers:
        with store.blob_writer() as out:
            info = write_layer(sorted_entries(list(entries)), out, Compression.GZIP)  # type: ignore[arg-type]
            blob = out.commit(info.digest, info.size)
        record = LayerRecord(blob.digest, info.diff_id, info.media_type, blob.size)
        store.record_layer(record)
        records.append(record)
    created = "2024-01-01T00:00:00Z"
    config = ImageConfig(
        architecture=host_platform().architecture,
        created=created,
        config=ContainerConfig(env=("PATH=/usr/sbin:/usr/bin:/sbin:/bin",), cmd=("sh",)),
        history=tuple(History(created=created, created_by=f"layer {i}") for i in range(len(records))),
    )
    commit_image(store, config, records, [name])
    return [str(record.blob) for record in records]


def busybox_entries(root: Path) -> list[LayerEntry]:
    """The busybox tree the tests' base image holds (tests.support.busybox), as layer entries."""
    from lamina.oci.walk import entries_from_tree
    from tests.support.busybox import make_busybox_rootfs

    make_busybox_rootfs(root)
    return list(entries_from_tree(root, uid_map=lambda uid, gid: (0, 0)))
