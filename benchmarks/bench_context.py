"""Build-context digest speed: cold, warm (stat cache), one file changed.

    .venv/bin/python benchmarks/bench_context.py [--context DIR] [--repeat 5] [--drop-caches]

Makes the benchmark context of ../shared/bench/gen_context.py (3,000 source
files, ~33 MB, plus a 20 MiB blob) unless --context names one, then times:
  - cold: an empty stat cache, every file read and hashed (page cache warm,
    unless --drop-caches, which needs root and empties the kernel's caches);
  - warm: a new StatCache loaded from disk, as a no-op rebuild would see it;
  - one file changed: a line appended to one source file, then warm again;
  - the same three for `COPY . /app/` (selection + content key), and the
    copy itself into an empty layer directory (file creation dominates:
    about 0.5 ms per file on this machine's ext4, 6 us on tmpfs);
  - a no-op digest in a fresh interpreter (import + load + walk), which is
    what a no-op `lamina build` pays for the context.
Prints a table of milliseconds (best and median of --repeat).
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

from lamina.cache.statcache import StatCache  # noqa: E402
from lamina.engine.context import open_build_context  # noqa: E402
from lamina.engine.steps.copyadd.placement import write_selection  # noqa: E402
from lamina.engine.steps.copyadd.selection import CopyOptions, select_sources, selection_key  # noqa: E402

GEN = ROOT.parent / "shared" / "bench" / "gen_context.py"
MOD_FILE = "src/pkg07/mod3/f07312.c"

FRESH_PROCESS = """
import sys, time
t = time.perf_counter()
from pathlib import Path
from lamina.cache.statcache import StatCache
from lamina.engine.context import open_build_context
with StatCache(Path(sys.argv[2])) as cache:
    open_build_context(Path(sys.argv[1]), cache).checksum()
print((time.perf_counter() - t) * 1000)
"""


def timed(fn: Callable[[], object], repeat: int, before: Callable[[], object] | None = None) -> list[float]:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=Path, help="an existing context (default: generate one)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before cold runs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lamina-bench-context-"))
    try:
        context = args.context
        if context is None:
            context = work / "ctx"
            subprocess.run([sys.executable, str(GEN), str(context)], check=True, stdout=subprocess.DEVNULL)
            time.sleep(0.2)  # let the files settle so the stat cache may keep them
        cache_dir = work / "cache"
        files = sum(len(f) for _, _, f in os.walk(context))
        size = sum(p.stat().st_size for p in context.rglob("*") if p.is_file())

        def reset_cache() -> None:
            shutil.rmtree(cache_dir, ignore_errors=True)
            if args.drop_caches:
                drop_caches()

        def digest() -> None:
            with StatCache(cache_dir) as cache:
                open_build_context(context, cache).checksum()

        def copy_key() -> None:
            with StatCache(cache_dir) as cache:
                tree = open_build_context(context, cache)
                selection_key(tree, select_sources(tree, ["."], "/app/", CopyOptions()))

        layer = work / "layer"

        def empty_layer() -> None:
            shutil.rmtree(layer, ignore_errors=True)
            layer.mkdir()
            os.sync()  # do not time the writeback of the previous run

        def copy_write() -> None:
            with StatCache(cache_dir) as cache:
                tree = open_build_context(context, cache)
                write_selection(tree, select_sources(tree, ["."], "/app/", CopyOptions()), layer)

        target = context / MOD_FILE

        def touch_one() -> None:
            with target.open("a") as f:
                f.write("/* changed */\n")

        rows: list[tuple[str, list[float]]] = []
        rows.append(("context digest, cold", timed(digest, args.repeat, reset_cache)))
        digest()
        rows.append(("context digest, warm (no-op)", timed(digest, args.repeat)))
        rows.append(("context digest, one file changed", timed(digest, args.repeat, touch_one)))
        rows.append(("COPY . key, cold", timed(copy_key, args.repeat, reset_cache)))
        copy_key()
        rows.append(("COPY . key, warm (no-op)", timed(copy_key, args.repeat)))
        rows.append(("COPY . key, one file changed", timed(copy_key, args.repeat, touch_one)))
        rows.append(("COPY . write into a layer dir", timed(copy_write, args.repeat, empty_layer)))
        digest()
        fresh = []
        for _ in range(args.repeat):
            out = subprocess.run(
                [sys.executable, "-c", FRESH_PROCESS, str(context), str(cache_dir)],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            fresh.append(float(out.stdout))
        rows.append(("no-op digest in a fresh process", fresh))

        print(f"context: {context} ({files} files, {size / 1e6:.1f} MB), best/median of {args.repeat}")
        print(f"{'measurement':<36} {'best ms':>9} {'median ms':>10}")
        print("-" * 57)
        for name, times in rows:
            print(f"{name:<36} {min(times):>9.1f} {statistics.median(times):>10.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
