"""Time `lamina build` on the shared workloads: cold, no-op, one-file change, export.

    .venv/bin/python benchmarks/bench_build.py [--rounds 3] [--workloads multistage,manysteps,bigcopy]
                                               [--peers] [--user lamina-sb-sub] [--lab /tmp/lamina-bench]

Workloads are ../shared/bench/dockerfiles/*.Dockerfile over the context that
../shared/bench/gen_context.py makes, on the base image lamina-test/busybox:1.35.
Scenarios, as ../shared/bench/run_peers.sh defines them:

    cold    an empty cache holding only the base image
    noop    the same build again
    mod     one line appended to src/pkg07/mod3/f07312.c
    export  the (cached) build written to an OCI archive with -o type=oci

Each number is the median wall time of the whole command (Python start-up
included) over the rounds; lamina's cold build also gives its peak RSS
(`/usr/bin/time -v`: the largest process of the build), printed after the
table, and each round's line ends with the load averages. With --user
(as root), lamina also runs rootless as that user (who needs subordinate
ids), and its row's ratio is rootless / root; root's lamina then runs through
the same runuser and plain environment (peers.as_user), so the ratio is
lamina's. With --peers, BuildKit (docker 20.10,
`DOCKER_BUILDKIT=1 docker build --network=none`) and Buildah (`buildah bud
--layers`, overlay) are timed the same way when they are installed and we are
root, and the table gets their times and lamina's ratio to each (below 1.0:
lamina is faster).

What a cold build clears is the bench's own: lamina's cache and Buildah's store
live in --lab, and BuildKit runs in a dockerd the bench starts for the run (data
root LAB/dockerd, stopped at exit), whose build cache it prunes whole. The
machine's dockerd, its images and its shared BuildKit cache are never touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from peers import BuildahStore, BuildKitPeer, as_user, run, settle, uptime

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
WORKLOADS = ("multistage", "manysteps", "bigcopy")
SCENARIOS = ("cold", "noop", "mod", "export")
MOD_FILE = "src/pkg07/mod3/f07312.c"
BASE = "lamina-test/busybox:1.35"


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ctx = root / "ctx"
        self.base = root / "base"
        root.mkdir(parents=True, exist_ok=True)

    def prepare(self) -> None:
        if not (self.ctx / "src").is_dir():
            run([sys.executable, str(SHARED / "gen_context.py"), str(self.ctx)])
        if not (self.base / "busybox-oci.tar").exists():
            run([sys.executable, str(SHARED / "mkbase.py"), str(self.base)])
        self.pristine = (self.ctx / MOD_FILE).read_bytes()

    def reset_context(self) -> None:
        (self.ctx / MOD_FILE).write_bytes(self.pristine)

    def modify(self, round_no: int) -> None:
        with open(self.ctx / MOD_FILE, "a") as f:
            f.write(f"/* bench change {round_no} {time.time_ns()} */\n")


class Lamina:
    """lamina as the caller, or rootless as `user` (runuser with a plain environment, as
    ../shared/bench/peers-setup.sh's asuser.sh; the user needs subordinate ids). With
    `plain`, root's lamina goes through the same runuser and plain environment (peers.as_user)."""

    def __init__(self, lab: Lab, user: str | None = None, plain: bool = False) -> None:
        self.lab = lab
        self.name = "rootless" if user else "lamina"
        home = lab.root / f"user-{user}" if user else lab.root
        self.home = home
        self.cache = home / "lamina-cache"
        self.env = {**os.environ, "LAMINA_CACHE": str(self.cache)}
        self.env.pop("SOURCE_DATE_EPOCH", None)
        # As installed: bytecode compiled once (pip does), not every run
        # (~15 ms of a no-op build when the environment forbids writing it).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        run([sys.executable, "-m", "compileall", "-q", str(ROOT / "lamina")], env=self.env, check=False)
        self.exe = [sys.executable, "-m", "lamina"]
        plain_env = {"LAMINA_CACHE": str(self.cache), "PYTHONPATH": str(ROOT)}
        if user:
            import pwd

            entry = pwd.getpwnam(user)
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, entry.pw_uid, entry.pw_gid)
            self.exe = [*as_user(user, plain_env), *self.exe]
        elif plain:
            self.exe = [*as_user("root", plain_env), *self.exe]

    def available(self) -> bool:
        return True

    def prune(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)  # as root, a rootless cache too
        run([*self.exe, "load", str(self.lab.base / "busybox-oci.tar")], env=self.env)

    def start(self) -> None:
        run([*self.exe, "images"], env=self.env)

    def build(self, workload: str, peak: list[float] | None = None) -> float:
        dockerfile = SHARED / "dockerfiles" / f"{workload}.Dockerfile"
        args = [
            *self.exe, "build", "--progress", "quiet", "-f", str(dockerfile),
            "-t", f"bench/{workload}:lamina", str(self.lab.ctx),
        ]  # fmt: skip
        timed = run(args, env=self.env, peak=peak is not None)
        if peak is not None:
            peak.append(timed.peak_mb if timed.peak_mb is not None else float("nan"))
        return timed.seconds

    def export(self, workload: str) -> float:
        dockerfile = SHARED / "dockerfiles" / f"{workload}.Dockerfile"
        out = self.home / f"lamina-{workload}-oci.tar"
        return run([
            *self.exe, "build", "--progress", "quiet", "-f", str(dockerfile),
            "-t", f"bench/{workload}:lamina", "-o", f"type=oci,dest={out}", str(self.lab.ctx),
        ], env=self.env).seconds  # fmt: skip


class BuildKit(BuildKitPeer):
    def __init__(self, lab: Lab) -> None:
        super().__init__(lab.root)
        self.lab = lab

    def prune(self) -> None:
        tags = [f"bench/{workload}:bk" for workload in WORKLOADS]
        self.docker.reset(tags, BASE, self.lab.base / "busybox-docker.tar")

    def build(self, workload: str) -> float:
        dockerfile = SHARED / "dockerfiles" / f"{workload}.Dockerfile"
        return run([
            *self.docker.cli, "build", "--network=none", "-q", "-f", str(dockerfile),
            "-t", f"bench/{workload}:bk", str(self.lab.ctx),
        ], env=self.env).seconds  # fmt: skip

    def export(self, workload: str) -> float:
        out = self.lab.root / f"bk-{workload}-oci.tar"
        out.unlink(missing_ok=True)
        return run([
            "skopeo", "copy", "-q", "--src-daemon-host", self.docker.host,
            f"docker-daemon:bench/{workload}:bk", f"oci-archive:{out}:bench/{workload}:bk",
        ]).seconds  # fmt: skip


class Buildah:
    name = "buildah"

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.store = BuildahStore(lab.root / "buildah")

    def available(self) -> bool:
        return self.store.available()

    def prune(self) -> None:
        self.store.reset(self.lab.base / "busybox-oci.tar")

    def start(self) -> None:
        self.store.start()

    def build(self, workload: str) -> float:
        dockerfile = SHARED / "dockerfiles" / f"{workload}.Dockerfile"
        return run([
            *self.store.cmd, "bud", "--isolation", "chroot", "--layers", "-q", "-f", str(dockerfile),
            "-t", f"localhost/bench/{workload}:bah", str(self.lab.ctx),
        ]).seconds  # fmt: skip

    def export(self, workload: str) -> float:
        out = self.lab.root / f"bah-{workload}-oci.tar"
        out.unlink(missing_ok=True)
        return run([
            *self.store.cmd, "push", "-q", f"localhost/bench/{workload}:bah",
            f"oci-archive:{out}:bench/{workload}:bah",
        ]).seconds  # fmt: skip


def measure_round(tool: object, lab: Lab, workload: str, round_no: int) -> dict[str, float]:
    """One round of the four scenarios, from a pruned cache."""
    lab.reset_context()
    tool.prune()  # type: ignore[attr-defined]
    settle(lab.ctx)  # see peers.settle
    tool.start()  # type: ignore[attr-defined]
    peak: list[float] = []
    if isinstance(tool, Lamina):
        times = {"cold": tool.build(workload, peak)}
        times["peak MB"] = peak[0]
    else:
        times = {"cold": tool.build(workload)}  # type: ignore[attr-defined]
    times["noop"] = tool.build(workload)  # type: ignore[attr-defined]
    lab.modify(round_no)
    times["mod"] = tool.build(workload)  # type: ignore[attr-defined]
    times["export"] = tool.export(workload)  # type: ignore[attr-defined]
    lab.reset_context()
    return times


def measure(
    tools: list[object], lab: Lab, workload: str, rounds: int, log: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """Median seconds per tool and scenario; the tools take turns round by round,
    so a burst of load on the machine hits them alike."""
    times: dict[str, dict[str, list[float]]] = {
        tool.name: {s: [] for s in (*SCENARIOS, "peak MB")}  # type: ignore[attr-defined]
        for tool in tools
    }
    for round_no in range(rounds):
        for tool in tools:
            result = measure_round(tool, lab, workload, round_no)
            for scenario, seconds in result.items():
                times[tool.name][scenario].append(seconds)  # type: ignore[attr-defined]
            log(
                f"  {tool.name:9} {workload:11} round {round_no + 1}: "  # type: ignore[attr-defined]
                + " ".join(f"{s}={result[s]:.2f}" for s in (*SCENARIOS, "peak MB") if s in result)
                + f"  ({uptime()})"
            )
    return {name: {s: statistics.median(v) for s, v in row.items() if v} for name, row in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--peers", action="store_true", help="also time BuildKit and Buildah when available")
    parser.add_argument("--lab", type=Path, default=Path("/tmp/lamina-bench"))
    parser.add_argument("--user", help="also time lamina rootless as this user (run as root)")
    args = parser.parse_args()
    lab = Lab(args.lab)
    lab.prepare()
    rootless = bool(args.user) and os.geteuid() == 0
    tools: list[object] = [Lamina(lab, plain=rootless)]
    if args.user:
        tools.append(Lamina(lab, args.user))
    if args.peers:
        tools += [tool for tool in (BuildKit(lab), Buildah(lab)) if tool.available()]
    workloads = [w for w in args.workloads.split(",") if w]
    results: dict[tuple[str, str], dict[str, float]] = {}
    for workload in workloads:
        medians = measure(tools, lab, workload, args.rounds, lambda line: print(line, file=sys.stderr))
        for name, row in medians.items():
            results[name, workload] = row
    names = [tool.name for tool in tools]  # type: ignore[attr-defined]
    print(f"median wall seconds over {args.rounds} round(s); ratio = lamina / peer (< 1: lamina faster)")
    header = f"| {'workload':11} | {'tool':9} | " + " | ".join(f"{s:>7}" for s in SCENARIOS) + " |"
    print(header)
    print("|" + "|".join("-" * (len(part) + 0) for part in header.split("|")[1:-1]) + "|")
    for workload in workloads:
        for name in names:
            row = results[name, workload]
            cells = " | ".join(f"{row[s]:7.2f}" for s in SCENARIOS)
            print(f"| {workload:11} | {name:9} | {cells} |")
            if name != "lamina":
                # rootless: rootless / root; a peer: lamina / peer
                mine, theirs = (row, results["lamina", workload]) if name == "rootless" else (
                    results["lamina", workload], row)  # fmt: skip
                ratios = " | ".join(f"{mine[s] / theirs[s]:6.2f}x" for s in SCENARIOS)
                print(f"| {workload:11} | {'vs root' if name == 'rootless' else 'ratio':9} | {ratios} |")
    for workload in workloads:
        peak = results["lamina", workload].get("peak MB")
        if peak is not None:
            print(f"lamina {workload}: cold build peak RSS {peak:.0f} MB (/usr/bin/time -v, largest process)")


if __name__ == "__main__":
    main()
