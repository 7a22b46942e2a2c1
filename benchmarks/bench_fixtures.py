"""The pytest plugin's example suite, first run (empty cache) against second run, and where time goes.

    .venv/bin/python benchmarks/bench_fixtures.py [--rounds 3] [--workers N] [--autoload] [--busybox-only]

Each round runs `pytest examples/pytest-fixtures` twice with a fresh
`--lamina-cache`: the first builds every image, the second finds them all
cached. It prints the median wall time of the whole pytest command
(interpreter start-up included) and the time the suite spent in tests
(setup + call + teardown from `--durations=0`: the tests do little but
build, run and serve through the plugin, so this is fixture time), and the
CPU time of pytest and every process it started (sandboxes included: on a
loaded machine the wall times grow, this much less), for the
whole suite and for its busybox part alone (tests/test_site.py: no Debian
base, whose first build is mostly apt-get).

Then where a second run's time goes, each measured on its own (median of
`--rounds` x 5): pytest's start-up with the plugin (an empty test file),
importing the plugin and the fixtures' modules, a replayed build, one
`lamina_run` of `true`, starting a busybox httpd service until it is ready
(tcp), `Service.exec` of `true` in it, and the same service given a name
with a named peer (the relays).

By default pytest loads only the lamina plugin (PYTEST_DISABLE_PLUGIN_AUTOLOAD
and `-p lamina.pytest_plugin`), as in a project's own environment;
`--autoload` loads every plugin installed here (this venv's hypothesis
alone adds ~0.9 s of imports to each pytest start). `--workers N` passes
`-n N` (pytest-xdist; implies --autoload). The Debian base needs a minbase
tar (made as root by the example's conftest, once per machine).
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pytest-fixtures"
Rows = list[tuple[str, list[tuple[float, float, float]]]]  # (label, [(wall, in tests, CPU)] per round)


def run_suite(cache: Path, workers: int, autoload: bool, *paths: str) -> tuple[float, float, float]:
    """(wall seconds, seconds in tests, CPU seconds of pytest and all it started) of one run."""
    import resource

    env = dict(os.environ)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", "-vv"]
    if not autoload and not workers:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        argv += ["-p", "lamina.pytest_plugin"]
    if workers:
        argv += ["-n", str(workers)]
    # A basetemp of its own: at start pytest removes old session dirs of the shared
    # /tmp/pytest-of-USER, which on a busy machine costs more than the suite.
    argv += [f"--lamina-cache={cache}", f"--basetemp={cache.parent / 'basetemp'}", *paths]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(argv, cwd=EXAMPLE, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        sys.exit(f"the example suite failed:\n{done.stdout}{done.stderr}")
    in_tests = sum(
        float(m.group(1))
        for m in re.finditer(r"^([0-9.]+)s (?:setup|call|teardown) ", done.stdout, re.MULTILINE)
    )
    return wall, in_tests, cpu


def suite_rows(args: argparse.Namespace, paths: tuple[str, ...]) -> Rows:
    from lamina import api

    first: list[tuple[float, float, float]] = []
    second: list[tuple[float, float, float]] = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-fixtures-") as tmp:
            cache = Path(tmp) / "cache"
            first.append(run_suite(cache, args.workers, args.autoload, *paths))
            second.append(run_suite(cache, args.workers, args.autoload, *paths))
            # Rootless runs leave files of subordinate ids in the cache.
            api.cache_prune(all=True, cache_dir=cache)
    return [("first run (empty cache)", first), ("second run", second)]


def print_suite(title: str, rows: Rows, rounds: int) -> None:
    print(f"{title:34} {'wall s':>8} {'in tests s':>11} {'CPU s':>7}   (median of {rounds})")
    for label, values in rows:
        wall = statistics.median(v[0] for v in values)
        in_tests = statistics.median(v[1] for v in values)
        cpu = statistics.median(v[2] for v in values)
        print(f"  {label:32} {wall:8.2f} {in_tests:11.2f} {cpu:7.2f}")
    ratio = statistics.median(v[0] for v in rows[1][1]) / statistics.median(v[0] for v in rows[0][1])
    print(f"  {'second / first wall':32} {ratio:8.2f}")


def median_of(n: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def breakdown(rounds: int) -> list[tuple[str, float]]:
    """Where a second run's time goes, one part at a time (seconds, medians)."""
    n = max(3, rounds * 5)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fixtures-parts-") as tmp:
        project = Path(tmp) / "p"
        project.mkdir()
        (project / "pytest.ini").write_text("[pytest]\n")
        (project / "test_empty.py").write_text("def test_nothing():\n    pass\n")
        env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]

        def pytest_run(*extra: str) -> None:
            subprocess.run([*base, *extra], cwd=project, env=env, capture_output=True, check=True)

        rows.append(("pytest start-up, no plugin (empty test)", median_of(n, pytest_run)))
        rows.append(
            ("pytest start-up, lamina plugin", median_of(n, lambda: pytest_run("-p", "lamina.pytest_plugin")))
        )
        imports = (
            "import time; t = time.perf_counter(); "
            "import lamina.api, lamina.fixtures.images, lamina.fixtures.runs, lamina.fixtures.services, "
            "lamina.fixtures.peers, lamina.engine.executor, lamina.cache.store; "
            "print(time.perf_counter() - t)"
        )
        seconds = [
            float(subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True).stdout)
            for _ in range(n)
        ]
        rows.append(("import the fixtures' modules (api, engine, cache)", statistics.median(seconds)))
        rows += _fixture_parts(Path(tmp) / "cache", n)
    return rows


def _fixture_parts(cache: Path, n: int) -> list[tuple[str, float]]:
    import shutil

    from lamina.fixtures import peers, services
    from lamina.fixtures.images import Builder
    from lamina.fixtures.runs import run_command

    context = cache.parent / "base"
    shutil.copytree(EXAMPLE / "base", context)
    shutil.copy2("/bin/busybox", context / "busybox")
    builder = Builder(cache, cache.parent / "work")
    image = builder(context, tag="bench/busybox:latest").name

    def replay() -> None:
        builder._built.clear()
        builder(context, tag="bench/busybox:latest")

    rows = [("a replayed build (lamina_build, cached)", median_of(n, replay))]
    rows.append(("lamina_run of true", median_of(n, lambda: run_command(image, ["true"], cache_dir=cache))))
    services_dir = cache / "pytest" / "services"
    httpd = ["/bin/sh", "-c", "mkdir -p /w; exec httpd -f -p 80 -h /w"]

    def start(**kwargs: object) -> services.Service:
        return services.start(image, services_dir=services_dir, cache_dir=cache, command=httpd, **kwargs)  # type: ignore[arg-type]

    if services.unavailable():
        rows.append((f"(services skipped: {services.unavailable()})", 0.0))
        return rows
    rows.append(("service start until ready (tcp), and stop", median_of(n, lambda: start(ports=[80]).stop())))
    svc = start(ports=[80])
    try:
        rows.append(("Service.exec of true", median_of(n, lambda: svc.exec(["true"]))))
    finally:
        svc.stop()

    def pair() -> None:
        group = peers.Group(services_dir / "bench-peers")
        started = []
        try:
            for name in ("one", "two"):
                mount = group.reserve(name)
                started.append(
                    start(
                        ports=[80] if name == "one" else [],
                        ready="tcp" if name == "one" else None,
                        mounts=[mount],
                        hostname=name,
                        on_running=lambda s, name=name: group.join(name, s.sandbox_pid, s.ports),
                    )
                )
        finally:
            for s in started:
                s.stop()
            shutil.rmtree(group.directory, ignore_errors=True)

    rows.append(("two named services, the second relayed to the first", median_of(n, pair)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--autoload", action="store_true")
    parser.add_argument("--busybox-only", action="store_true", help="skip the whole suite (its Debian build)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.busybox_only:
        print_suite("whole suite", suite_rows(args, ()), args.rounds)
    print_suite("busybox part (tests/test_site.py)", suite_rows(args, ("tests/test_site.py",)), args.rounds)
    print(f"{'where a second run goes, one part at a time':52} {'s':>6}")
    for label, seconds in breakdown(args.rounds):
        print(f"  {label:50} {seconds:6.3f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
