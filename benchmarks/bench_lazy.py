"""Where a pending image's compression goes: `lamina build -t` cold, then its first reader.

    .venv/bin/python benchmarks/bench_lazy.py [--rounds 3] [--workloads bigcopy,usrcopy]
                                              [--lab /tmp/lamina-lazy]

`lamina build -t` leaves the layers it made uncompressed (cache.store "Pending images");
`lamina build -t --metadata-file F` makes the manifest at once, as every build did before
(its containerimage.digest names it), so the two modes are timed by the same code, rounds
interleaved (lazy, eager, eager, lazy, ...) to share the machine's load. Per mode: the cold
build (an empty cache holding the base image) in wall seconds and CPU seconds (user+sys of
the build and its children, which a loaded machine changes less), then `lamina save` of the
image: the lazy mode's first reader, which compresses; the eager one's only writes.

Workloads: bigcopy (../shared/bench: the whole generated context COPYed onto busybox) and
usrcopy (`RUN cp -a /usr /usr2` on a Debian minbase base, issue 15's case: the base made as
benchmarks/bench_real.py makes it, kept in --lab). Before each timed build the base is
unpacked by a build of `RUN true` on it, so what is timed is the step and its layer.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peers import run, uptime

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
MODES = ("lazy", "eager")


class Workload:
    def __init__(self, name: str, lab: Path) -> None:
        self.name = name
        self.lab = lab
        self.ctx = lab / f"ctx-{name}"
        self.base = lab / "base" / ("busybox-oci.tar" if name == "bigcopy" else "minbase-oci.tar")
        self.dockerfile = self.ctx / "Dockerfile"

    def prepare(self) -> None:
        self.base.parent.mkdir(parents=True, exist_ok=True)
        if self.name == "bigcopy":
            if not self.ctx.is_dir():
                run([sys.executable, str(SHARED / "gen_context.py"), str(self.ctx)])
            if not self.base.exists():
                run([sys.executable, str(SHARED / "mkbase.py"), str(self.base.parent)])
            shutil.copy(SHARED / "dockerfiles" / "bigcopy.Dockerfile", self.dockerfile)
            return
        self.ctx.mkdir(parents=True, exist_ok=True)
        if not self.base.exists():
            from bench_real import Lab

            real = Lab(self.lab / "real")
            real.root.mkdir(parents=True, exist_ok=True)
            from tests.support.minbase import minbase_tar

            real._make_base(minbase_tar())
            shutil.copy(real.base_oci, self.base)
        self.dockerfile.write_text("FROM bench/minbase:bookworm\nRUN cp -a /usr /usr2\n")


def timed(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user+sys of the process and its children) seconds of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def one_round(work: Workload, mode: str, lab: Path) -> dict[str, float]:
    cache = lab / f"cache-{mode}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "LAMINA_CACHE": str(cache)}
    env.pop("SOURCE_DATE_EPOCH", None)
    exe = [sys.executable, "-m", "lamina"]
    run([*exe, "load", str(work.base)], env=env)
    # The base unpacked first (`RUN true` on it), so the build timed is the step and its layer.
    warm = lab / f"warm-{work.name}"
    warm.mkdir(exist_ok=True)
    base = next(line for line in work.dockerfile.read_text().splitlines() if line.startswith("FROM "))
    (warm / "Dockerfile").write_text(base + "\nRUN true\n")
    run([*exe, "build", "--progress", "quiet", str(warm)], env=env)
    eager = ["--metadata-file", str(lab / "meta.json")] if mode == "eager" else []
    tag = f"bench/{work.name}:lazy"
    build = [
        *exe,
        "build",
        "--progress",
        "quiet",
        *eager,
        "-t",
        tag,
        "-f",
        str(work.dockerfile),
        str(work.ctx),
    ]
    wall, cpu = timed(build, env)
    save_wall, save_cpu = timed([*exe, "save", tag, "-o", str(lab / f"{mode}.tar")], env)
    shutil.rmtree(cache, ignore_errors=True)
    return {"build": wall, "build_cpu": cpu, "save": save_wall, "save_cpu": save_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="bigcopy,usrcopy")
    parser.add_argument("--lab", type=Path, default=Path("/tmp/lamina-lazy"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # tests.support.minbase, for usrcopy's base
    rows = []
    for name in args.workloads.split(","):
        work = Workload(name, args.lab)
        work.prepare()
        got: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for i in range(args.rounds):
            order = MODES if i % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                got[mode].append(one_round(work, mode, args.lab))
                last = got[mode][-1]
                print(
                    f"  {name:8} {mode:5} round {i + 1}: build {last['build']:.2f}s"
                    f" (cpu {last['build_cpu']:.2f}s) save {last['save']:.2f}s  ({uptime()})",
                    flush=True,
                )
        for mode in MODES:
            med = {k: statistics.median(r[k] for r in got[mode]) for k in got[mode][0]}
            rows.append((name, mode, med))
    print(f"median over {args.rounds} round(s): cold `build -t` then `save` (the first reader)")
    print("| workload | mode  | build s | build cpu s | save s | save cpu s |")
    print("|----------|-------|---------|-------------|--------|------------|")
    for name, mode, med in rows:
        print(
            f"| {name:8} | {mode:5} | {med['build']:7.2f} | {med['build_cpu']:11.2f} |"
            f" {med['save']:6.2f} | {med['save_cpu']:10.2f} |"
        )


if __name__ == "__main__":
    main()
