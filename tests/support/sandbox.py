"""Helpers for the sandbox tests: a busybox root with users, and the host's user tools.

- `make_rootfs(root)`: the busybox base plus a user `app` (1000) in groups
  app and extra (2000), root in wheel, and /data (tests/test_sandbox.py,
  tests/test_snapshot.py).
- `userns_available()`: whether this process can make a user namespace.
- `system_tool(name)`, `ensure_user(name)`: useradd/runuser from /usr/sbin
  too, and a system user made once (tests/test_unprivileged.py and the
  isolation tests).
- `tun_open_to_users()`: /dev/net/tun mode 0666 while inside, given back by the
  last of the runs that opened it at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
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


TUN = Path("/dev/net/tun")
_TUN_STATE = Path("/run/lamina-test-tun.json")  # {"mode": the mode before, "pids": the runs inside}


@contextlib.contextmanager
def tun_open_to_users() -> Iterator[None]:
    """/dev/net/tun as Debian's udev leaves it (0666) while inside, for slirp4netns run by a
    user (as root). Runs at once (xdist, another session) share it: the first one in saves
    the mode, the last one out gives it back, so none closes it under another."""
    if not TUN.exists():
        yield
        return
    _tun_users(enter=True)
    try:
        yield
    finally:
        _tun_users(enter=False)


def _tun_users(*, enter: bool) -> None:
    import fcntl

    with open(_TUN_STATE.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(_TUN_STATE.read_text()) if _TUN_STATE.exists() else {}
        pids = [pid for pid in state.get("pids", []) if pid_alive(pid)]  # a killed run's go too
        state.setdefault("mode", TUN.stat().st_mode & 0o777)  # a killed run's saved mode stands
        if enter:
            pids.append(os.getpid())
            TUN.chmod(0o666)
        elif os.getpid() in pids:
            pids.remove(os.getpid())
        if pids:
            _TUN_STATE.write_text(json.dumps({"mode": state["mode"], "pids": pids}))
        else:
            TUN.chmod(state["mode"])
            _TUN_STATE.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
