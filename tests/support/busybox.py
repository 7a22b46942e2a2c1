"""The test base image `lamina-test/busybox:1.35`, made from Debian's busybox-static.

It has the content of ../shared/bench/mkbase.py's base (the same
directories and modes, /bin/busybox, one absolute symlink per applet,
/etc/passwd and /etc/group, owner 0:0, mtimes 2024-01-01), but its layer is
written by lamina's own writer, so the bytes (and digests) are lamina's.

    root = make_busybox_rootfs(tmp_path / "rootfs")   # the tree, for comparing
    archive = make_busybox_image(tmp_path)            # an OCI archive of it

Tests that need it skip when /bin/busybox is missing (see conftest's
`busybox_image` fixture).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lamina.cache.images import CommittedImage
    from lamina.cache.store import Store

BUSYBOX = Path("/bin/busybox")
BUSYBOX_NAME = "docker.io/lamina-test/busybox:1.35"
BUSYBOX_EPOCH = 1704067200  # 2024-01-01T00:00:00Z
BUSYBOX_CREATED = "2024-01-01T00:00:00Z"

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n"
DIRS = {
    "bin": 0o755,
    "sbin": 0o755,
    "usr": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "etc": 0o755,
    "root": 0o700,
    "tmp": 0o1777,
    "var": 0o755,
    "var/tmp": 0o1777,
    "home": 0o755,
    "dev": 0o755,
    "proc": 0o755,
    "sys": 0o755,
}


def _applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True).stdout
    return sorted(
        {line.strip() for line in out.splitlines() if line.strip() and line.strip() != "bin/busybox"}
    )


def make_busybox_rootfs(root: Path, busybox: Path = BUSYBOX) -> Path:
    """Fill `root` (created, must not exist or be empty) with the base image's tree.

    `busybox` is the binary to put in (another architecture's: the applet list is still
    read from the host's /bin/busybox, the same Debian version built the same way).
    """
    root.mkdir(parents=True, exist_ok=True)
    for directory in sorted(DIRS):
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    for applet in _applets():
        path = root / applet
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(path):
            os.symlink("/bin/busybox", path)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    for path in (root / "etc/passwd", root / "etc/group"):
        os.chmod(path, 0o644)
    for directory, mode in DIRS.items():
        os.chmod(root / directory, mode)
    return root


def make_busybox_image(directory: Path, *, compression: str = "gzip") -> Path:
    """Build the base image with lamina and save it as `directory`/busybox-oci.tar.

    Uses a throwaway store in `directory`/store; returns the archive path.
    """
    from lamina.cache.images import save_image
    from lamina.cache.store import Store

    directory.mkdir(parents=True, exist_ok=True)
    root = make_busybox_rootfs(directory / "rootfs")
    with Store(directory / "store") as store:
        commit_busybox(store, root, compression=compression, names=[BUSYBOX_NAME])
        archive = directory / "busybox-oci.tar"
        save_image(store, BUSYBOX_NAME, archive)
    return archive


def commit_busybox(
    store: Store,
    root: Path,
    *,
    compression: str = "gzip",
    architecture: str = "amd64",
    variant: str = "",
    names: Sequence[str] = (),
) -> CommittedImage:
    """The busybox tree `root` as a one-layer image of `architecture` (and `variant`) in
    `store`, tagged `names`."""
    from lamina.cache.images import commit_image
    from lamina.cache.store import LayerRecord
    from lamina.oci.compression import Compression
    from lamina.oci.image import ContainerConfig, History, ImageConfig
    from lamina.oci.layer import write_layer
    from lamina.oci.walk import entries_from_tree

    with store.blob_writer() as out:
        info = write_layer(
            entries_from_tree(root, uid_map=lambda uid, gid: (0, 0)),
            out,  # type: ignore[arg-type]
            Compression(compression),
            source_date_epoch=BUSYBOX_EPOCH,
        )
        blob = out.commit(info.digest, info.size)
    layer = LayerRecord(blob.digest, info.diff_id, info.media_type, blob.size)
    store.record_layer(layer)
    config = ImageConfig(
        architecture=architecture,
        variant=variant,
        created=BUSYBOX_CREATED,
        config=ContainerConfig(
            env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",), cmd=("sh",)
        ),
        history=(History(created=BUSYBOX_CREATED, created_by="tests/support: busybox-static 1.35 rootfs"),),
    )
    return commit_image(store, config, [layer], names)
