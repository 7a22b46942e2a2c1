"""What a RUN step's own network costs: apt-get on a Debian minbase, and /bin/true.

    .venv/bin/python benchmarks/bench_network.py [--rounds 5]

Run as root (debootstrap makes the minbase once, from this host's apt
sources; tests/support/minbase.py). For each round and each network mode
(`host`, today's opt-in, and `default`, a namespace of the step's own
through slirp4netns) it builds, uncached,
`RUN apt-get update && apt-get install hello` and takes the RUN step's own
seconds from the build result; rounds alternate the modes so the mirror's
caches favour neither. Then the sandbox's start-to-exit for /bin/true in
each mode. Prints medians and the ratio default/host.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lamina import api  # noqa: E402
from lamina.engine import sandbox  # noqa: E402
from tests.support.busybox import make_busybox_rootfs  # noqa: E402
from tests.support.minbase import minbase_tar, why_unavailable  # noqa: E402

APT = "apt-get -o Acquire::Retries=3"
DOCKERFILE = (
    "FROM scratch AS apt\nADD minbase.tar /\n"
    f"RUN {APT} update -q && {APT} install -y -q --no-install-recommends hello && hello\n"
)
MODES = ("host", "default")


def apt_seconds(work: Path, rounds: int) -> dict[str, list[float]]:
    ctx = work / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    shutil.copy(minbase_tar(), ctx / "minbase.tar")
    cache = work / "cache"
    api.build(ctx, cache_dir=cache, network="host", output=f"type=local,dest={work / 'warm'}")
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(rounds):
        for mode in MODES if i % 2 == 0 else reversed(MODES):
            result = api.build(
                ctx,
                cache_dir=cache,
                network=mode,
                no_cache_filter=("apt",),
                output=f"type=local,dest={work / mode}",
            )
            shutil.rmtree(work / mode)
            seconds[mode].append(next(s.seconds for s in result.steps if s.instruction.startswith("RUN")))
    return seconds


def true_seconds(work: Path, runs: int) -> dict[str, list[float]]:
    root = make_busybox_rootfs(work / "rootfs")
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(runs):
        for mode in MODES:
            spec = sandbox.SandboxSpec(
                argv=("/bin/true",),
                lower_dirs=(root,),
                network=sandbox.Network(mode),
                scratch_dir=work / "scratch",
            )
            started = time.perf_counter()
            sandbox.run(spec)
            seconds[mode].append(time.perf_counter() - started)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30, help="sandbox starts per mode for /bin/true")
    args = parser.parse_args()
    from lamina.engine.sandbox.network import unavailable

    why = unavailable()
    if why:
        print(f"bench_network: {why}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="lamina-bench-net-") as tmp:
        work = Path(tmp)
        (work / "true").mkdir()
        rows.append(("RUN /bin/true (sandbox start to exit)", true_seconds(work / "true", args.runs)))
        reason = why_unavailable()
        if reason is None:
            (work / "apt").mkdir()
            rows.append(("RUN apt-get update && install hello", apt_seconds(work / "apt", args.rounds)))
        else:
            print(f"(apt-get rows skipped: {reason})", file=sys.stderr)
        sandbox.remove_tree(work, keep_root=True)
    print("| workload | host (s) | default (s) | default/host |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        host, default = (statistics.median(seconds[m]) for m in MODES)
        print(f"| {name} | {host:.3f} | {default:.3f} | {default / host:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
