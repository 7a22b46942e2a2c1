"""A quota hit (EDQUOT, not ENOSPC): the cache on a btrfs loop mount whose qgroup has a limit.

The kernel here has no tmpfs quota (CONFIG_TMPFS_QUOTA) and no quota file format for
ext4 (CONFIG_QFMT_V2), but btrfs qgroups: a write past the limit fails with EDQUOT for
root too. As tests/test_disk_full.py for a full disk: one line saying the quota was hit,
naming the path written and ending `cache intact`; `lamina cache verify` clean while the
quota is still hit; once it is lifted, the next build succeeds with the digest a roomy
cache gives. Needs root (a loop mount) and btrfs-progs (in the README's test command).

The store's index is SQLite in WAL mode, whose -shm file SQLite writes through a memory
mapping: a page btrfs cannot find room for is a SIGBUS there, not an error. The index tests
write it in a loop, in a child process (a SIGBUS would kill pytest), until the quota or the
full disk stops them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.build import BASE, ROOT, run_cli, write_context

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


# A child that fills the store's index: it opens the store, says "open", and on a line read
# from stdin writes cache entries (each key on stdout once committed) until one fails; it
# prints the failure as the CLI does, says "stopped" and, on the next line read (not at the
# end of its input), writes one more entry.
_FILL_INDEX = """
import sys
from lamina.cache.store import Store
from lamina.cli import _disk_full_note
from lamina.errors import LaminaError

with Store(sys.argv[1]) as store:
    print("open", flush=True)
    sys.stdin.readline()
    n = 0
    try:
        while True:
            store.cache_put(f"k{n}", '{"result": "' + "x" * 300 + '"}')
            print(f"k{n}", flush=True)
            n += 1
    except LaminaError as err:
        print(f"error: {err}{_disk_full_note(err)}", file=sys.stderr, flush=True)
    print("stopped", flush=True)
    if sys.stdin.readline():
        store.cache_put("after", "{}")
        print("after" if store.cache_get("after") == "{}" else "lost", flush=True)
"""


def _fill_index(cache: Path, first: Callable[[], None]) -> tuple[subprocess.Popen[str], list[str], str]:
    """Fill the index of the store at `cache` from a child (_FILL_INDEX), calling `first` once the
    store is open; the child (still running if it survived the failure), the keys it committed
    and the line it failed with."""
    child = subprocess.Popen(
        [sys.executable, "-c", _FILL_INDEX, str(cache)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    assert child.stdout.readline() == "open\n", child.communicate(timeout=60)
    first()
    child.stdin.write("fill\n")
    child.stdin.flush()
    keys: list[str] = []
    while (line := child.stdout.readline()).startswith("k"):
        keys.append(line.strip())
    assert line in ("stopped\n", ""), line  # "": it exited (the SIGBUS of the index's shared memory)
    return child, keys, child.stderr.readline()


def _entries(cache: Path, keys: list[str]) -> list[str]:
    from lamina.cache.store import Store

    with Store(cache) as store:
        return [key for key in keys if store.cache_get(key) is not None]


def test_index_past_the_quota(btrfs: tuple[Path, Limit]) -> None:
    """The quota hit writing the index: one line (SQLite's "disk I/O error", or the SIGBUS of
    its shared memory, said as lamina says a quota), never exit 135; every entry committed stays."""
    mnt, limit = btrfs
    cache = mnt / "cache"
    child, keys, said = _fill_index(cache, lambda: limit(64 << 10))
    rest = child.communicate("", timeout=60)[1]  # exited already, or stops at the end of its input
    assert child.returncode in (0, 1) and not rest.strip(), (child.returncode, said, rest)
    assert said.startswith(f"error: write {cache}/index.db"), said
    assert QUOTA in said.lower() and said.rstrip("\n").endswith(INTACT), said
    assert keys, said  # the limit left room for some

    # under the quota the index cannot be opened to be read either (SQLite's recovery writes)
    refused = _one_error_line(run_cli("cache", "verify", cache=cache, check=False))
    assert refused.startswith(f"error: open store {cache}: write {cache}/index.db"), refused
    assert QUOTA in refused.lower() and refused.endswith(INTACT), refused

    limit(None)
    _verify_clean(cache)
    assert _entries(cache, keys) == keys


def test_open_past_the_quota(btrfs: tuple[Path, Limit]) -> None:
    """Past the quota, btrfs refuses even the index's empty -wal and -shm files that the first
    opener of a store makes (SQLite's "unable to open database file"): one line saying so."""
    mnt, limit = btrfs
    cache = mnt / "cache"
    run_cli("images", cache=cache)  # the store made, and closed: no -wal, no -shm
    limit(64 << 10)

    line = _one_error_line(run_cli("images", cache=cache, check=False))
    assert line.startswith(f"error: open store {cache}: write {cache}/index.db: "), line
    assert QUOTA in line.lower() and line.endswith(INTACT), line

    limit(None)
    assert run_cli("images", cache=cache).stdout.startswith("NAME")
    _verify_clean(cache)


@pytest.mark.parametrize("headroom_kib", [32, 64, 96, 128, 160, 192, 256, 384, 512, 1024])
def test_first_build_at_the_quota(btrfs: tuple[Path, Limit], tmp_path: Path, headroom_kib: int) -> None:
    """A new store's first build, a few KiB short of room or more: wherever the quota strikes
    (the store's scratch dir, the index, a layer dir's rename, a blob), one line ending
    `cache intact` (or a build that fits), and a cache `cache verify` finds clean."""
    mnt, limit = btrfs
    cache = mnt / "cache"
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY a /a\n", {"a": os.urandom(3000)})
    run_cli("images", cache=cache)
    limit(headroom_kib << 10)

    proc = run_cli("build", "-q", str(ctx), cache=cache, env=EPOCH, check=False)
    if proc.returncode != 0:
        line = _one_error_line(proc)
        assert QUOTA in line.lower() and line.endswith(INTACT), line
    limit(None)
    _verify_clean(cache)
    run_cli("build", "-q", str(ctx), cache=cache, env=EPOCH)


def test_index_on_a_full_disk(btrfs: tuple[Path, Limit]) -> None:
    """A full btrfs writing the index: SQLite's error, said as lamina says a full disk, and the
    process goes on (its index files are no-copy-on-write: btrfs overwrites their pages in
    place, so the -shm mapping needs no new room, since the 2025 kernel fix "btrfs: fix -ENOSPC
    mmap write failure on NOCOW files/extents"); once there is room, it writes again."""
    mnt, _ = btrfs
    cache, filler = mnt / "cache", mnt / "filler"

    def fill() -> None:
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], check=False, capture_output=True)
        subprocess.run(["sync", "-f", str(mnt)], check=True)

    child, keys, said = _fill_index(cache, fill)
    assert said.startswith(f"error: write {cache}/index.db: No space left on device"), said
    assert said.rstrip("\n").endswith(INTACT), said
    filler.unlink()
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    assert child.communicate("room\n", timeout=60)[0] == "after\n"
    assert child.returncode == 0
    _verify_clean(cache)
    assert _entries(cache, [*keys, "after"]) == [*keys, "after"]


def test_other_sigbus_is_not_the_index(btrfs: tuple[Path, Limit], tmp_path: Path) -> None:
    """With a store open on btrfs (lamina watches SIGBUS there), a SIGBUS elsewhere (a mapped
    file truncated under it) still kills the process as SIGBUS does, not said as a quota."""
    mnt, _ = btrfs
    touch_truncated = """
import mmap, sys
from lamina.cache.store import Store

with Store(sys.argv[1]) as store, open(sys.argv[2], "w+b") as f:
    store.cache_put("k", "{}")
    f.truncate(4096)
    mapped = mmap.mmap(f.fileno(), 4096)
    f.truncate(0)
    mapped[0] = 1
"""
    proc = subprocess.run(
        [sys.executable, "-c", touch_truncated, str(mnt / "cache"), str(tmp_path / "mapped")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)
    assert INTACT not in proc.stderr
