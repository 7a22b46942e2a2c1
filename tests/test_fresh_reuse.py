"""A cold COPY's layer tar takes the bytes the copy wrote (oci.fresh), by inode: never a freed one's.

`COPY a b /dst/` with a file of the same name in both writes a/x, then removes
it and writes b/x. A file system may give the new file the freed inode, and
with whole-second timestamps (ext4 with 128-byte inodes, kernels before
multigrain ctime) the same size, mtime and ctime as well: the layer must
still hold b/x's bytes, as a layer read from disk does. Needs root (a loop
mount) and mkfs.ext4 (e2fsprogs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.build import BASE, build, make_cache, write_context

EPOCH = 1700000000

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(os.geteuid() != 0, reason="a loop mount needs root"),
]


@pytest.fixture
def coarse_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh ext4 with 128-byte inodes (timestamps in whole seconds) mounted at tmp_path/mnt."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
    image, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", str(image)], check=True, capture_output=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=False).returncode != 0:
        pytest.skip("cannot loop-mount a file system here")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_file_on_a_freed_inode_is_not_given_the_old_files_bytes(
    coarse_fs: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lamina.oci import fresh

    files = {}
    for i in range(40):
        files[f"a/x{i}"] = f"A{i:04d}\n"
        files[f"b/x{i}"] = f"B{i:04d}\n"  # the same size as a/x{i}
    ctx = write_context(coarse_fs / "ctx", f"FROM {BASE}\nCOPY b /b/\n", files)
    (ctx / "Dockerfile.both").write_text(f"FROM {BASE}\nCOPY a b /dst/\n")
    for name in files:
        os.utime(ctx / name, ns=(1600000000 * 10**9,) * 2)
    cache = make_cache(coarse_fs / "one", busybox_image)
    build(cache, ctx)  # b/'s digests are known now: the next build does not read b/ for them
    copied = build(cache, ctx, dockerfile=ctx / "Dockerfile.both", source_date_epoch=EPOCH)
    monkeypatch.setattr(fresh, "opener", lambda path, st: None)
    from_disk = build(
        make_cache(coarse_fs / "two", busybox_image),
        ctx,
        dockerfile=ctx / "Dockerfile.both",
        source_date_epoch=EPOCH,
    )
    assert copied.image_digest == from_disk.image_digest
