"""lamina run as a plain user where no user namespace can be made (proot isolation).

Run as root (CI is root): the system user lamina-sb-nosub (made once) runs
`python -m lamina` under tests/support/no_namespaces.py, which denies
unshare as docker's default seccomp profile does, so lamina records owners,
device nodes and privileged xattrs in `user.lamina.*` xattrs
(lamina.oci.recorded).

    with plain_user("lamina-x-") as user:   # user.base: a 0755 scratch dir
        ...write files under user.base...
        user.give()                          # chown it all to the user
        done = user.lamina("build", ...)     # a CompletedProcess
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

PLAIN_USER = "lamina-sb-nosub"
ROOT = Path(__file__).resolve().parent.parent.parent


def plain_user_missing() -> str:
    """Why these tests cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return f"runs lamina as {PLAIN_USER} with no user namespace: needs root to become it"
    for tool in ("runuser", "proot"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"{tool} is not installed"
    return ""


@dataclasses.dataclass
class PlainUser:
    base: Path
    uid: int
    gid: int

    def give(self) -> None:
        """Make everything under `base` the user's."""
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(self.base)], check=True)

    def lamina(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`lamina ARGS` as the user, namespaces denied, its cache in base/cache."""
        import pytest

        deny = [sys.executable, str(ROOT / "tests/support/no_namespaces.py"), "docker", "--"]
        env = {**os.environ, "LAMINA_CACHE": str(self.base / "cache")}
        env.pop("LAMINA_ISOLATION", None)
        env.pop("SOURCE_DATE_EPOCH", None)
        command = ["runuser", "-u", PLAIN_USER, "--", *deny, sys.executable, "-m", "lamina", *args]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0 and "No module named" in done.stderr:
            pytest.skip(f"{PLAIN_USER} cannot run {sys.executable} with lamina importable")
        return done


@contextmanager
def plain_user(prefix: str) -> Iterator[PlainUser]:
    """A scratch dir any user can enter, and the plain user to run lamina as; removed after."""
    import pwd

    from tests.support.sandbox import ensure_user

    ensure_user(PLAIN_USER)
    entry = pwd.getpwnam(PLAIN_USER)
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        base.chmod(0o755)
        yield PlainUser(base, entry.pw_uid, entry.pw_gid)
    finally:
        shutil.rmtree(base, ignore_errors=True)
