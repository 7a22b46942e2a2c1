"""Test base images of another platform, made offline from Debian's packages.

- `arm64_busybox()`: Debian's busybox-static for arm64 (`apt-get download
  busybox-static:arm64`, `dpkg-deb -x`), fetched once per machine into a
  world-readable file that the unprivileged test users read too
  (tests/test_unprivileged.py passes it in $LAMINA_TEST_BUSYBOX_ARM64);
  `why_no_arm64()` says why it cannot be had, for a skip. The download needs
  arm64 among dpkg's architectures: README's test command adds it.
- `make_multiplatform_image(directory)`: `MULTI_NAME`, an index of the amd64
  busybox image (tests/support/busybox.py) and its arm64 twin, as an OCI
  archive and as an OCI layout directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.busybox import BUSYBOX, commit_busybox, make_busybox_rootfs

ENV_VAR = "LAMINA_TEST_BUSYBOX_ARM64"
CACHED = Path(tempfile.gettempdir()) / "lamina-test-busybox-arm64" / "busybox"
MULTI_NAME = "docker.io/lamina-test/busybox-multi:1.35"
ARM64_NAME = "docker.io/lamina-test/busybox:1.35-arm64"


def why_no_arm64() -> str | None:
    """None when `arm64_busybox()` can give the binary; else why not."""
    given = os.environ.get(ENV_VAR)
    if given:
        return None if Path(given).is_file() else f"${ENV_VAR} names {given}, which does not exist"
    if CACHED.is_file():
        return None
    if not BUSYBOX.exists():
        return f"{BUSYBOX} is missing (apt-get install busybox-static)"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "apt-get and dpkg-deb are needed to fetch busybox-static:arm64"
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True)
    if "arm64" not in foreign.stdout.split():
        return "arm64 is not a dpkg architecture here (dpkg --add-architecture arm64 && apt-get update)"
    return None


def arm64_busybox() -> Path:
    """The arm64 busybox binary: from $LAMINA_TEST_BUSYBOX_ARM64, fetched earlier, or now."""
    given = os.environ.get(ENV_VAR)
    if given:
        return Path(given)
    if CACHED.is_file():
        return CACHED
    CACHED.parent.mkdir(mode=0o755, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=CACHED.parent))
    try:
        subprocess.run(["apt-get", "download", "-q", "busybox-static:arm64"], cwd=work, check=True,
                       capture_output=True, timeout=300)  # fmt: skip
        (deb,) = work.glob("busybox-static_*_arm64.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True, capture_output=True)
        partial = work / "busybox"
        shutil.copyfile(work / "x" / "bin" / "busybox", partial)
        partial.chmod(0o755)
        os.replace(partial, CACHED)  # complete or absent, for the next run
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return CACHED


@dataclasses.dataclass(frozen=True, slots=True)
class MultiPlatformImage:
    archive: Path  # an OCI archive (lamina load, skopeo oci-archive:)
    layout: Path  # the same as an OCI layout directory (skopeo oci:DIR:1.35)
    index: str  # the index's digest
    manifests: dict[str, str]  # platform (linux/amd64, linux/arm64) -> manifest digest


def make_multiplatform_image(directory: Path) -> MultiPlatformImage:
    """`MULTI_NAME`: the amd64 and arm64 busybox images under one index, saved by lamina."""
    from lamina.cache.images import commit_index, save_image
    from lamina.cache.store import Store

    directory.mkdir(parents=True, exist_ok=True)
    with Store(directory / "store") as store:
        amd64 = commit_busybox(store, make_busybox_rootfs(directory / "rootfs-amd64"))
        arm64_root = make_busybox_rootfs(directory / "rootfs-arm64", arm64_busybox())
        arm64 = commit_busybox(store, arm64_root, architecture="arm64", names=[ARM64_NAME])
        index = commit_index(store, [amd64, arm64], [MULTI_NAME])
        archive = directory / "busybox-multi-oci.tar"
        save_image(store, MULTI_NAME, archive)
    layout = directory / "busybox-multi-layout"
    _unpack_layout(archive, layout)
    manifests = {"linux/amd64": str(amd64.manifest.digest), "linux/arm64": str(arm64.manifest.digest)}
    return MultiPlatformImage(archive, layout, str(index.digest), manifests)


def _unpack_layout(archive: Path, layout: Path) -> None:
    """The archive is a layout in a tar: unpacked, it is the layout directory."""
    import tarfile

    with tarfile.open(archive) as tar:
        tar.extractall(layout)  # an archive lamina wrote a moment ago
