"""Our layer streams through other tools: umoci unpacks them (re-checking
every digest and diff_id) into the same tree as our own extractor."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from lamina.oci.compression import Compression
from lamina.oci.entry import EntryType, LayerEntry
from lamina.oci.extract import Whiteouts, extract_layer
from lamina.oci.layer import LayerInfo, sorted_entries, write_layer
from lamina.oci.walk import entries_from_tree

CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _file(path: str, data: bytes, **fields: object) -> LayerEntry:
    return LayerEntry(path, EntryType.FILE, size=len(data), open=lambda: io.BytesIO(data), **fields)  # type: ignore[arg-type]


LOWER = [
    LayerEntry("bin", EntryType.DIR, 0o755, mtime=100),
    _file("bin/ping", b"\x7fELF ping", mode=0o4755, mtime=200, xattrs=(("security.capability", CAPABILITY),)),
    LayerEntry("bin/ping6", EntryType.HARDLINK, linkname="bin/ping"),
    LayerEntry("bin/sh", EntryType.SYMLINK, 0o777, mtime=300, linkname="/bin/busybox"),
    LayerEntry("etc", EntryType.DIR, 0o755, mtime=400),
    _file("etc/gone", b"to be whited out", mtime=500),
    _file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mtime=600),
    LayerEntry("home", EntryType.DIR, 0o755, uid=1000, gid=1000, mtime=700),
    _file("home/" + "very-long-name-" * 12, b"long", uid=1000, gid=1000, mtime=800),
    _file("home/ünïcödé", b"utf-8", uid=1000, gid=1000, mtime=900),
    LayerEntry("opt", EntryType.DIR, 0o755, mtime=1000),
    _file("opt/old", b"hidden by the opaque dir", mtime=1100),
    LayerEntry("run", EntryType.DIR, 0o755, mtime=1200),
    LayerEntry("run/fifo", EntryType.FIFO, 0o600, mtime=1300),
]
UPPER = [
    LayerEntry("etc", EntryType.DIR, 0o755, mtime=2000),
    LayerEntry("etc/.wh.gone", EntryType.FILE),
    _file("etc/passwd", b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home:/bin/sh\n", mtime=2100),
    LayerEntry("opt", EntryType.DIR, 0o750, mtime=2200),
    LayerEntry("opt/.wh..wh..opq", EntryType.FILE),
    _file("opt/new", b"new", mtime=2300),
]


def _write_blob(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}"


def _layout(root: Path, layers: list[tuple[bytes, LayerInfo]]) -> None:
    """A minimal OCI image layout holding `layers`, tagged `test`."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    for blob, _ in layers:
        _write_blob(blobs, blob)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [str(info.diff_id) for _, info in layers]},
    }
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _write_blob(blobs, config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": info.media_type, "digest": str(info.digest), "size": info.size}
            for _, info in layers
        ],
    }
    manifest_bytes = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _write_blob(blobs, manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": "test"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))


def _tree(root: Path) -> list[tuple[LayerEntry, bytes]]:
    out = []
    for entry in entries_from_tree(root):
        content = b""
        if entry.open is not None:
            with entry.open() as f:
                content = f.read()
        out.append((entry, content))
    return out


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="umoci keeps owners and capabilities only as root")
@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.NONE])
def test_umoci_unpacks_our_layers_like_we_do(tmp_path: Path, compression: Compression) -> None:
    layers = []
    for entries in (LOWER, UPPER):
        out = io.BytesIO()
        info = write_layer(sorted_entries(entries), out, compression)
        layers.append((out.getvalue(), info))
    _layout(tmp_path / "image", layers)
    done = subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp_path / 'image'}:test", str(tmp_path / "bundle")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ours = tmp_path / "ours"
    for blob, info in layers:
        extract_layer(io.BytesIO(blob), ours, whiteouts=Whiteouts.APPLY, digest=info.digest)
    theirs = _tree(tmp_path / "bundle" / "rootfs")
    mine = _tree(ours)
    assert [entry.path for entry, _ in mine] == [entry.path for entry, _ in theirs]
    assert mine == theirs
    paths = {entry.path: entry for entry, _ in mine}
    assert "etc/gone" not in paths and "opt/old" not in paths and "opt/new" in paths
    assert paths["bin/ping"].xattrs == (("security.capability", CAPABILITY),)
