"""What bench_build.py and bench_real.py share: timing a command, the machine's load, and the
peer builders they time lamina against.

- `run(args, env, peak=False)`: a command's wall seconds, its output and (peak=True, by
  `/usr/bin/time -v`) its largest process's resident set, as a `Timed`.
- `BuildahStore(root)`: rootful Buildah (overlay) with its store under `root`, emptied for a
  cold build and given the base image again.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

DOCKER = "/usr/bin/docker"


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


def uptime() -> str:
    """The load averages, to print beside a number taken on a shared machine."""
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


class BuildahStore:
    """Rootful Buildah (overlay, chroot isolation) with its storage under `root`."""

    def __init__(self, root: Path) -> None:
        self.cmd = [
            "buildah", "--root", str(root / "root"), "--runroot", str(root / "run"),
            "--storage-driver", "overlay",
        ]  # fmt: skip

    def available(self) -> bool:
        return shutil.which("buildah") is not None and os.geteuid() == 0

    def reset(self, base_archive: Path) -> None:
        """A cold start: every container and image of this store gone, the base pulled again."""
        run([*self.cmd, "rm", "-a"], check=False)
        run([*self.cmd, "rmi", "-a", "-f"], check=False)
        run([*self.cmd, "pull", "-q", f"oci-archive:{base_archive}"])
