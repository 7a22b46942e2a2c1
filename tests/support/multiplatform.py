"""Test base images of another platform, made offline from Debian's packages.

- `foreign_busybox(arch)`: Debian's busybox-static for arm64 or armhf
  (`apt-get download busybox-static:ARCH`, `dpkg-deb -x`), fetched once per
  machine into a world-readable file that the unprivileged test users read too
  (tests/test_unprivileged.py passes them in $LAMINA_TEST_BUSYBOX_ARM64/ARMHF);
  `why_no_arm64()` says why they cannot be had, for a skip. The download needs
  arm64 and armhf among dpkg's architectures: README's test command adds them.
- `make_multiplatform_image(directory)`: `MULTI_NAME`, an index of the amd64
  busybox image (tests/support/busybox.py) and its arm64 and arm/v7 twins, as
  an OCI archive and as an OCI layout directory.
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
ARMHF_ENV_VAR = "LAMINA_TEST_BUSYBOX_ARMHF"
CACHED = Path(tempfile.gettempdir()) / "lamina-test-busybox-arm64" / "busybox"
MULTI_NAME = "docker.io/lamina-test/busybox-multi:1.35"
ARM64_NAME = "docker.io/lamina-test/busybox:1.35-arm64"
ARMHF_NAME = "docker.io/lamina-test/busybox:1.35-armhf"
# Debian's architecture -> (the variable naming a binary fetched already, where it is kept)
_FOREIGN = {
    "arm64": (ENV_VAR, CACHED),
    "armhf": (ARMHF_ENV_VAR, Path(tempfile.gettempdir()) / "lamina-test-busybox-armhf" / "busybox"),
}


def why_no_foreign(arch: str) -> str | None:
    """None when `foreign_busybox(arch)` can give Debian's busybox-static for `arch`; else why not."""
    variable, cached = _FOREIGN[arch]
    given = os.environ.get(variable)
    if given:
        return None if Path(given).is_file() else f"${variable} names {given}, which does not exist"
    if cached.is_file():
        return None
    if not BUSYBOX.exists():
        return f"{BUSYBOX} is missing (apt-get install busybox-static)"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return f"apt-get and dpkg-deb are needed to fetch busybox-static:{arch}"
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True)
    if arch not in foreign.stdout.split():
        return f"{arch} is not a dpkg architecture here (dpkg --add-architecture {arch} && apt-get update)"
    return None


def foreign_busybox(arch: str) -> Path:
    """Debian's busybox-static binary for `arch` (arm64, armhf): from its variable, fetched
    earlier, or now."""
    variable, cached = _FOREIGN[arch]
    given = os.environ.get(variable)
    if given:
        return Path(given)
    if cached.is_file():
        return cached
    cached.parent.mkdir(mode=0o755, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=cached.parent))
    try:
        subprocess.run(["apt-get", "download", "-q", f"busybox-static:{arch}"], cwd=work, check=True,
                       capture_output=True, timeout=300)  # fmt: skip
        (deb,) = work.glob(f"busybox-static_*_{arch}.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True, capture_output=True)
        partial = work / "busybox"
        shutil.copyfile(work / "x" / "bin" / "busybox", partial)
        partial.chmod(0o755)
        os.replace(partial, cached)  # complete or absent, for the next run
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cached


def why_no_arm64() -> str | None:
    """None when the foreign busybox binaries of the test base (arm64, armhf) can be had."""
    return why_no_foreign("arm64") or why_no_foreign("armhf")


def arm64_busybox() -> Path:
    """The arm64 busybox binary: from $LAMINA_TEST_BUSYBOX_ARM64, fetched earlier, or now."""
    return foreign_busybox("arm64")


@dataclasses.dataclass(frozen=True, slots=True)
class MultiPlatformImage:
    archive: Path  # an OCI archive (lamina load, skopeo oci-archive:)
    layout: Path  # the same as an OCI layout directory (skopeo oci:DIR:1.35)
    index: str  # the index's digest
    manifests: dict[str, str]  # platform (linux/amd64, linux/arm64, linux/arm/v7) -> manifest digest


def make_multiplatform_image(directory: Path) -> MultiPlatformImage:
    """`MULTI_NAME`: the amd64 and arm64 busybox images under one index, saved by lamina."""
    from lamina.cache.images import commit_index, save_image
    from lamina.cache.store import Store

    directory.mkdir(parents=True, exist_ok=True)
    with Store(directory / "store") as store:
        amd64 = commit_busybox(store, make_busybox_rootfs(directory / "rootfs-amd64"))
        arm64_root = make_busybox_rootfs(directory / "rootfs-arm64", arm64_busybox())
        arm64 = commit_busybox(store, arm64_root, architecture="arm64", names=[ARM64_NAME])
        armhf_root = make_busybox_rootfs(directory / "rootfs-armhf", foreign_busybox("armhf"))
        armhf = commit_busybox(store, armhf_root, architecture="arm", variant="v7", names=[ARMHF_NAME])
        index = commit_index(store, [amd64, arm64, armhf], [MULTI_NAME])
        archive = directory / "busybox-multi-oci.tar"
        save_image(store, MULTI_NAME, archive)
    layout = directory / "busybox-multi-layout"
    _unpack_layout(archive, layout)
    manifests = {
        "linux/amd64": str(amd64.manifest.digest),
        "linux/arm64": str(arm64.manifest.digest),
        "linux/arm/v7": str(armhf.manifest.digest),
    }
    return MultiPlatformImage(archive, layout, str(index.digest), manifests)


def _unpack_layout(archive: Path, layout: Path) -> None:
    """The archive is a layout in a tar: unpacked, it is the layout directory."""
    import tarfile

    with tarfile.open(archive) as tar:
        tar.extractall(layout)  # an archive lamina wrote a moment ago
