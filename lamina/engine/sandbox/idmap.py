"""Which host ids a sandbox's user namespace maps, and writing those maps.

Three cases, chosen once by `detect_ids()`:
- host root: the identity map of the whole id space;
- a caller with /etc/subuid and /etc/subgid ranges and newuidmap/newgidmap:
  0 -> the caller, 1..N -> the subordinate ranges, so chown and USER work;
- anyone else: only the caller, as root; `IdMap.warning` says what breaks;
- a plain uid where no user namespace can be made (or `--isolation proot`):
  no map at all; files are the caller's and their container owners are
  recorded in `user.lamina.owner` xattrs (`recorded`), so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shutil
import subprocess
from pathlib import Path

from lamina.errors import SandboxError

_FULL_RANGE = 4294967295  # every id but (uid_t)-1


class IdMode(enum.Enum):
    ROOT = "root"
    SUBORDINATE = "subordinate"
    SINGLE = "single"
    RECORDED = "recorded"  # no user namespace: owners kept in xattrs (sandbox.recorded)


@dataclasses.dataclass(frozen=True, slots=True)
class IdRange:
    inside: int
    outside: int
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class IdMap:
    mode: IdMode
    uids: tuple[IdRange, ...]
    gids: tuple[IdRange, ...]
    warning: str = ""  # set when some things will not work; say it once

    @property
    def rootless(self) -> bool:
        return self.mode is not IdMode.ROOT

    def uid_inside(self, host_uid: int) -> int:
        return _translate(self.uids, host_uid)

    def gid_inside(self, host_gid: int) -> int:
        return _translate(self.gids, host_gid)


_OVERFLOW_ID = 65534  # what the kernel shows for an unmapped id


def _translate(ranges: tuple[IdRange, ...], host_id: int) -> int:
    for r in ranges:
        if r.outside <= host_id < r.outside + r.count:
            return r.inside + host_id - r.outside
    return _OVERFLOW_ID


def _subordinate_ranges(path: Path, name: str, own_id: int) -> list[tuple[int, int]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    ranges = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (name, str(own_id)):
            continue
        try:
            ranges.append((int(parts[1]), int(parts[2])))
        except ValueError:
            continue
    return ranges


def _stacked(own_id: int, ranges: list[tuple[int, int]]) -> tuple[IdRange, ...]:
    out = [IdRange(0, own_id, 1)]
    inside = 1
    for start, count in ranges:
        out.append(IdRange(inside, start, count))
        inside += count
    return tuple(out)


def detect_ids(etc: Path = Path("/etc")) -> IdMap:
    """The id map a sandbox started by this process will use."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        full = (IdRange(0, 0, _FULL_RANGE),)
        return IdMap(IdMode.ROOT, full, full)
    if _without_userns():
        return IdMap(IdMode.RECORDED, (IdRange(0, uid, 1),), (IdRange(0, gid, 1),))
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    sub_u = _subordinate_ranges(etc / "subuid", name, uid)
    sub_g = _subordinate_ranges(etc / "subgid", name, uid)
    tools = shutil.which("newuidmap") and shutil.which("newgidmap")
    if sub_u and sub_g and tools:
        return IdMap(IdMode.SUBORDINATE, _stacked(uid, sub_u), _stacked(gid, sub_g))
    why = "no newuidmap/newgidmap" if not tools else f"no range for {name} in {etc}/subuid and subgid"
    return IdMap(
        IdMode.SINGLE,
        (IdRange(0, uid, 1),),
        (IdRange(0, gid, 1),),
        warning=(
            f"{why}: the sandbox maps only your own id, to root; "
            "chown to other ids, USER with another id and setgroups will fail"
        ),
    )


def _without_userns() -> bool:
    """Whether sandboxes run without a user namespace: proot asked for, or none allowed (probed once)."""
    from lamina.engine.sandbox import isolation

    want = isolation.requested()
    if want is not None:
        return want is isolation.Isolation.PROOT
    return bool(isolation.probe().userns)


def write_maps(pid: int, ids: IdMap) -> None:
    """Give the user namespace of `pid` (just unshared, still unmapped) its maps."""
    try:
        if ids.mode is IdMode.SUBORDINATE:
            # Both at once: each is a setuid process start, a few ms of the sandbox's start-up.
            running = []
            for tool, ranges in (("newuidmap", ids.uids), ("newgidmap", ids.gids)):
                args = [str(n) for r in ranges for n in (r.inside, r.outside, r.count)]
                running.append((tool, subprocess.Popen([tool, str(pid), *args], stderr=subprocess.PIPE)))
            for tool, proc in running:
                _, stderr = proc.communicate()
                if proc.returncode != 0:
                    message = stderr.decode(errors="replace").strip() or "failed"
                    raise SandboxError(f"{tool} {pid}: {message}")
            return
        if ids.mode is IdMode.SINGLE:
            # An unprivileged process may map only its own id, and only after
            # giving up setgroups in that namespace.
            Path(f"/proc/{pid}/setgroups").write_text("deny")
        for name, ranges in (("uid_map", ids.uids), ("gid_map", ids.gids)):
            text = "".join(f"{r.inside} {r.outside} {r.count}\n" for r in ranges)
            Path(f"/proc/{pid}/{name}").write_text(text)
    except OSError as err:
        raise SandboxError(f"write user namespace id maps for pid {pid}: {err.strerror or err}") from err
