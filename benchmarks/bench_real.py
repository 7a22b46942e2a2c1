"""The real workload: gcc from apt-get on Debian bookworm minbase, a C program, the binary alone shipped.

    .venv/bin/python benchmarks/bench_real.py [--rounds 1] [--lab /tmp/lamina-real]
                                              [--user lamina-sb-sub] [--no-peers] [--profile]

Run as root (debootstrap, chroot, BuildKit, rootful Buildah). What it sets up,
once, and keeps in `--lab` for the next run:

- a `debootstrap --variant=minbase` root filesystem of this host's suite from
  the package mirror its apt uses (tests/support/minbase.py, cached in /tmp),
  made into an image `bench/minbase:bookworm` by `lamina build` (`ADD` of the
  tar onto scratch), written as an OCI archive and a docker-archive so that
  every tool starts from the same bytes;
- gcc, libc6-dev and what they depend on, downloaded once with apt-get
  inside that root filesystem, as a flat apt repository (`debs/`, indexed
  with dpkg-scanpackages) in the build context: the build's `apt-get
  update && apt-get install` reads it through a bind mount, so the step
  times the builder (apt, dpkg, the filesystem), not the network;
- a context with a small C program (src/*.c) and the Dockerfile below.

The build: stage `build` FROM the minbase image installs gcc with apt-get,
copies src/ and compiles a static binary; the final stage is `scratch` with
only that binary. Scenarios, as benchmarks/bench_build.py's:

    cold    caches pruned, the base image loaded and unpacked (as `docker load`
            leaves it; lamina's unpacking is the `unpack` column)
    noop    the same build again
    mod     one line appended to src/util.c (COPY and the compile re-run)
    export  the built image written from the tool's store to an OCI archive
            (`lamina save`, `skopeo copy docker-daemon:`, `buildah push`); the
            median of EXPORT_RUNS runs in each round, the cell being ~0.05 s
    build -o  lamina only: the cached build again with `-o type=oci` (one
            command: the no-op check, then the archive)

and, from the cold build's plain progress, the seconds of the apt-get step
(`apt`) and of every step, so the table says where the time goes (the row
`chroot floor` is the same apt-get in a plain chroot of the base on the same
disk, once a round: what dpkg costs with no builder around it), and the row
`python floor` gives export's: the interpreter, started as lamina root's is,
importing every module but lamina's own that its `save` loads (the stdlib's,
click's, a codec library's if used), the median of EXPORT_RUNS runs a round:
what a save in Python costs with no lamina code in it); `peak MB` is the
cold build's maximum resident set size by `/usr/bin/time -v` (the largest
process of the build, the sandboxed apt/dpkg/gcc included).

Tools, taking turns round by round: lamina as root, lamina rootless (as
`--user`, who needs subordinate ids in /etc/subuid: apt-get changes owners;
both through runuser with a plain environment, peers.as_user, so that
rootless / root is lamina's ratio and not runuser's),
BuildKit (docker 20.10's, `DOCKER_BUILDKIT=1 docker build --network=none`, in
a dockerd the bench starts for the run, data root LAB/dockerd) and rootful
Buildah (`buildah bud --layers`, overlay, chroot isolation, its store in LAB)
where installed. Caches pruned means the bench's own: the machine's dockerd,
its images and its shared BuildKit cache are never touched. Every number is
wall seconds of the whole client command; `uptime` is printed beside each
round, since the machine this ran on was shared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

from peers import BuildahStore, BuildKitPeer, Timed, as_user, run, settle, uptime  # noqa: E402

BASE = "bench/minbase:bookworm"
SCENARIOS = ("cold", "noop", "mod", "export")
PACKAGES = ("gcc", "libc6-dev")
MOD_FILE = "src/util.c"
APT_MARK = "apt-get"
EXPORT_RUNS = 5

# The apt-get step, in the build and in the plain chroot that gives its floor.
APT_SCRIPT = (
    "apt-get -qq -o Dir::Etc::SourceList=/debs/local.list -o Dir::Etc::SourceParts=- update"
    " && apt-get -qq -o Dir::Etc::SourceList=/debs/local.list -o Dir::Etc::SourceParts=-"
    f" install -y --no-install-recommends {' '.join(PACKAGES)}"
    " && rm -rf /var/lib/apt/lists/*"
)
DOCKERFILE = f"""\
FROM {BASE} AS build
# The packages come from debs/, a flat repository in the context: the step times
# apt and dpkg in the builder, not the network.
RUN --mount=type=bind,source=debs,target=/debs {APT_SCRIPT}
WORKDIR /src
COPY src/ /src/
RUN mkdir -p /out && gcc -O2 -static -o /out/hello main.c util.c && strip /out/hello

FROM scratch
COPY --from=build /out/hello /hello
ENTRYPOINT ["/hello"]
"""

MAIN_C = """\
#include <stdio.h>
#include "util.h"

int main(int argc, char **argv) {
    printf("%s: %lu\\n", greeting(), checksum(argc > 1 ? argv[1] : "lamina"));
    return 0;
}
"""
UTIL_H = "const char *greeting(void);\nunsigned long checksum(const char *text);\n"
UTIL_C = """\
#include "util.h"

const char *greeting(void) { return "hello from a static binary"; }

unsigned long checksum(const char *text) {
    unsigned long sum = 5381;
    while (*text) sum = sum * 33 + (unsigned char)*text++;
    return sum;
}
"""


# Runs `lamina save ARGS` in-process, then prints the modules loaded that are not lamina's.
SAVE_MODULES = """\
import sys
from lamina.cli import main
sys.argv[0] = "lamina"
try:
    main()
except SystemExit as done:
    if done.code:
        raise
print("modules:", *sorted(m for m in sys.modules if m.partition(".")[0] not in ("lamina", "__main__")))
"""


class Lab:
    """The context, the base image archives and the apt repository, made once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ctx = root / "ctx"
        self.base_oci = root / "base" / "minbase-oci.tar"
        self.base_docker = root / "base" / "minbase-docker.tar"

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        from tests.support.minbase import minbase_tar, why_unavailable

        why = why_unavailable()
        if why is not None:
            raise SystemExit(f"no minbase root filesystem: {why}")
        rootfs = minbase_tar()
        if not self.base_docker.exists():
            self._make_base(rootfs)
        if not (self.ctx / "debs" / "Packages").exists():
            self._make_repo(rootfs)
        (self.ctx / "src").mkdir(parents=True, exist_ok=True)
        (self.ctx / "Dockerfile").write_text(DOCKERFILE)
        (self.ctx / "src" / "main.c").write_text(MAIN_C)
        (self.ctx / "src" / "util.h").write_text(UTIL_H)
        self.reset_context()

    def _make_base(self, rootfs: Path) -> None:
        """The minbase tar as an image, by lamina (root), to an OCI archive and a docker-archive."""
        work = self.root / "base"
        work.mkdir(exist_ok=True)
        shutil.copy(rootfs, work / "minbase.tar")
        (work / "Dockerfile").write_text('FROM scratch\nADD minbase.tar /\nCMD ["bash"]\n')
        env = {**os.environ, "LAMINA_CACHE": str(work / "cache"), "SOURCE_DATE_EPOCH": "0"}
        for kind, dest in (("oci", self.base_oci), ("docker", self.base_docker)):
            run(
                [sys.executable, "-m", "lamina", "build", "--progress", "quiet", "-t", BASE,
                 "-o", f"type={kind},dest={dest},name={BASE}", str(work)],
                env=env,
            )  # fmt: skip
        shutil.rmtree(work / "cache", ignore_errors=True)
        (work / "minbase.tar").unlink()

    def _make_repo(self, rootfs: Path) -> None:
        """gcc's .debs downloaded inside a minbase chroot (its apt, its mirror), indexed flat."""
        chroot = self.root / "chroot"
        shutil.rmtree(chroot, ignore_errors=True)
        chroot.mkdir()
        run(["tar", "-xf", str(rootfs), "-C", str(chroot)])  # owners and devices kept (root)
        shutil.copy("/etc/resolv.conf", chroot / "etc" / "resolv.conf")
        debs = self.ctx / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        (chroot / "debs").mkdir()
        apt = ["chroot", str(chroot), "apt-get", "-qq", "-o", "Dir::Cache::archives=/debs"]
        run([*apt, "update"])
        run([*apt, "install", "-y", "--download-only", "--no-install-recommends", *PACKAGES])
        debs.mkdir(parents=True)
        for deb in sorted((chroot / "debs").glob("*.deb")):
            shutil.copy(deb, debs / deb.name)
        shutil.rmtree(chroot)
        with open(debs / "Packages", "w") as out:
            subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=debs, stdout=out, check=True,
                           stderr=subprocess.DEVNULL)  # fmt: skip
        (debs / "local.list").write_text("deb [trusted=yes] file:/debs ./\n")

    def reset_context(self) -> None:
        (self.ctx / MOD_FILE).write_text(UTIL_C)

    def modify(self, round_no: int) -> None:
        with open(self.ctx / MOD_FILE, "a") as f:
            f.write(f"/* bench change {round_no} {time.time_ns()} */\n")

    def give_to(self, user: str) -> None:
        """The rootless tool's files: its cache and outputs in a directory it owns."""
        home = self.root / f"user-{user}"
        home.mkdir(exist_ok=True)
        entry = pwd.getpwnam(user)
        os.chown(home, entry.pw_uid, entry.pw_gid)


class Lamina:
    """lamina as root, or rootless as `user` (through runuser with a plain environment). With
    `plain`, root's lamina goes through the same runuser and plain environment (peers.as_user)."""

    def __init__(self, lab: Lab, user: str | None = None, plain: bool = False) -> None:
        self.lab = lab
        self.user = user
        self.name = "lamina-rootless" if user else "lamina-root"
        home = lab.root / (f"user-{user}" if user else "root")
        home.mkdir(exist_ok=True)
        self.home = home
        self.cache = home / "cache"
        self.env = {**os.environ, "LAMINA_CACHE": str(self.cache)}
        for name in ("SOURCE_DATE_EPOCH", "PYTHONDONTWRITEBYTECODE"):
            self.env.pop(name, None)
        self.python = [sys.executable]
        # As installed: bytecode compiled once (pip does); a rootless user cannot write
        # __pycache__ here and would compile every changed module on every run.
        run([sys.executable, "-m", "compileall", "-q", str(ROOT / "lamina")])
        plain_env = {"LAMINA_CACHE": str(self.cache), "PYTHONPATH": str(ROOT)}
        if user is not None:
            lab.give_to(user)
            self.python = [*as_user(user, plain_env), *self.python]
        elif plain:
            self.python = [*as_user("root", plain_env), *self.python]
        self.exe = [*self.python, "-m", "lamina"]
        self.profile_args: list[str] = []

    def available(self) -> bool:
        return True

    def prune(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)  # as root, the rootless cache too
        run([*self.exe, "load", str(self.lab.base_oci)], env=self.env)
        # The base unpacked, as `docker load` leaves it for BuildKit: its own column.
        self.unpack = run([*self.exe, "run", "--network", "none", BASE, "true"], env=self.env).seconds

    def start(self) -> None:
        run([*self.exe, "images"], env=self.env)

    def build(self, extra: Sequence[str] = (), peak: bool = False) -> Timed:
        return run(
            [*self.exe, "build", "--progress", "plain", "--network", "none", "-t", "bench/real:lamina",
             *extra, str(self.lab.ctx)],
            env=self.env, peak=peak,
        )  # fmt: skip

    def save_args(self) -> list[str]:
        return ["save", "bench/real:lamina", "-o", str(self.home / "real-oci.tar")]

    def export(self) -> Timed:
        return run([*self.exe, *self.save_args()], env=self.env)

    def floor(self) -> float:
        """Export's floor: this interpreter, started the same way, importing every module but
        lamina's own that `lamina save` loads (listed by running the save); median of EXPORT_RUNS."""
        output = run([*self.python, "-c", SAVE_MODULES, *self.save_args()], env=self.env).output
        listed = next(line.split()[1:] for line in output.splitlines() if line.startswith("modules: "))
        imports = [*self.python, "-c", "import sys\nfor name in sys.argv[1:]: __import__(name)", *listed]
        return statistics.median(run(imports, env=self.env).seconds for _ in range(EXPORT_RUNS))

    def build_output(self) -> Timed:
        return self.build(["-o", f"type=oci,dest={self.home / 'real-build-oci.tar'}"])

    @staticmethod
    def steps(output: str) -> dict[str, float]:
        """Step label -> seconds, from plain progress (`[build 2/5] RUN ...  DONE 5.40s`)."""
        found: dict[str, float] = {}
        for line in output.splitlines():
            hit = re.match(r"\[(\S+) (\d+)/(\d+)\] (.*?)  DONE ([\d.]+)s$", line)
            if hit:
                found[f"{hit.group(1)} {hit.group(2)}: {hit.group(4)[:40]}"] = float(hit.group(5))
        return found


class BuildKit(BuildKitPeer):
    def __init__(self, lab: Lab) -> None:
        super().__init__(lab.root)
        self.lab = lab

    def prune(self) -> None:
        self.docker.reset(["bench/real:bk"], BASE, self.lab.base_docker)

    def build(self, peak: bool = False) -> Timed:
        del peak  # the work happens in dockerd, not under the client
        return run(
            [*self.docker.cli, "build", "--network=none", "--progress=plain", "-t", "bench/real:bk",
             str(self.lab.ctx)],
            env=self.env,
        )  # fmt: skip

    def export(self) -> Timed:
        out = self.lab.root / "bk-real-oci.tar"
        out.unlink(missing_ok=True)
        return run(
            ["skopeo", "copy", "-q", "--src-daemon-host", self.docker.host, "docker-daemon:bench/real:bk",
             f"oci-archive:{out}:bench/real:bk"]
        )  # fmt: skip

    @staticmethod
    def steps(output: str) -> dict[str, float]:
        """Step label -> seconds, from BuildKit's plain progress (`#7 [build 2/5] RUN`, `#7 DONE 5.4s`)."""
        names: dict[str, str] = {}
        found: dict[str, float] = {}
        for line in output.splitlines():
            hit = re.match(r"#(\d+) \[(\S+) (\d+)/(\d+)\] (.*)$", line)
            if hit:
                names[hit.group(1)] = f"{hit.group(2)} {hit.group(3)}: {hit.group(5)[:40]}"
                continue
            done = re.match(r"#(\d+) DONE ([\d.]+)s$", line)
            if done and done.group(1) in names:
                found[names[done.group(1)]] = float(done.group(2))
        return found


class Buildah:
    name = "buildah"

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.store = BuildahStore(lab.root / "buildah")
        self.cmd = self.store.cmd

    def available(self) -> bool:
        return self.store.available()

    def prune(self) -> None:
        self.store.reset(self.lab.base_oci)

    def start(self) -> None:
        self.store.start()

    def build(self, peak: bool = False) -> Timed:
        del peak
        return run(
            [*self.cmd, "bud", "--isolation", "chroot", "--layers",
             "-t", "localhost/bench/real:bah", str(self.lab.ctx)],
        )  # fmt: skip

    def export(self) -> Timed:
        out = self.lab.root / "bah-real-oci.tar"
        out.unlink(missing_ok=True)
        return run([*self.cmd, "push", "-q", "localhost/bench/real:bah", f"oci-archive:{out}:bench/real:bah"])

    @staticmethod
    def steps(output: str) -> dict[str, float]:
        return {}  # buildah bud prints no step times


def apt_seconds(steps: dict[str, float]) -> float | None:
    return next((seconds for label, seconds in steps.items() if "RUN --mount" in label), None)


def chroot_floor(lab: Lab) -> float:
    """The apt-get step with no builder around it: the same command in a plain chroot of the
    base's root filesystem on the same disk (what dpkg itself costs here)."""
    from tests.support.minbase import minbase_tar

    root = lab.root / "floor"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    try:
        run(["tar", "-xf", str(minbase_tar()), "-C", str(root)])
        shutil.copytree(lab.ctx / "debs", root / "debs")
        return run(["chroot", str(root), "sh", "-c", APT_SCRIPT]).seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_round(tool: object, lab: Lab, round_no: int, log: list[str]) -> dict[str, float]:
    """One round of the four scenarios from a pruned cache; the cold build's steps logged."""
    lab.reset_context()
    tool.prune()  # type: ignore[attr-defined]
    settle(lab.ctx)  # see peers.settle
    tool.start()  # type: ignore[attr-defined]
    cold = tool.build(peak=True)  # type: ignore[attr-defined]
    steps = tool.steps(cold.output)  # type: ignore[attr-defined]
    times = {"cold": cold.seconds, "noop": tool.build().seconds}  # type: ignore[attr-defined]
    lab.modify(round_no)
    times["mod"] = tool.build().seconds  # type: ignore[attr-defined]
    times["export"] = statistics.median(tool.export().seconds for _ in range(EXPORT_RUNS))  # type: ignore[attr-defined]
    if isinstance(tool, Lamina):
        times["build -o"] = tool.build_output().seconds
    lab.reset_context()
    if hasattr(tool, "unpack"):
        times["unpack"] = tool.unpack
    apt = apt_seconds(steps)
    if apt is not None:
        times["apt"] = apt
    if cold.peak_mb is not None:
        times["peak MB"] = cold.peak_mb
    log.extend(f"    {tool.name:16} cold step {seconds:6.2f}s  {label}" for label, seconds in steps.items())  # type: ignore[attr-defined]
    return times


def profile_lamina(lab: Lab) -> None:
    """cProfile of lamina's (root) cold and one-file-change builds: the top functions by own time."""
    tool = Lamina(lab)
    tool.prune()
    lab.reset_context()
    for scenario in ("cold", "mod"):
        if scenario == "mod":
            lab.modify(99)
        stats = lab.root / f"profile-{scenario}.pstats"
        tool.exe = [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "lamina"]
        print(f"profile {scenario}: {tool.build().seconds:.2f}s wall, {uptime()}", file=sys.stderr)
        import pstats

        pstats.Stats(str(stats)).sort_stats("cumulative").print_stats(25)
    lab.reset_context()


def _cell(seconds: float) -> str:
    """Two decimals; three below 0.1 s, where the export cells are."""
    return f"{seconds:.3f}" if seconds < 0.1 else f"{seconds:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--lab", type=Path, default=Path("/tmp/lamina-real"))
    parser.add_argument("--user", default="lamina-sb-sub", help="the rootless user ('' for none)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument(
        "--tools", default="", help="only these (lamina-root,lamina-rootless,buildkit,buildah)"
    )
    parser.add_argument("--profile", action="store_true", help="print lamina's cold/mod profiles and stop")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: debootstrap, chroot and the peers need it")
    lab = Lab(args.lab)
    lab.prepare()
    if args.profile:
        profile_lamina(lab)
        return
    tools: list[object] = [Lamina(lab, plain=bool(args.user))]
    if args.user:
        with contextlib.suppress(KeyError):
            tools.append(Lamina(lab, pwd.getpwnam(args.user).pw_name))
    if not args.no_peers:
        tools += [tool for tool in (BuildKit(lab), Buildah(lab)) if tool.available()]
    if args.tools:
        tools = [tool for tool in tools if tool.name in args.tools.split(",")]  # type: ignore[attr-defined]
    columns = (*SCENARIOS, "build -o", "apt", "peak MB", "unpack")
    times: dict[str, dict[str, list[float]]] = {t.name: {c: [] for c in columns} for t in tools}  # type: ignore[attr-defined]
    times["chroot floor"] = {c: [] for c in columns}
    floor_from = next((tool for tool in tools if isinstance(tool, Lamina)), None)  # root's, if timed
    if floor_from is not None:
        times["python floor"] = {c: [] for c in columns}
    for round_no in range(args.rounds):
        floor = chroot_floor(lab)
        times["chroot floor"]["apt"].append(floor)
        print(f"  {'chroot floor':16} round {round_no + 1}: apt={floor:.2f}  ({uptime()})", file=sys.stderr)
        for tool in tools:
            log: list[str] = []
            result = measure_round(tool, lab, round_no, log)
            for column, value in result.items():
                times[tool.name][column].append(value)  # type: ignore[attr-defined]
            cells = " ".join(f"{c}={_cell(result[c])}" for c in columns if c in result)
            print(f"  {tool.name:16} round {round_no + 1}: {cells}  ({uptime()})", file=sys.stderr)  # type: ignore[attr-defined]
            print("\n".join(log), file=sys.stderr)
        if floor_from is not None:  # after its build, which made the image the save reads
            export_floor = floor_from.floor()
            times["python floor"]["export"].append(export_floor)
            print(f"  {'python floor':16} round {round_no + 1}: export={export_floor:.3f}", file=sys.stderr)
    print(
        f"median wall seconds over {args.rounds} round(s); apt = the apt-get step; peak MB = /usr/bin/time -v"
    )
    print("| tool | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    medians = {name: {c: statistics.median(v) for c, v in row.items() if v} for name, row in times.items()}
    for name, row in medians.items():
        print(f"| {name} | " + " | ".join(_cell(row[c]) if c in row else "" for c in columns) + " |")
    if "buildkit" in medians:
        peer = medians["buildkit"]
        for name in (n for n in medians if n.startswith("lamina") or n == "python floor"):
            row = medians[name]
            ratios = [f"{row[c] / peer[c]:.2f}x" if c in row and peer.get(c) else "" for c in columns]
            print(f"| {name} / buildkit | " + " | ".join(ratios) + " |")
    if "lamina-root" in medians and "lamina-rootless" in medians:
        root, rootless = medians["lamina-root"], medians["lamina-rootless"]
        ratios = [f"{rootless[c] / root[c]:.2f}x" if c in rootless and root.get(c) else "" for c in columns]
        print("| rootless / root | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
