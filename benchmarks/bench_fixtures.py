"""The example suite of the pytest plugin, first run (empty cache) against second run.

    .venv/bin/python benchmarks/bench_fixtures.py [--rounds 3] [--workers N] [--autoload]

Each round runs `pytest examples/pytest-fixtures` twice with a fresh
`--lamina-cache`: the first builds every image, the second finds them all
cached. It prints the median wall time of the whole pytest command
(interpreter start-up included) and the time the suite spent in tests
(setup + call + teardown from `--durations=0`: the tests do little but
build, run and serve through the plugin, so this is fixture time).

By default pytest loads only the lamina plugin (PYTEST_DISABLE_PLUGIN_AUTOLOAD
and `-p lamina.pytest_plugin`), as in a project's own environment;
`--autoload` loads every plugin installed here (this venv's hypothesis
alone adds ~0.9 s of imports to each pytest start). `--workers N` passes
`-n N` (pytest-xdist; implies --autoload).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pytest-fixtures"


def run_suite(cache: Path, workers: int, autoload: bool) -> tuple[float, float]:
    """(wall seconds, seconds in tests) of one pytest run of the example."""
    env = dict(os.environ)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", "-vv"]
    if not autoload and not workers:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        argv += ["-p", "lamina.pytest_plugin"]
    if workers:
        argv += ["-n", str(workers)]
    argv.append(f"--lamina-cache={cache}")
    started = time.monotonic()
    done = subprocess.run(argv, cwd=EXAMPLE, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"the example suite failed:\n{done.stdout}{done.stderr}")
    in_tests = sum(
        float(m.group(1))
        for m in re.finditer(r"^([0-9.]+)s (?:setup|call|teardown) ", done.stdout, re.MULTILINE)
    )
    return wall, in_tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--autoload", action="store_true")
    args = parser.parse_args()
    first: list[tuple[float, float]] = []
    second: list[tuple[float, float]] = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-fixtures-") as tmp:
            cache = Path(tmp) / "cache"
            first.append(run_suite(cache, args.workers, args.autoload))
            second.append(run_suite(cache, args.workers, args.autoload))
            # Rootless runs leave files of subordinate ids in the cache.
            from lamina import api

            api.cache_prune(all=True, cache_dir=cache)
    rows = [("first run (empty cache)", first), ("second run", second)]
    print(f"{'':26} {'wall s':>8} {'in tests s':>11}   (median of {args.rounds})")
    for label, values in rows:
        wall = statistics.median(v[0] for v in values)
        in_tests = statistics.median(v[1] for v in values)
        print(f"{label:26} {wall:8.2f} {in_tests:11.2f}")
    ratio = statistics.median(v[0] for v in second) / statistics.median(v[0] for v in first)
    print(f"second / first wall: {ratio:.2f}")


if __name__ == "__main__":
    main()
