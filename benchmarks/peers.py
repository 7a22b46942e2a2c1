"""What bench_build.py and bench_real.py share: timing a command, the machine's load, and the
peer builders they time lamina against.

- `run(args, env, peak=False)`: a command's wall seconds, its output and (peak=True, by
  `/usr/bin/time -v`) its largest process's resident set, as a `Timed`.
- `Dockerd(root)`: BuildKit (docker 20.10's, `DOCKER_BUILDKIT=1 docker build`) in a dockerd of
  the bench's own, its data root under `root`, started on first use and stopped when the
  bench exits. A cold build prunes that daemon's whole build cache (`docker builder prune
  -af`) and it alone: the machine's dockerd, its images and its shared BuildKit cache are
  never touched.
- `BuildKitPeer(lab_root)`: the base of a bench's BuildKit tool: `docker build` on its Dockerd.
- `BuildahStore(root)`: rootful Buildah (overlay) with its store under `root`, emptied for a
  cold build and given the base image again.
- `as_user(user, env)`: the command prefix that runs as `user` (runuser) in a plain
  environment; lamina as root goes through it too when a bench also runs it rootless, so
  that rootless / root compares lamina and not runuser (~2-4 ms a command).
- `settle(ctx)`: after a cache was emptied and before a cold build, the kernel's caches
  written back and dropped (as root), the context read back in; then each bench starts the
  tool once (`start()`), so that neither tool pays the disk the other does not.

Why settle: on ext4 without a journal (this VM's root), a file created within 60-360 s of a
mass deletion pays for it: ext4 skips every recently freed inode whose inode-table block is
still cached (`recently_deleted()` in its inode allocator). A 100,000-file cold build right
after a cache of that size was emptied took 24-35 s where it otherwise takes 11-12 s, and
every bench empties one tool's cache just before the next tool's cold build.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

DOCKER = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
_START_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class Timed:
    """One command's wall seconds, its stdout+stderr, and (with peak=True) its peak RSS in MB."""

    seconds: float
    output: str
    peak_mb: float | None = None


def run(
    args: Sequence[str], env: dict[str, str] | None = None, *, peak: bool = False, check: bool = True
) -> Timed:
    """Run `args` and time it; a failure (with `check`) ends the bench with its output's tail."""
    argv = ["/usr/bin/time", "-v", *args] if peak else list(args)
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    text = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{text[-3000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr) if peak else None
    return Timed(seconds, text, int(found.group(1)) / 1024 if found else None)


def as_user(user: str, env: dict[str, str]) -> list[str]:
    """`runuser -u USER -- env -i HOME=.. USER=.. PATH=.. NAME=VALUE..` (root only)."""
    import pwd

    entry = pwd.getpwnam(user)
    return [
        "runuser", "-u", user, "--", "env", "-i", f"HOME={entry.pw_dir}", f"USER={user}",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        *(f"{name}={value}" for name, value in env.items()),
    ]  # fmt: skip


def settle(ctx: Path) -> None:
    """Write back and drop the kernel's caches (root only: the freed inodes are then no longer
    skipped one by one), then read every file of `ctx` back into the page cache."""
    if os.geteuid() == 0:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for top, _, files in os.walk(ctx):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(top, name), "rb") as f:
                f.read()


def uptime() -> str:
    """The load averages, to print beside a number taken on a shared machine."""
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


class Dockerd:
    """A dockerd of this bench run's own (no bridge, no iptables, as tests/support/dockerd.sh):
    its images and build cache live under `root` and nothing else sees them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.cli = [DOCKER, "-H", self.host]
        self._proc: subprocess.Popen[bytes] | None = None

    def available(self) -> bool:
        """Whether docker and dockerd are installed and we are root; starts the daemon."""
        if not (Path(DOCKER).exists() and Path(DOCKERD).exists() and os.geteuid() == 0):
            return False
        return self._started()

    def reset(self, tags: Sequence[str], base: str, base_archive: Path) -> None:
        """A cold start on this daemon: our tags and its whole build cache gone, `base` loaded."""
        for tag in tags:
            run([*self.cli, "rmi", "-f", tag], check=False)
        run([*self.cli, "builder", "prune", "-af"])
        if subprocess.run([*self.cli, "image", "inspect", base], capture_output=True).returncode:
            run([*self.cli, "load", "-i", str(base_archive)])

    def _started(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 -- the daemon's, for its life
        self._proc = subprocess.Popen(
            [
                DOCKERD, "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
                "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "dockerd.pid"), "--host", self.host,
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline and self._proc.poll() is None:
            if subprocess.run([*self.cli, "info"], capture_output=True).returncode == 0:
                return True
            time.sleep(0.5)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the daemon we started (by its process, never by name)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class BuildKitPeer:
    """The BuildKit a bench times: `docker build` (DOCKER_BUILDKIT=1) on its own `Dockerd`,
    whose data root is `lab_root`/dockerd. A bench's subclass adds prune, build and export."""

    name = "buildkit"

    def __init__(self, lab_root: Path) -> None:
        self.docker = Dockerd(lab_root / "dockerd")  # its cache is the bench's alone to prune
        self.env = {**os.environ, "DOCKER_BUILDKIT": "1"}

    def available(self) -> bool:
        return self.docker.available()

    def start(self) -> None:
        """The client read back in after the caches were dropped (`settle`)."""
        run([*self.docker.cli, "images"])


class BuildahStore:
    """Rootful Buildah (overlay, chroot isolation) with its storage under `root`."""

    def __init__(self, root: Path) -> None:
        self.cmd = [
            "buildah", "--root", str(root / "root"), "--runroot", str(root / "run"),
            "--storage-driver", "overlay",
        ]  # fmt: skip

    def available(self) -> bool:
        return shutil.which("buildah") is not None and os.geteuid() == 0

    def start(self) -> None:
        run([*self.cmd, "images"])

    def reset(self, base_archive: Path) -> None:
        """A cold start: every container and image of this store gone, the base pulled again."""
        run([*self.cmd, "rm", "-a"], check=False)
        run([*self.cmd, "rmi", "-a", "-f"], check=False)
        run([*self.cmd, "pull", "-q", f"oci-archive:{base_archive}"])
