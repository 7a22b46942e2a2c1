"""Helpers for the sandbox tests: a busybox root with users, and the host's user tools.

- `make_rootfs(root)`: the busybox base plus a user `app` (1000) in groups
  app and extra (2000), root in wheel, and /data (tests/test_sandbox.py,
  tests/test_snapshot.py).
- `userns_available()`: whether this process can make a user namespace.
- `system_tool(name)`, `ensure_user(name)`: useradd/runuser from /usr/sbin
  too, and a system user made once (tests/test_unprivileged.py and the
  isolation tests).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.busybox import make_busybox_rootfs

PASSWD_EXTRA = "app:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP_EXTRA = "app:x:1000:\nextra:x:2000:app\nwheel:x:10:root\n"


def userns_available() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def make_rootfs(root: Path) -> Path:
    """The busybox base, plus a user `app` (1000) in groups app and extra (2000), root in wheel, /data."""
    make_busybox_rootfs(root)
    with open(root / "etc/passwd", "a") as f:
        f.write(PASSWD_EXTRA)
    with open(root / "etc/group", "a") as f:
        f.write(GROUP_EXTRA)
    (root / "data/sub").mkdir(parents=True)
    (root / "data/a").write_text("a\n")
    (root / "data/sub/b").write_text("b\n")
    (root / "etc/marker").write_text("from the image\n")
    return root


def system_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path is not None, name
    return path


def ensure_user(name: str) -> None:
    if subprocess.run(["id", "-u", name], capture_output=True).returncode == 0:
        return
    # A system user: useradd gives it no subordinate range of its own.
    subprocess.run(
        [system_tool("useradd"), "--system", "--no-create-home", "--shell", "/bin/sh", name], check=True
    )
