"""lamina run as another, unprivileged user, from a test running as root (CI is root).

- `plain_user(prefix)`: the system user lamina-sb-nosub (made once) runs
  `python -m lamina` under tests/support/no_namespaces.py, which denies
  unshare as docker's default seccomp profile does: proot isolation, where
  lamina records owners, device nodes and privileged xattrs in
  `user.lamina.*` xattrs (lamina.oci.recorded).
- `plain_user(prefix, ranged=True)`: the system user lamina-sb-sub, given a
  subordinate id range, runs lamina with user namespaces: a rootless build
  as a developer's laptop runs one.

    with plain_user("lamina-x-") as user:   # user.base: a 0755 scratch dir
        ...write files under user.base...
        user.give()                          # chown it all to the user
        done = user.lamina("build", ...)     # a CompletedProcess

- `user_scratch(name, prefix)`: a directory for one run as `name` holding the
  user's TMPDIR (and a pytest's --basetemp), removed as root after: a run as
  a user with subordinate ids leaves trees those ids own, which neither the
  user nor pytest's rotation of /tmp/pytest-of-USER can remove.
- `root_scratch(prefix)`: the directory under it, which also removes those a
  killed run left.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PLAIN_USER = "lamina-sb-nosub"  # no subordinate ids: a single-id map, or none at all
RANGED_USER = "lamina-sb-sub"  # a subordinate id range (tests/test_unprivileged.py uses both)
RANGE_SIZE = 65536
ROOT = Path(__file__).resolve().parent.parent.parent


def plain_user_missing(ranged: bool = False) -> str:
    """Why these tests cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "runs lamina as another user: needs root to become it"
    for tool in ("runuser", "newuidmap", "newgidmap") if ranged else ("runuser", "proot"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"{tool} is not installed"
    return ""


@dataclasses.dataclass
class PlainUser:
    name: str
    base: Path
    uid: int
    gid: int
    deny_namespaces: bool

    def give(self) -> None:
        """Make everything under `base` the user's."""
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(self.base)], check=True)

    def lamina(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`lamina ARGS` as the user, its cache in base/cache."""
        import pytest

        deny = [sys.executable, str(ROOT / "tests/support/no_namespaces.py"), "docker", "--"]
        full = {**os.environ, "LAMINA_CACHE": str(self.base / "cache"), "HOME": str(self.base)}
        full["TMPDIR"] = str(self.base / "tmp")  # lamina's own scratch goes with base
        full.pop("LAMINA_ISOLATION", None)
        full.pop("SOURCE_DATE_EPOCH", None)
        full.pop("XDG_RUNTIME_DIR", None)
        full.update(env or {})
        command = ["runuser", "-u", self.name, "--", *(deny if self.deny_namespaces else [])]
        command += [sys.executable, "-m", "lamina", *args]
        done = subprocess.run(command, capture_output=True, text=True, env=full, cwd=ROOT)
        if done.returncode != 0 and "No module named" in done.stderr:
            pytest.skip(f"{self.name} cannot run {sys.executable} with lamina importable")
        return done


@contextmanager
def plain_user(prefix: str, ranged: bool = False) -> Iterator[PlainUser]:
    """A scratch dir any user can enter, and the user to run lamina as; removed after."""
    import pwd

    from tests.support.sandbox import ensure_user

    name = RANGED_USER if ranged else PLAIN_USER
    ensure_user(name)
    if ranged:
        set_range(name, True)
    entry = pwd.getpwnam(name)
    with user_scratch(name, prefix) as base:
        yield PlainUser(name, base, entry.pw_uid, entry.pw_gid, deny_namespaces=not ranged)


@contextmanager
def user_scratch(name: str, prefix: str) -> Iterator[Path]:
    """A 0755 directory of root's with `tmp` (name's own, 0700) in it; removed as root after.

    Give the run TMPDIR=<it>/tmp (and pytest --basetemp under it): whatever it leaves,
    owned by the user or its subordinate ids, goes with the directory.
    """
    import pwd

    entry = pwd.getpwnam(name)
    with root_scratch(prefix) as base:
        (base / "tmp").mkdir(mode=0o700)
        os.chown(base / "tmp", entry.pw_uid, entry.pw_gid)
        yield base


@contextmanager
def root_scratch(prefix: str) -> Iterator[Path]:
    """A 0755 directory of root's in the temp dir, removed after (as root: files of any owner).

    Named PREFIX<pid>-XXXX: first, those of the same prefix whose pid is gone (a run killed
    before it could remove them, with its subordinate ids' trees) are removed too.
    """
    from tests.support.sandbox import pid_alive

    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        maker = stale.name[len(prefix) :].split("-", 1)[0]
        if maker.isdigit() and not pid_alive(int(maker)):
            shutil.rmtree(stale, ignore_errors=True)
    base = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        # Not ignoring errors: a tree that stays is a bug.
        shutil.rmtree(base)


def set_range(name: str, wanted: bool) -> None:
    """Give `name` one range in /etc/subuid and /etc/subgid (wanted), or take away the one it has."""
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        lines = path.read_text().splitlines() if path.exists() else []
        mine = [line for line in lines if line.split(":")[0] == name]
        others = [line for line in lines if line.split(":")[0] != name]
        if bool(mine) == wanted:
            continue
        if wanted:
            ends = [int(p[1]) + int(p[2]) for p in (line.split(":") for line in others) if len(p) == 3]
            others.append(f"{name}:{max([100000, *ends])}:{RANGE_SIZE}")
        path.write_text("".join(line + "\n" for line in others))
