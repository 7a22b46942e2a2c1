"""What emulation costs, and what cross-compiling in a $BUILDPLATFORM stage saves.

    .venv/bin/python benchmarks/bench_emulation.py [--rounds 3] [--size 1000000]

Over lamina-test/busybox-multi:1.35 (tests/support/multiplatform.py: the amd64 busybox
image and Debian's busybox-static:arm64 under one index; fetching the arm64 package needs
`dpkg --add-architecture arm64 && apt-get update`, as README's test command does), on an
x86_64 host with qemu-user-static (`lamina info` says how each platform runs). Each build
is cold (--no-cache); the median of --rounds is printed.

1. A RUN-heavy stage (a shell loop starting programs, then `gzip -9` of --size lines of
   `seq`) built for linux/amd64 (native) and for linux/arm64 (emulated).
2. A two-platform build (linux/amd64,linux/arm64) whose "compile" (the same gzip -9 work,
   busybox has no compiler) runs either in a `FROM --platform=$BUILDPLATFORM` stage once per
   target, natively (cross-compiling), or in each target's own stage (arm64's emulated).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.multiplatform import make_multiplatform_image, why_no_arm64  # noqa: E402

BASE = "lamina-test/busybox-multi:1.35"
WORK = (
    "i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo $i | md5sum >/dev/null; done; "
    "seq 1 {size} | gzip -9 > /out/app-$(uname -m).gz"
)
HEAVY = f"FROM {BASE}\nRUN mkdir /out && {WORK}\n"
CROSS = f"""FROM --platform=$BUILDPLATFORM {BASE} AS build
ARG TARGETARCH
RUN mkdir /out && {WORK} && mv /out/app-*.gz /out/app-$TARGETARCH.gz
FROM {BASE}
COPY --from=build /out/ /app/
"""
EMULATED = f"""FROM {BASE} AS build
RUN mkdir /out && {WORK}
FROM {BASE}
COPY --from=build /out/ /app/
"""


def _build(cache: Path, ctx: Path, dockerfile: str, platforms: str, rounds: int) -> float:
    (ctx / "Dockerfile").write_text(dockerfile)
    env = {**os.environ, "LAMINA_CACHE": str(cache)}
    args = [sys.executable, "-m", "lamina", "build", "--no-cache", "--progress", "quiet",
            "--platform", platforms, "-o", f"type=oci,dest={ctx.parent / 'out.tar'}", str(ctx)]  # fmt: skip
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"bench_emulation: lamina build --platform {platforms} failed:\n{done.stderr}")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=1_000_000, help="lines of seq the gzip -9 step packs")
    opts = parser.parse_args()
    why = why_no_arm64()
    if why is not None:
        sys.exit(f"bench_emulation: {why}")
    with tempfile.TemporaryDirectory(prefix="bench-emulation-") as tmp:
        work = Path(tmp)
        image = make_multiplatform_image(work / "image")
        cache, ctx = work / "cache", work / "ctx"
        ctx.mkdir()
        env = {**os.environ, "LAMINA_CACHE": str(cache)}
        subprocess.run([sys.executable, "-m", "lamina", "load", str(image.archive)], env=env, check=True,
                       capture_output=True, cwd=ROOT)  # fmt: skip
        heavy = HEAVY.replace("{size}", str(opts.size))
        native = _build(cache, ctx, heavy, "linux/amd64", opts.rounds)
        emulated = _build(cache, ctx, heavy, "linux/arm64", opts.rounds)
        cross = _build(
            cache, ctx, CROSS.replace("{size}", str(opts.size)), "linux/amd64,linux/arm64", opts.rounds
        )
        each = _build(
            cache, ctx, EMULATED.replace("{size}", str(opts.size)), "linux/amd64,linux/arm64", opts.rounds
        )
    load = os.getloadavg()[0]
    print(f"median of {opts.rounds} cold builds, seq 1 {opts.size} | gzip -9; load average {load:.1f}")
    print("| build | time | vs |")
    print("|---|---|---|")
    print(f"| RUN-heavy stage, linux/amd64 (native) | {native:.2f} s | |")
    print(f"| RUN-heavy stage, linux/arm64 (emulated) | {emulated:.2f} s | {emulated / native:.1f}x native |")
    print(f"| amd64+arm64, compile in a $BUILDPLATFORM stage (cross) | {cross:.2f} s | |")
    each_row = "amd64+arm64, compile in each target's stage (arm64 emulated)"
    print(f"| {each_row} | {each:.2f} s | {each / cross:.1f}x cross |")


if __name__ == "__main__":
    main()
