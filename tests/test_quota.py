"""A quota hit (EDQUOT, not ENOSPC): the cache on a btrfs loop mount whose qgroup has a limit.

The kernel here has no tmpfs quota (CONFIG_TMPFS_QUOTA) and no quota file format for
ext4 (CONFIG_QFMT_V2), but btrfs qgroups: a write past the limit fails with EDQUOT for
root too. As tests/test_disk_full.py for a full disk: one line saying the quota was hit,
naming the path written and ending `cache intact`; `lamina cache verify` clean while the
quota is still hit; once it is lifted, the next build succeeds with the digest a roomy
cache gives. Needs root (a loop mount) and btrfs-progs (in the README's test command).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.build import BASE, run_cli, write_context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a loop mount needs root")

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}
QUOTA = "disk quota exceeded"
INTACT = "; cache intact"
Limit = Callable[[int | None], None]  # bytes more than now in use, or None: no limit


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[tuple[Path, Limit]]:
    """(a fresh btrfs mounted at tmp_path/mnt with quotas on, limit(headroom))."""
    if shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None:
        pytest.skip("btrfs-progs is not installed (apt-get install btrfs-progs)")
    image, mnt = tmp_path / "btrfs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=False).returncode != 0:
        pytest.skip("cannot loop-mount a file system here")
    try:
        subprocess.run(["btrfs", "quota", "enable", str(mnt)], check=True)

        def limit(headroom: int | None) -> None:
            size = "none" if headroom is None else str(_used(mnt) + headroom)
            subprocess.run(["btrfs", "qgroup", "limit", size, str(mnt)], check=True)

        yield mnt, limit
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _used(mnt: Path) -> int:
    """Bytes the top-level subvolume's qgroup (0/5) refers to, accounting synced first."""
    out = subprocess.run(
        ["btrfs", "--format", "json", "qgroup", "show", "--raw", "--sync", str(mnt)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for group in json.loads(out)["qgroup-show"]:
        if group["qgroupid"] == "0/5":
            return int(group["referenced"])
    raise AssertionError(f"no qgroup 0/5 in {out}")


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[-1]


def _verify_clean(cache: Path) -> None:
    check = run_cli("cache", "verify", cache=cache, check=False)
    assert check.returncode == 0 and check.stdout.strip().endswith("; clean"), check.stdout + check.stderr


def _roomy_digest(tmp_path: Path, busybox_image: Path, ctx: Path) -> str:
    cache = tmp_path / "roomy"
    run_cli("load", "-q", str(busybox_image), cache=cache)
    return run_cli("build", "-q", str(ctx), cache=cache, env=EPOCH).stdout.split()[-1]


def _warm(mnt: Path, busybox_image: Path, tmp_path: Path) -> Path:
    """A cache on the btrfs holding the base image, unpacked by a first build."""
    cache = mnt / "cache"
    run_cli("load", "-q", str(busybox_image), cache=cache)
    run_cli("build", "-q", str(write_context(tmp_path / "warm", f"FROM {BASE}\n")), cache=cache)
    return cache


def test_copy_past_the_quota(btrfs: tuple[Path, Limit], busybox_image: Path, tmp_path: Path) -> None:
    mnt, limit = btrfs
    cache = _warm(mnt, busybox_image, tmp_path)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY r.bin /r.bin\n", {"r.bin": os.urandom(6 << 20)})
    limit(2 << 20)

    line = _one_error_line(run_cli("build", str(ctx), cache=cache, env=EPOCH, check=False))
    assert line.startswith(f"error: {ctx}/Dockerfile:2: stage stage-0: COPY r.bin /r.bin: write {cache}/"), (
        line
    )
    assert line.lower().endswith(f"/r.bin: {QUOTA}{INTACT}"), line
    _verify_clean(cache)

    limit(None)
    again = run_cli("build", "-q", str(ctx), cache=cache, env=EPOCH).stdout.split()[-1]
    assert again == _roomy_digest(tmp_path, busybox_image, ctx)


@pytest.mark.sandbox
@pytest.mark.parametrize(
    ("command", "said"),
    [
        ("dd if=/dev/zero of=/big bs=1M count=8", f"dd: error writing '/big': {QUOTA}"),
        # busybox head says only "standard output: I/O error", and statvfs shows room (a qgroup
        # is no full disk): lamina's own write next to the step's files meets the quota
        ("head -c 8000000 /dev/zero > /big", "write {cache}/unpacked/.tmp-"),
    ],
    ids=["said", "silent"],
)
def test_run_past_the_quota(
    btrfs: tuple[Path, Limit], busybox_image: Path, tmp_path: Path, command: str, said: str
) -> None:
    mnt, limit = btrfs
    cache = _warm(mnt, busybox_image, tmp_path)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN {command}\n")
    limit(2 << 20)

    line = _one_error_line(run_cli("build", str(ctx), cache=cache, env=EPOCH, check=False))
    assert line.startswith(f"error: {ctx}/Dockerfile:2: stage stage-0: process "), line
    assert (
        said.format(cache=cache).lower() in line.lower() and QUOTA in line.lower() and line.endswith(INTACT)
    ), line
    assert not [name for name in os.listdir(cache / "unpacked") if name.startswith(".tmp-")]
    _verify_clean(cache)

    limit(None)
    run_cli("build", "-q", str(ctx), cache=cache, env=EPOCH)


def test_load_past_the_quota(btrfs: tuple[Path, Limit], busybox_image: Path) -> None:
    mnt, limit = btrfs
    cache = mnt / "cache"
    run_cli("images", cache=cache)  # the store made, empty
    limit(256 << 10)

    line = _one_error_line(run_cli("load", str(busybox_image), cache=cache, check=False))
    assert line.startswith(f"error: load {busybox_image}: write {cache}/blobs/sha256/.tmp-"), line
    assert line.lower().endswith(QUOTA + INTACT), line
    assert os.listdir(cache / "blobs" / "sha256") == []
    _verify_clean(cache)

    limit(None)
    run_cli("load", "-q", str(busybox_image), cache=cache)
    assert run_cli("images", cache=cache).stdout.splitlines()[1].startswith(BASE)
