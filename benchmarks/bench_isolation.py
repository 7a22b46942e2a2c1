"""What each isolation mode costs: a RUN step's start-to-exit, and a small two-stage build.

    .venv/bin/python benchmarks/bench_isolation.py [--rounds 10] [--plain-user lamina-sb-nosub]

Run as root (chroot and rootns need uid 0); proot is for a plain uid, so as
root its row is measured by re-running this script as --plain-user. With
--workloads (default: the three of ../shared/bench/dockerfiles, over the
context ../shared/bench/gen_context.py makes) each mode also builds each
workload cold (a cache holding only the base) and again (no-op), one round. For each mode this process may
use (`lamina info` lists them): the sandbox's start-to-exit for /bin/true
over the busybox base (median of --rounds), then a cold and a no-op build
of tests/test_sandbox_isolation.py's Dockerfile (two stages, four RUN
steps with a cache mount, a secret and a heredoc). Prints a table.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lamina.engine import sandbox  # noqa: E402
from lamina.engine.sandbox.isolation import Isolation, choose  # noqa: E402
from lamina.errors import SandboxError  # noqa: E402
from tests.support.busybox import make_busybox_image, make_busybox_rootfs  # noqa: E402
from tests.test_sandbox_isolation import DOCKERFILE  # noqa: E402


def _true(rootfs: Path, scratch: Path, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        spec = sandbox.SandboxSpec(
            argv=("/bin/true",), lower_dirs=(rootfs,), network=sandbox.Network.HOST, scratch_dir=scratch
        )
        start = time.perf_counter()
        code = sandbox.run(spec)
        times.append(time.perf_counter() - start)
        assert code == 0
    return statistics.median(times)


def _build(work: Path, mode: str, base: Path) -> tuple[float, float]:
    cache, ctx = work / f"cache-{mode}", work / "ctx"
    env = {**os.environ, "LAMINA_CACHE": str(cache), "SOURCE_DATE_EPOCH": "0", "LAMINA_ISOLATION": mode}
    lamina = [sys.executable, "-m", "lamina"]
    subprocess.run([*lamina, "load", str(base)], env=env, check=True, capture_output=True, cwd=ROOT)
    args = [*lamina, "build", "--progress", "quiet", "--secret", f"id=tok,src={work}/tok", str(ctx)]
    out = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run(args, env=env, check=True, capture_output=True, cwd=ROOT)
        out.append(time.perf_counter() - start)
    return out[0], out[1]


SHARED = ROOT.parent / "shared" / "bench"
WORKLOADS = ("multistage", "manysteps", "bigcopy")


def _workload(work: Path, mode: str, base: Path, name: str) -> tuple[float, float]:
    cache = work / f"cache-{mode}-{name}"
    env = {**os.environ, "LAMINA_CACHE": str(cache), "LAMINA_ISOLATION": mode}
    env.pop("SOURCE_DATE_EPOCH", None)
    lamina = [sys.executable, "-m", "lamina"]
    subprocess.run([*lamina, "load", str(base)], env=env, check=True, capture_output=True, cwd=ROOT)
    dockerfile = SHARED / "dockerfiles" / f"{name}.Dockerfile"
    args = [*lamina, "build", "--progress", "quiet", "-f", str(dockerfile), str(work / "wctx")]
    out = []
    for _ in range(2):
        start = time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
        out.append(time.perf_counter() - start)
        if done.returncode:
            raise SystemExit(f"{mode} {name}: {done.stderr[-1500:]}")
    shutil.rmtree(cache, ignore_errors=True)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--plain-user", default="", help="as root: measure proot as this user")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated; '' for none")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    workloads = [w for w in opts.workloads.split(",") if w]
    rounds = opts.rounds
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp:
        work = Path(tmp)
        work.chmod(0o777)
        if workloads:
            shared = Path(opts.work) if opts.work else work
            if not (shared / "wctx").is_dir():
                ctx = [sys.executable, str(SHARED / "gen_context.py"), str(shared / "wctx")]
                subprocess.run(ctx, check=True, capture_output=True)
                subprocess.run(["chmod", "-R", "a+rX", str(shared / "wctx")], check=True)
            if shared != work:
                (work / "wctx").symlink_to(shared / "wctx")
        rootfs = make_busybox_rootfs(work / "rootfs")
        base = make_busybox_image(work / "base")
        (work / "ctx").mkdir()
        (work / "ctx/Dockerfile").write_text(DOCKERFILE)
        (work / "ctx/app.txt").write_text("hello\n")
        (work / "tok").write_text("s3cret\n")
        if not opts.only:
            heads = "".join(f" {w + ' cold':>15} {w + ' no-op':>16}" for w in workloads)
            print(f"{'mode':8} {'/bin/true ms':>13} {'cold build s':>13} {'no-op s':>8}{heads}")
        for mode in Isolation:
            if opts.only and mode.value != opts.only:
                continue
            if mode is Isolation.PROOT and os.geteuid() == 0 and opts.plain_user:
                again = [sys.executable, __file__, "--only", "proot", "--rounds", str(rounds)]
                again += ["--workloads", ",".join(workloads), "--work", str(work)]
                done = subprocess.run(
                    ["runuser", "-u", opts.plain_user, "--", *again], cwd="/tmp", check=False
                )
                if done.returncode:
                    print(f"{mode.value:8} failed as {opts.plain_user}")
                continue
            try:
                choose(mode)
            except SandboxError as err:
                print(f"{mode.value:8} skipped: {err}")
                continue
            os.environ["LAMINA_ISOLATION"] = mode.value
            true_s = _true(rootfs, work / "scratch", rounds)
            cold, noop = _build(work, mode.value, base)
            row = f"{mode.value:8} {true_s * 1000:13.1f} {cold:13.2f} {noop:8.2f}"
            for name in workloads:
                w_cold, w_noop = _workload(work, mode.value, base, name)
                row += f" {w_cold:15.2f} {w_noop:16.2f}"
            print(row, flush=True)
        shutil.rmtree(work / "scratch", ignore_errors=True)


if __name__ == "__main__":
    main()
