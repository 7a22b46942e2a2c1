"""Real OCI tools accept what `lamina save` writes (each skips when its tool is missing).

skopeo inspect / copy (copy re-verifies every digest), umoci unpack (the
unpacked tree must equal the tree the image was made from), podman load
(private storage under tmp_path), and ../shared/bench/oci_check.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.cache.images import load_image_file, save_image
from lamina.cache.store import Store
from lamina.oci.compression import Compression
from lamina.oci.validate import validate_image
from tests.support import BUSYBOX_NAME

OCI_CHECK = Path("/work/shared/bench/oci_check.py")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def _run(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout


@pytest.fixture(params=["gzip", "zstd", "none"])
def saved(request: pytest.FixtureRequest, busybox_image: Path, tmp_path: Path) -> Path:
    """lamina save of the busybox image, in each layer compression."""
    with Store(tmp_path / "cache") as store:
        load_image_file(store, busybox_image)
        out = tmp_path / f"busybox-{request.param}.tar"
        save_image(store, BUSYBOX_NAME, out, compression=Compression(request.param))
    return out


def test_skopeo_inspect(saved: Path) -> None:
    skopeo = _need("skopeo")
    info = json.loads(_run(skopeo, "inspect", f"oci-archive:{saved}"))
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    config = json.loads(_run(skopeo, "inspect", "--config", f"oci-archive:{saved}"))
    assert config["config"]["Cmd"] == ["sh"]
    raw = json.loads(_run(skopeo, "inspect", "--raw", f"oci-archive:{saved}"))
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    validate_image(saved)


def test_skopeo_copy_reverifies_every_blob(saved: Path, tmp_path: Path) -> None:
    skopeo = _need("skopeo")
    _run(skopeo, "copy", "-q", f"oci-archive:{saved}", f"oci:{tmp_path / 'copy'}:x")
    index = json.loads((tmp_path / "copy" / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "x"
    validate_image(saved)


@pytest.fixture
def podman_base(tmp_path: Path) -> Iterator[list[str | Path]]:
    """podman with throwaway storage; its runroot must be under 50 characters."""
    podman = _need("podman")
    if os.geteuid() != 0:
        pytest.skip("podman load with a private --root needs root here")
    runroot = Path(tempfile.mkdtemp(prefix="lamina-podman-", dir="/tmp"))
    try:
        yield [podman, "--root", tmp_path / "podman-root", "--runroot", runroot, "--storage-driver", "vfs"]
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def _tree(root: Path) -> dict[str, tuple[str, int, str | bytes]]:
    """path -> (kind, permission bits, content or link target)."""
    out: dict[str, tuple[str, int, str | bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            st = full.lstat()
            rel = str(full.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), full.read_bytes())
    return out


def test_umoci_unpack_gives_the_source_tree(saved: Path, busybox_image: Path, tmp_path: Path) -> None:
    umoci = _need("umoci")
    layout = tmp_path / "layout"
    if "zstd" in saved.name and " 0.4." in _run(umoci, "--version"):
        # Debian's umoci 0.4 predates zstd layers: let skopeo (which reads them and
        # re-verifies every digest) re-encode to gzip, so umoci still checks the tree.
        _run(
            _need("skopeo"), "copy", "--dest-compress-format", "gzip",
            f"oci-archive:{saved}", f"oci:{layout}:1.35",
        )  # fmt: skip
    else:
        layout.mkdir()
        _run("tar", "-xf", saved, "-C", layout)
    bundle = tmp_path / "bundle"
    _run(umoci, "unpack", "--rootless", "--image", f"{layout}:1.35", bundle)
    source = busybox_image.parent / "rootfs"  # where make_busybox_image built it
    assert _tree(bundle / "rootfs") == _tree(source)
    validate_image(saved)


def test_podman_load(saved: Path, podman_base: list[str | Path]) -> None:
    _run(*podman_base, "load", "-i", saved)
    listed = _run(*podman_base, "images", "--format", "{{.Repository}}:{{.Tag}}")
    assert "docker.io/lamina-test/busybox:1.35" in listed.split()  # named from io.containerd.image.name
    validate_image(saved)


def test_podman_load_docker_format(
    busybox_image: Path, tmp_path: Path, podman_base: list[str | Path]
) -> None:
    with Store(tmp_path / "cache") as store:
        load_image_file(store, busybox_image)
        out = tmp_path / "docker.tar"
        save_image(store, BUSYBOX_NAME, out, format="docker")
    _run(*podman_base, "load", "-i", out)
    listed = _run(*podman_base, "images", "--format", "{{.Repository}}:{{.Tag}}")
    assert "lamina-test/busybox:1.35" in listed
    validate_image(out)


def test_skopeo_reads_the_docker_format(busybox_image: Path, tmp_path: Path) -> None:
    skopeo = _need("skopeo")
    with Store(tmp_path / "cache") as store:
        load_image_file(store, busybox_image)
        out = tmp_path / "docker.tar"
        save_image(store, BUSYBOX_NAME, out, format="docker")
    info = json.loads(_run(skopeo, "inspect", f"docker-archive:{out}"))
    assert info["Os"] == "linux"
    _run(skopeo, "copy", "-q", f"docker-archive:{out}", f"oci:{tmp_path / 'copy'}:y")
    validate_image(out)


def test_lamina_loads_what_skopeo_writes(busybox_image: Path, tmp_path: Path) -> None:
    skopeo = _need("skopeo")
    copy = tmp_path / "copy.tar"
    _run(skopeo, "copy", "-q", f"oci-archive:{busybox_image}", f"docker-archive:{copy}:skopeo/made:1")
    with Store(tmp_path / "cache") as store:
        (record,) = load_image_file(store, copy)
        assert record.name == "docker.io/skopeo/made:1"
        save_image(store, "skopeo/made:1", tmp_path / "again.tar")
    validate_image(copy)
    validate_image(tmp_path / "again.tar")


def test_oci_check_script(saved: Path) -> None:
    if not OCI_CHECK.exists():
        pytest.skip(f"{OCI_CHECK} not found")
    _run(sys.executable, OCI_CHECK, saved)
    validate_image(saved)


def test_image_without_layers_is_accepted(tmp_path: Path, podman_base: list[str | Path]) -> None:
    """`FROM scratch` plus metadata: `"layers": []`, which the schema dislikes but tools take."""
    from lamina.cache.images import commit_image
    from lamina.oci.image import default_config

    skopeo = _need("skopeo")
    with Store(tmp_path / "cache") as store:
        commit_image(store, default_config(), [], ["empty:1"])
        out = tmp_path / "empty.tar"
        save_image(store, "empty:1", out)
    assert json.loads(_run(skopeo, "inspect", "--raw", f"oci-archive:{out}"))["layers"] == []
    _run(*podman_base, "load", "-i", out)
    assert "docker.io/library/empty:1" in _run(*podman_base, "images", "--format", "{{.Repository}}:{{.Tag}}")
    validate_image(out)


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_lamina_loads_what_podman_saves(
    fmt: str, busybox_image: Path, tmp_path: Path, podman_base: list[str | Path]
) -> None:
    _run(*podman_base, "load", "-i", busybox_image)
    out = tmp_path / f"podman-{fmt}.tar"
    _run(*podman_base, "save", "--format", fmt, "-o", out, "docker.io/lamina-test/busybox:1.35")
    with Store(tmp_path / "cache") as store:
        (record,) = load_image_file(store, out)
        assert record.name == "docker.io/lamina-test/busybox:1.35"
        save_image(store, BUSYBOX_NAME, tmp_path / "again.tar")
    validate_image(out)
    validate_image(tmp_path / "again.tar")


def test_docker_style_readers_accept_the_oci_archive(saved: Path, tmp_path: Path) -> None:
    """The manifest.json inside lamina's OCI archive is what `docker load` reads; skopeo's
    docker-archive transport reads it the same way."""
    skopeo = _need("skopeo")
    info = json.loads(_run(skopeo, "inspect", f"docker-archive:{saved}"))
    assert (info["Os"], info["Created"]) == ("linux", "2024-01-01T00:00:00Z")
    _run(skopeo, "copy", "-q", f"docker-archive:{saved}", f"oci:{tmp_path / 'copy'}:z")
    validate_image(saved)
