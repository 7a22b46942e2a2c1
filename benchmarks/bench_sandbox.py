"""Sandbox start-to-exit overhead and layer capture throughput.

    .venv/bin/python benchmarks/bench_sandbox.py [--runs 30] [--files 10000]

Start-to-exit: `sandbox.run()` of /bin/true over a busybox rootfs, timed
from the call to its return (helper start, namespaces, id maps, rootfs,
mounts, pivot_root, exec, reaping, cleanup), for each snapshotter. The
target for overlay is a median under 30 ms.

Capture: an upper dir of --files small files (in 100 directories, with a
whiteout per directory and some hard links), walked by `snapshot.capture()`
alone, then through `write_layer` (uncompressed and gzip) into /dev/null.
Also the copy snapshotter's compare (`record` + `write_diff`) for a tree of
that size with 1% of it changed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lamina.engine import sandbox, snapshot  # noqa: E402
from lamina.oci.layer import Compression, write_layer  # noqa: E402

BUSYBOX = Path("/bin/busybox")


def make_rootfs(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(BUSYBOX, root / "bin/busybox")
    for applet in ("sh", "true"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")


def time_runs(rootfs: Path, snapshotter: sandbox.Snapshotter, runs: int, scratch: Path) -> list[float]:
    spec = sandbox.SandboxSpec(
        argv=("/bin/true",),
        lower_dirs=(rootfs,),
        snapshotter=snapshotter,
        stdin=subprocess.DEVNULL,
        scratch_dir=scratch,
    )
    ids = sandbox.detect_ids()
    sandbox.run(spec, ids=ids)  # warm the page cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        code = sandbox.run(spec, ids=ids)
        times.append((time.perf_counter() - start) * 1000)
        assert code == 0
    return times


def make_upper(upper: Path, files: int) -> int:
    """`files` files of 100-400 bytes in 100 dirs, a whiteout per dir, every 50th file hard-linked."""
    total = 0
    dirs = 100
    for d in range(dirs):
        directory = upper / f"dir{d:03d}"
        directory.mkdir(parents=True)
        os.mknod(directory / "deleted", 0o020000, os.makedev(0, 0))
        for i in range(files // dirs):
            data = (b"x" * (100 + (i * 37) % 300)) + b"\n"
            path = directory / f"file{i:05d}.txt"
            path.write_bytes(data)
            total += len(data)
            if i % 50 == 0:
                os.link(path, directory / f"link{i:05d}")
    return total


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lamina-bench-sandbox-") as tmp:
        tmp_path = Path(tmp)
        rootfs = tmp_path / "rootfs"
        make_rootfs(rootfs)
        scratch = tmp_path / "scratch"
        print(f"sandbox start-to-exit, /bin/true, {args.runs} runs (ids: {sandbox.detect_ids().mode.value})")
        print(f"{'snapshotter':<12} {'median ms':>10} {'min ms':>8} {'p90 ms':>8}")
        for snap in (sandbox.Snapshotter.OVERLAY, sandbox.Snapshotter.COPY):
            times = sorted(time_runs(rootfs, snap, args.runs, scratch))
            p90 = times[int(len(times) * 0.9) - 1]
            print(f"{snap.value:<12} {statistics.median(times):>10.1f} {times[0]:>8.1f} {p90:>8.1f}")

        upper = tmp_path / "upper"
        size = make_upper(upper, args.files)
        entries = sum(1 for _ in snapshot.capture(upper))
        print()
        mb = size / 1e6
        print(f"capture of an upper dir: {args.files} files, {entries} entries, {mb:.1f} MB of content")
        print(f"{'what':<34} {'seconds':>8} {'entries/s':>10} {'MB/s':>7}")
        rows = [
            ("capture (walk only)", lambda: sum(1 for _ in snapshot.capture(upper))),
            ("capture + write_layer (tar)", lambda: _write(upper, Compression.NONE)),
            ("capture + write_layer (gzip)", lambda: _write(upper, Compression.GZIP)),
        ]
        for name, fn in rows:
            seconds = best_of(fn, 3)
            print(f"{name:<34} {seconds:>8.3f} {entries / seconds:>10.0f} {size / 1e6 / seconds:>7.1f}")

        # The copy snapshotter's compare, outside any namespace (root-owned tree).
        tree = tmp_path / "tree"
        make_upper(tree, args.files)
        for p in tree.rglob("deleted"):
            p.unlink()
        start = time.perf_counter()
        baseline = snapshot.record(str(tree), [str(tree)])
        recorded = time.perf_counter() - start
        for d in range(100):
            (tree / f"dir{d:03d}" / "file00001.txt").write_text("changed\n")
        diff = tmp_path / "diff"
        diff.mkdir()
        start = time.perf_counter()
        snapshot.write_diff(baseline, str(tree), str(diff))
        compared = time.perf_counter() - start
        paths = len(baseline.facts)
        print(f"{'copy snapshotter: record':<34} {recorded:>8.3f} {paths / recorded:>10.0f}")
        print(f"{'copy snapshotter: compare (1% changed)':<34} {compared:>8.3f} {paths / compared:>10.0f}")


def _write(upper: Path, compression: Compression) -> None:
    with open(os.devnull, "wb") as out:
        write_layer(snapshot.capture(upper), out, compression)


if __name__ == "__main__":
    main()
