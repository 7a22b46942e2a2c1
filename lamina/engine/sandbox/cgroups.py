"""A RUN's own cgroup: --cgroup-parent and the memory= limit, as BuildKit's runc executor.

BuildKit puts each RUN in the cgroup `/<parent>/buildkit/<id>` of every
hierarchy (executor/oci/spec.go) with its resources (memory: memory.max on
cgroup v2, memory.limit_in_bytes on v1) and a cgroup namespace rooted there,
so the step sees `/` in /proc/self/cgroup and its own limits under
/sys/fs/cgroup. Here the caller makes that cgroup and moves the helper in
before it lets it go on; the helper unshares the cgroup namespace.

Root does it on cgroup v1 and v2. Rootless, only cgroup v2 can be delegated
(a subtree the user may write, as systemd gives with Delegate=yes): the
cgroup is made below the caller's own. Rootless on cgroup v1 is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import time
from collections.abc import Iterator

from lamina.errors import SandboxError

_ROOT = "/sys/fs/cgroup"
_V1 = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio", "blkio")
_CONTROLLERS = frozenset((*_V1, "perf_event", "hugetlb", "pids", "rdma", "misc"))


@dataclasses.dataclass(frozen=True, slots=True)
class Hierarchy:
    mount: str  # where it is mounted (/sys/fs/cgroup/memory, /sys/fs/cgroup)
    version: int  # 1 or 2
    options: str  # v1: its controllers as mount options ("memory", "name=systemd")


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            tail = fields[fields.index("-") + 1 :]
            point = fields[4]
            if not (point == _ROOT or point.startswith(_ROOT + "/")):
                continue
            if tail[0] == "cgroup2":
                found.append(Hierarchy(point, 2, ""))
            elif tail[0] == "cgroup":
                # The super options name its controllers (or name=systemd), beside rw and the like.
                wanted = [o for o in tail[2].split(",") if o.startswith("name=") or o in _CONTROLLERS]
                found.append(Hierarchy(point, 1, ",".join(wanted)))
    return found


def _own(version: int) -> str:
    """The caller's cgroup in the v2 hierarchy (`0::/path`)."""
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            number, _, path = line.rstrip("\n").split(":", 2)
            if version == 2 and number == "0":
                return path
    return "/"


def why_not(rootless: bool) -> str | None:
    """Why a RUN cannot get a cgroup of its own here, or None."""
    found = hierarchies()
    if not found:
        return f"no cgroup hierarchy is mounted under {_ROOT}"
    if not rootless:
        closed = [h.mount for h in found if not os.access(h.mount, os.W_OK)]
        return (
            f"{closed[0]} is not writable (a read-only cgroup mount, as in a container)" if closed else None
        )
    if not any(h.version == 2 and h.mount == _ROOT for h in found):
        return (
            "rootless, a cgroup can only be delegated on cgroup v2 and this host's hierarchy is cgroup v1 "
            "(build as root, or on a cgroup v2 host with a delegated subtree)"
        )
    own = _ROOT + _own(2)
    if not os.access(own, os.W_OK):
        why = "not writable; systemd's Delegate=yes delegates it"
        return f"rootless, your cgroup {own} is not delegated to you ({why})"
    return None


@contextlib.contextmanager
def placed(pid: int, parent: str, memory: int, rootless: bool) -> Iterator[list[Hierarchy]]:
    """Move `pid` into `/<parent>/buildkit/<id>` of every hierarchy (below the caller's own
    cgroup when rootless), with `memory` bytes as its limit (0: none); removed afterwards.
    Yields the hierarchies, for the step's /sys/fs/cgroup."""
    why = why_not(rootless)
    if why:
        raise SandboxError(f"--cgroup-parent / memory=: {why}")
    found = [h for h in hierarchies() if not (rootless and h.version == 1)]
    name = os.path.join(parent.strip("/"), "buildkit", secrets.token_hex(12))
    if memory and not any(_has_memory(h) for h in found):
        raise SandboxError("memory=: no cgroup memory controller is available here")
    made: list[str] = []
    try:
        for h in found:
            base = h.mount + (_own(2) if rootless else "")
            path = os.path.join(base, name)
            try:
                _join(h, base, path, pid, memory, made)
            except OSError as err:
                raise SandboxError(f"cgroup {path}: {err.strerror or err}") from None
        yield found
    finally:
        for path in made:
            _remove(path)


def _has_memory(h: Hierarchy) -> bool:
    return "memory" in (h.options.split(",") if h.version == 1 else _controllers(h.mount))


def _join(h: Hierarchy, base: str, path: str, pid: int, memory: int, made: list[str]) -> None:
    """Make the step's cgroup `path` in `h` (appended to `made`), its limit set, `pid` in it."""
    if h.version == 2 and memory and _has_memory(h):
        _enable_memory(base, path)
    os.makedirs(path, exist_ok=True)
    made.append(path)
    if h.version == 1 and "cpuset" in h.options.split(","):
        _inherit_cpuset(base, path)
    if memory and _has_memory(h):
        _write(path, "memory.limit_in_bytes" if h.version == 1 else "memory.max", str(memory))
    _write(path, "cgroup.procs", str(pid))


def _controllers(mount: str) -> list[str]:
    try:
        with open(os.path.join(mount, "cgroup.controllers"), encoding="utf-8") as f:
            return f.read().split()
    except OSError:
        return []


def _enable_memory(base: str, leaf: str) -> None:
    """cgroup v2: the memory controller enabled in `base` and every cgroup below it down to
    `leaf`'s parent (a controller reaches a cgroup only through its parents' subtree_control)."""
    here = base
    parts = [p for p in os.path.relpath(os.path.dirname(leaf), base).split(os.sep) if p not in ("", ".")]
    for part in [None, *parts]:
        if part is not None:
            here = os.path.join(here, part)
            os.makedirs(here, exist_ok=True)
        with open(os.path.join(here, "cgroup.subtree_control"), encoding="utf-8") as f:
            enabled = f.read().split()
        if "memory" not in enabled:
            _write(here, "cgroup.subtree_control", "+memory")


def _inherit_cpuset(base: str, leaf: str) -> None:
    """cgroup v1 cpuset: a new cgroup has no CPUs or memory nodes until given its parent's (runc)."""
    here = base
    for part in os.path.relpath(leaf, base).split(os.sep):
        parent, here = here, os.path.join(here, part)
        for name in ("cpuset.cpus", "cpuset.mems"):
            with open(os.path.join(here, name), encoding="utf-8") as f:
                if f.read().strip():
                    continue
            with open(os.path.join(parent, name), encoding="utf-8") as f:
                _write(here, name, f.read().strip())


def _write(path: str, name: str, value: str) -> None:
    try:
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(value)
    except OSError as err:
        raise SandboxError(f"cgroup {path}: write {value} to {name}: {err.strerror}") from None


def _remove(path: str) -> None:
    """rmdir the step's cgroup once its processes are gone (they may take a moment to leave)."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY:
                return
            time.sleep(0.02)
