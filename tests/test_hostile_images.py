"""Hostile base images, end to end: crafted docker-archives and OCI archives through `lamina
load` (and a registry pull), then a build FROM them. Each attack is refused in one error line
naming the layer and the entry, nothing is written outside the store (a sentinel directory
beside the cache, and the whole tree around it, stay as they were), and the cache still
verifies clean. The unpacker's own unit tests (every attack, a fuzzer) are in
tests/test_layer_hostile.py; this file checks the paths a user's image takes to it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import registry_server
from tests.support.build import run_cli, write_context

NAME = "hostile:1"
DOCKERFILE = f"FROM {NAME}\nCOPY f /f\n"


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.size = kind, link, mode, len(data)
    return info, data


def layer(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def raw_member(name: str, claimed: int, data: bytes, pax_size: int | None = None) -> bytes:
    """A tar whose one member's header claims `claimed` bytes (or a PAX size) but holds `data`."""
    info = tarfile.TarInfo(name)
    info.size = claimed
    if pax_size is not None:
        info.size, info.pax_headers = len(data), {"size": str(pax_size)}
    return info.tobuf(tarfile.PAX_FORMAT) + data.ljust(512, b"\0") + b"\0" * 1024


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _config(layer_bytes: bytes) -> bytes:
    """An amd64 image config whose one layer is `layer_bytes`."""
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + _sha(layer_bytes)]},
        }
    ).encode()


def docker_archive(path: Path, layer_bytes: bytes) -> Path:
    config = _config(layer_bytes)
    manifest = [{"Config": f"{_sha(config)}.json", "RepoTags": [NAME], "Layers": ["l0/layer.tar"]}]
    files = {f"{_sha(config)}.json": config, "l0/layer.tar": layer_bytes}
    return _tar(path, {**files, "manifest.json": json.dumps(manifest).encode()})


def oci_blobs(
    layer_bytes: bytes,
    *,
    layer_size: int | None = None,
    layer_digest: str | None = None,
    manifest_size: int | None = None,
    config_size: int | None = None,
) -> tuple[dict[str, bytes], bytes, dict[str, object]]:
    """An image's blobs (by hex digest), its manifest and the index entry naming it, with the
    descriptors' sizes and digest overridable (to lie)."""
    config = _config(layer_bytes)
    layer_hex = layer_digest or _sha(layer_bytes)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + _sha(config),
                "size": len(config) if config_size is None else config_size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": "sha256:" + layer_hex,
                    "size": len(layer_bytes) if layer_size is None else layer_size,
                }
            ],
        }
    ).encode()
    descriptor = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + _sha(manifest),
        "size": len(manifest) if manifest_size is None else manifest_size,
        "annotations": {"io.containerd.image.name": f"docker.io/library/{NAME}"},
    }
    blobs = {layer_hex: layer_bytes, _sha(config): config, _sha(manifest): manifest}
    return blobs, manifest, descriptor


def oci_archive(path: Path, layer_bytes: bytes, **lies: int | str) -> Path:
    blobs, _, descriptor = oci_blobs(layer_bytes, **lies)  # type: ignore[arg-type]
    index = json.dumps({"schemaVersion": 2, "manifests": [descriptor]}).encode()
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
    return _tar(path, {**files, **{f"blobs/sha256/{h}": b for h, b in blobs.items()}})


class World:
    """A cache, a sentinel dir beside it, and a snapshot of everything outside the cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        self.sentinel = root / "sentinel"
        self.sentinel.mkdir()
        (self.sentinel / "target").write_text("the sentinel's own file\n")
        self.ctx = write_context(root / "ctx", DOCKERFILE, {"f": "context\n"})
        self.before = self.outside()

    def outside(self) -> dict[str, tuple[int, int, int]]:
        """Every path under root but outside the cache (and the build's -o dir), with its
        type, size and mtime."""
        seen = {}
        for top, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if Path(top, d) not in (self.cache, self.root / "out")]
            for name in dirs + files:
                st = os.lstat(os.path.join(top, name))
                path = os.path.relpath(os.path.join(top, name), self.root)
                seen[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
        return seen

    def untouched(self) -> None:
        now = self.outside()
        added = sorted(set(now) - set(self.before))
        changed = sorted(p for p in self.before if p not in now or now[p] != self.before[p])
        assert not added and not changed, f"written outside the store: {added} {changed}"
        assert (self.sentinel / "target").read_text() == "the sentinel's own file\n"

    def build(self, check: bool = False) -> tuple[int, str]:
        out = f"type=local,dest={self.root / 'out'}"
        proc = run_cli("build", "-q", "-o", out, str(self.ctx), cache=self.cache, check=check)
        return proc.returncode, proc.stderr

    def verify_clean(self) -> None:
        proc = run_cli("cache", "verify", cache=self.cache, check=False)
        assert proc.stdout.strip().endswith("; clean"), proc.stdout


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    (tmp_path / "w").mkdir()
    yield World(tmp_path / "w")


def one_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


SLIP = "../../../sentinel/evil"  # from cache/unpacked/.tmp-X/ to the sentinel
UNPACK_ATTACKS = {
    "tar_slip": ([entry(SLIP, data=b"x")], f"{SLIP}: path contains '..'"),
    "tar_slip_absolute": ([entry("/sentinel-abs/evil", data=b"x")], "/sentinel-abs/evil: absolute path"),
    "symlink_swap_absolute": (
        [entry("link", tarfile.SYMTYPE, link="/"), entry("link/evil", data=b"x")],
        "link/evil: link is a symlink; refusing to write through it",
    ),
    "symlink_swap_relative": (
        [entry("link", tarfile.SYMTYPE, link="../../../sentinel"), entry("link/evil", data=b"x")],
        "link/evil: link is a symlink; refusing to write through it",
    ),
    "directory_swapped_for_a_symlink": (
        [
            entry("d", tarfile.DIRTYPE, mode=0o755),
            entry("d", tarfile.SYMTYPE, link="../../../sentinel"),
            entry("d/evil", data=b"x"),
        ],
        "d/evil: d is a symlink; refusing to write through it",
    ),
    "hardlink_outside": (
        [entry("h", tarfile.LNKTYPE, link="../../../sentinel/target")],
        "h: hard link target '../../../sentinel/target': path contains '..'",
    ),
    "hardlink_to_host_file": (
        [entry("h", tarfile.LNKTYPE, link="/etc/passwd")],
        "h: hard link target '/etc/passwd': absolute path",
    ),
    "hardlink_through_symlink": (
        [entry("s", tarfile.SYMTYPE, link="../../../sentinel"), entry("h", tarfile.LNKTYPE, link="s/target")],
        "h: hard link target",
    ),
    "whiteout_of_dotdot": ([entry(".wh...")], ".wh...: whiteout of '..'"),
    "whiteout_of_dotdot_below": ([entry("a/.wh...")], "a/.wh...: whiteout of '..'"),
    "whiteout_above_the_root": ([entry("../.wh.sentinel")], "../.wh.sentinel: path contains '..'"),
}


@pytest.mark.parametrize("fmt", ["docker", "oci"])
@pytest.mark.parametrize("attack", sorted(UNPACK_ATTACKS))
def test_hostile_layer_is_refused_when_unpacked(world: World, attack: str, fmt: str) -> None:
    entries, message = UNPACK_ATTACKS[attack]
    data = layer(*entries)
    make = docker_archive if fmt == "docker" else oci_archive
    run_cli("load", "-q", str(make(world.root.parent / "hostile.tar", data)), cache=world.cache)
    code, err = world.build()
    assert code == 1
    line = one_error(err)
    assert f"FROM {NAME}: unpack sha256:" in line and message in line, line
    assert line.startswith(f"error: {world.ctx / 'Dockerfile'}:1: ")
    world.untouched()
    world.verify_clean()  # the half-unpacked layer was not left behind


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (raw_member("big", 10**12, b"hello"), "big: short file: the stream ends inside its 1000000000000"),
        (raw_member("big", 5, b"hello", pax_size=10**15), "big: short file: the stream ends inside its"),
    ],
    ids=["header_size", "pax_size"],
)
def test_absurd_entry_size_is_refused_without_allocating(world: World, data: bytes, message: str) -> None:
    run_cli("load", "-q", str(docker_archive(world.root.parent / "hostile.tar", data)), cache=world.cache)
    code, err = world.build()
    assert code == 1 and message in one_error(err)
    world.untouched()
    world.verify_clean()


def test_duplicate_entries_the_last_wins_as_docker(world: World) -> None:
    """Tar allows a name twice (an appended archive); docker and containerd apply both, in
    order, so the later entry is the file. lamina does the same, inside the root."""
    data = layer(entry("f2", data=b"one"), entry("f2", data=b"two"), entry("d", tarfile.DIRTYPE, mode=0o755))
    data2 = layer(entry("d/x", data=b"x"), entry("d", tarfile.SYMTYPE, link="f2"))
    run_cli("load", "-q", str(docker_archive(world.root.parent / "hostile.tar", data)), cache=world.cache)
    code, err = world.build()
    assert code == 0, err
    assert (world.root / "out/f2").read_bytes() == b"two"
    world.untouched()
    run_cli("load", "-q", str(docker_archive(world.root.parent / "hostile2.tar", data2)), cache=world.cache)
    code, err = world.build()
    assert code == 0, err
    assert os.readlink(world.root / "out/d") == "f2"  # a directory replaced by a later symlink
    world.untouched()


GOOD = layer(entry("f0", data=b"hello"))
LIES = {
    "layer_smaller_than_said": (
        dict(layer_size=len(GOOD) + 1),
        f"{len(GOOD)} bytes, expected {len(GOOD) + 1}",
    ),
    "layer_larger_than_said": (dict(layer_size=100), f"{len(GOOD)} bytes, expected 100"),
    "absurd_layer_size": (dict(layer_size=1 << 60), f"expected {1 << 60}"),
    "absurd_config_size": (dict(config_size=1 << 50), f"{1 << 50} bytes, too large"),
    "manifest_size_lie": (dict(manifest_size=10), "descriptor says 10"),
    "layer_digest_mismatch": (dict(layer_digest="ab" * 32), "the bytes hash to sha256:" + _sha(GOOD)),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_manifest_that_lies_is_refused_at_load(world: World, lie: str) -> None:
    kwargs, message = LIES[lie]
    archive = oci_archive(world.root.parent / "lying.tar", GOOD, **kwargs)  # type: ignore[arg-type]
    proc = run_cli("load", "-q", str(archive), cache=world.cache, check=False)
    assert proc.returncode == 1
    line = one_error(proc.stderr)
    assert message in line and str(archive) in line, line  # names the file being loaded
    images = run_cli("images", cache=world.cache).stdout
    assert "hostile" not in images  # nothing named
    world.untouched()
    world.verify_clean()


# --- through a registry ---------------------------------------------------------------------


def _push(host: str, repo: str, blobs: dict[str, bytes], manifest: bytes) -> None:
    import httpx

    with httpx.Client(base_url=f"http://{host}") as client:
        for hexdigest, data in blobs.items():
            if data is manifest:
                continue
            start = client.post(f"/v2/{repo}/blobs/uploads/")
            assert start.status_code == 202, start.text
            location = start.headers["location"]
            sep = "&" if "?" in location else "?"
            done = client.put(f"{location}{sep}digest=sha256:{hexdigest}", content=data)
            assert done.status_code == 201, done.text
        put = client.put(
            f"/v2/{repo}/manifests/1",
            content=manifest,
            headers={"content-type": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert put.status_code == 201, put.text


# A registry checks each blob's digest as it is pushed, so a digest that does not match
# cannot be served; a manifest's sizes it does not check.
PULLED = {
    "symlink_swap": (layer(*UNPACK_ATTACKS["symlink_swap_relative"][0]), {}, "unpack sha256:"),
    "tar_slip": (layer(*UNPACK_ATTACKS["tar_slip"][0]), {}, f"{SLIP}: path contains '..'"),
    "layer_size_lie": (GOOD, {"layer_size": 100}, "registry sent more than 100 bytes"),
    "layer_size_lie_up": (GOOD, {"layer_size": len(GOOD) + 1}, f"{len(GOOD)} bytes"),
    "absurd_layer_size": (GOOD, {"layer_size": 1 << 60}, str(1 << 60)),
}


@pytest.mark.parametrize("case", sorted(PULLED))
def test_hostile_image_pulled_from_a_registry_is_refused(
    world: World, registry: registry_server.Registry, case: str
) -> None:
    data, lies, message = PULLED[case]
    blobs, manifest, _ = oci_blobs(data, **lies)  # type: ignore[arg-type]
    repo = f"evil/{case.replace('_', '-')}"
    _push(registry.host, repo, blobs, manifest)
    ref = f"{registry.host}/{repo}:1"
    (world.ctx / "Dockerfile").write_text(f"FROM {ref}\nCOPY f /f\n")
    world.before = world.outside()
    code, err = world.build()
    assert code == 1
    line = one_error(err)
    assert line.startswith(f"error: {world.ctx / 'Dockerfile'}:1: ") and message in line, line
    world.untouched()
    world.verify_clean()
