"""Large build contexts (issue 22): 10,000 / 100,000 / (--million) 1,000,000 small files.

    .venv/bin/python benchmarks/bench_large_context.py [--sizes 10000,100000] [--million]
                                                      [--rounds 3] [--no-peers] [--peer-max N]
                                                      [--lab /var/tmp/lamina-bigctx]

Each context is generated deterministically (small text files, 100 per
directory) and built with

    FROM lamina-test/busybox:1.35
    COPY . /ctx
    RUN wc -l /ctx/d00000/f00000.txt > /count

Scenarios, each the wall time of the whole client command (Python start-up
included), medians over --rounds:

    cold    an empty cache holding only the base image
    hit     every step a cache hit but the build memo missed: one file
            rewritten with the same bytes (its ctime changes, its content
            does not), so the context is walked and looked up again
    noop    the same build again (the memo replays it)
    mod     one file's content changed: COPY and RUN rerun

Also lamina's CPU seconds (user + system of the build's processes: wall
time on a loaded machine is mostly waiting for a core), and `peak MB`, the
largest sum of the resident sets of every process of the cold build's
session (polled from /proc every 20 ms), and of the mod build's. BuildKit (docker 20.10,
`DOCKER_BUILDKIT=1 docker build --network=none -q` on a dockerd of the bench's
own, its data root under --lab: benchmarks/peers.Dockerd) is timed the same way,
rounds taking turns, when that daemon starts (as root; and the size is at most
--peer-max), and the table gets lamina's ratio to it (< 1:
lamina faster). Each tool's round starts with every file of the context
read once (in the page cache for both: whichever went first paid for the
disk before). Each tool's cache is emptied after its round, so that one
tool's copy of a big context is gone before the other's is made (a
1,000,000-file context is ~4 GB on ext4; BuildKit holds two copies of it,
lamina one). The machine these numbers come from is shared and loaded:
compare ratios from one run; each round prints the load average. The
default --lab is under /var/tmp, not /tmp: on an ext4 without a journal,
creating files in a block group where other processes (test suites under
/tmp) just deleted thousands costs several times more (see the README), and
docker keeps BuildKit's files under its data root, not /tmp.

Before each cold build, and as root, the bench syncs and drops the kernel's
caches, then reads the context back in and starts each tool once
(peers.settle says why: on this VM's ext4, creating files right after another
tool's cache was deleted cost 2-3x). Each tool's round follows the other's
emptying, so without this the cold column measured which tool the deletion
hurt more.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import BuildKitPeer, settle  # noqa: E402

SHARED = ROOT.parent / "shared" / "bench"
BASE = "lamina-test/busybox:1.35"
SCENARIOS = ("cold", "hit", "noop", "mod")
PER_DIR = 100
DOCKERFILE = f"""FROM {BASE}
COPY . /ctx
RUN wc -l /ctx/d00000/f00000.txt > /count
"""


def make_context(path: Path, files: int) -> None:
    """`files` small text files, 100 per directory, the same bytes every time."""
    done = path / ".complete"
    if done.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for i in range(files):
        d, f = divmod(i, PER_DIR)
        folder = path / f"d{d:05d}"
        if f == 0:
            folder.mkdir()
        lines = "".join(f"line {n} of file {i}\n" for n in range(1 + i % 7))
        (folder / f"f{f:05d}.txt").write_text(lines)
    (path / ".dockerignore").write_text(".complete\n")
    done.touch()


class Proc:
    """Run a command; wall seconds and peak summed RSS of its session."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.env = env

    def run(self) -> tuple[float, float, float]:
        """Wall seconds, peak summed RSS (MB), CPU seconds (user + system, its waited processes)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        proc = subprocess.Popen(
            self.args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        peak = [0]
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], _session_rss(proc.pid))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, err = proc.communicate()
        seconds = time.monotonic() - start
        stop.set()
        poller.join()
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(self.args)}\n{err.decode()[-3000:]}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return seconds, peak[0] / 1024, cpu


def _session_rss(sid: int) -> int:
    """Summed VmRSS (kB) of every process in session `sid`, a process counted once: a child
    forked (or vforked) from another that has not exec'd yet shares its parent's pages, and
    its VmRSS repeats the parent's (seen for a moment as lamina starts a RUN's helper)."""
    found: dict[int, tuple[int, int, int]] = {}  # pid -> (parent, VmRSS, VmSize)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            if int(fields[3]) != sid:  # field 6, the session id
                continue
            sizes = {}
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith((b"VmRSS:", b"VmSize:")):
                        sizes[line[:6]] = int(line.split()[1])
            found[int(name)] = (int(fields[1]), sizes.get(b"VmRSS:", 0), sizes.get(b"VmSize", 0))
        except (OSError, ValueError, IndexError):
            continue
    total = 0
    for parent, rss, size in found.values():
        twin = found.get(parent)
        if twin is not None and twin[2] == size and size:
            continue  # its parent's image, not exec'd yet: the same pages
        total += rss
    return total


class Lamina:
    name = "lamina"

    def __init__(self, lab: Path) -> None:
        self.lab = lab
        self.cache = lab / "lamina-cache"
        self.env = {**os.environ, "LAMINA_CACHE": str(self.cache)}
        self.env.pop("SOURCE_DATE_EPOCH", None)
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(ROOT / "lamina")], env=self.env, check=False
        )

    def clean(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)

    def prune(self) -> None:
        self.clean()
        subprocess.run(
            [sys.executable, "-m", "lamina", "load", str(self.lab / "base" / "busybox-oci.tar")],
            env=self.env, check=True, capture_output=True,
        )  # fmt: skip

    def start(self) -> None:
        """Its code read back in after the caches were dropped."""
        subprocess.run(
            [sys.executable, "-m", "lamina", "images"], env=self.env, check=True, capture_output=True
        )

    def build(self, ctx: Path, dockerfile: Path) -> tuple[float, float, float]:
        args = [sys.executable, "-m", "lamina", "build", "--progress", "quiet", "-f", str(dockerfile)]
        return Proc([*args, "-t", "bench/bigctx:lamina", str(ctx)], self.env).run()


class BuildKit(BuildKitPeer):
    """`docker build` on the bench's own dockerd (data root under the lab, beside lamina's
    cache): emptying its build cache never touches the machine's dockerd."""

    def __init__(self, lab: Path) -> None:
        super().__init__(lab)
        self.lab = lab

    def clean(self) -> None:
        subprocess.run([*self.docker.cli, "rmi", "-f", "bench/bigctx:bk"], capture_output=True)
        subprocess.run([*self.docker.cli, "builder", "prune", "-af"], capture_output=True)

    def prune(self) -> None:
        self.docker.reset(["bench/bigctx:bk"], BASE, self.lab / "base" / "busybox-docker.tar")

    def build(self, ctx: Path, dockerfile: Path) -> tuple[float, float, float]:
        args = [
            *self.docker.cli,
            "build",
            "--network=none",
            "-q",
            "-f",
            str(dockerfile),
            "-t",
            "bench/bigctx:bk",
            str(ctx),
        ]
        seconds, _, _ = Proc(args, self.env).run()
        return seconds, float("nan"), float("nan")  # dockerd's memory and CPU are not the client's


def one_round(tool: Lamina | BuildKit, ctx: Path, dockerfile: Path, round_no: int) -> dict[str, float]:
    probe = ctx / "d00000" / "f00001.txt"
    pristine = probe.read_bytes()
    tool.prune()
    settle(ctx)  # see peers.settle
    tool.start()
    result: dict[str, float] = {}
    result["cold"], result["peak"], result["cold_cpu"] = tool.build(ctx, dockerfile)
    probe.write_bytes(pristine)  # same bytes, new ctime: the memo misses, every key hits
    result["hit"], _, result["hit_cpu"] = tool.build(ctx, dockerfile)
    result["noop"], _, result["noop_cpu"] = tool.build(ctx, dockerfile)
    probe.write_bytes(pristine + f"change {round_no} {time.time_ns()}\n".encode())
    result["mod"], result["mod_peak"], result["mod_cpu"] = tool.build(ctx, dockerfile)
    probe.write_bytes(pristine)
    tool.clean()
    result["load"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--million", action="store_true", help="also 1,000,000 files (~4 GB of inodes, slow)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="lamina only")
    parser.add_argument("--peer-max", type=int, default=0, help="BuildKit only up to this many files")
    parser.add_argument("--lab", type=Path, default=Path("/var/tmp/lamina-bigctx"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.million:
        sizes.append(1_000_000)
    lab: Path = args.lab
    lab.mkdir(parents=True, exist_ok=True)
    if not (lab / "base" / "busybox-oci.tar").exists():
        subprocess.run(
            [sys.executable, str(SHARED / "mkbase.py"), str(lab / "base")], check=True, stdout=sys.stderr
        )
    dockerfile = lab / "Dockerfile"
    dockerfile.write_text(DOCKERFILE)
    tools: list[Lamina | BuildKit] = [Lamina(lab)]
    if not args.no_peers:
        peer = BuildKit(lab)
        if peer.available():
            tools.append(peer)
        else:
            print(
                "BuildKit: its dockerd did not start (root and docker.io needed); lamina only",
                file=sys.stderr,
            )
    table: dict[tuple[str, int], dict[str, float]] = {}
    for size in sizes:
        ctx = lab / f"ctx-{size}"
        print(f"context of {size:,} files: {ctx}", file=sys.stderr)
        make_context(ctx, size)
        here = [t for t in tools if t.name == "lamina" or not args.peer_max or size <= args.peer_max]
        runs: dict[str, list[dict[str, float]]] = {tool.name: [] for tool in here}
        for round_no in range(args.rounds):
            for tool in here:
                result = one_round(tool, ctx, dockerfile, round_no)
                runs[tool.name].append(result)
                cells = " ".join(f"{k}={v:.2f}" for k, v in result.items())
                print(f"  {tool.name:8} {size:>9,} round {round_no + 1}: {cells}", file=sys.stderr)
        for name, results in runs.items():
            table[name, size] = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(
        f"median wall seconds over {args.rounds} round(s); peak MB = summed RSS of the cold (mod) build's"
        " processes"
    )
    print("| files | tool | cold | hit (memo missed) | noop | mod (one file) | peak MB cold (mod) | load |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for tool in tools:
            if (tool.name, size) not in table:
                continue
            row = table[tool.name, size]
            cells = " | ".join(f"{row[s]:.2f}" for s in SCENARIOS)
            peak = "" if row["peak"] != row["peak"] else f"{row['peak']:.0f} ({row['mod_peak']:.0f})"
            print(f"| {size:,} | {tool.name} | {cells} | {peak} | {row['load']:.1f} |")
            if tool.name != "lamina":
                mine = table["lamina", size]
                ratios = " | ".join(f"{mine[s] / row[s]:.2f}x" for s in SCENARIOS)
                print(f"| {size:,} | ratio | {ratios} | | |")
    print()
    print(
        "lamina's CPU seconds (user + system of the build's processes; the machine's load inflates wall time)"
    )
    print("| files | cold | hit (memo missed) | noop | mod (one file) |")
    print("|---:|---:|---:|---:|---:|")
    for size in sizes:
        row = table["lamina", size]
        print(f"| {size:,} | " + " | ".join(f"{row[s + '_cpu']:.2f}" for s in SCENARIOS) + " |")


if __name__ == "__main__":
    main()
