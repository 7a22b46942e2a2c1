"""What a step gets on this host, for `lamina info`: namespaces, ids, capabilities, seccomp, network."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lamina.engine.sandbox import _confine, network
from lamina.engine.sandbox.idmap import IdMode, detect_ids

if TYPE_CHECKING:
    from lamina.engine.sandbox.isolation import Isolation, Probe


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxInfo:
    namespaces: tuple[str, ...]
    id_mode: str
    uid_map: tuple[tuple[int, int, int], ...]  # (inside, outside, count)
    gid_map: tuple[tuple[int, int, int], ...]
    id_warning: str
    capabilities: tuple[str, ...]
    capability_mask: int
    seccomp: str
    masked_paths: tuple[str, ...]
    readonly_paths: tuple[str, ...]
    network: str
    isolation: str = ""  # the isolation a build would use, and why
    isolation_lacks: str = ""
    allowed: tuple[str, ...] = ()  # what this process may do, as probed
    platforms: tuple[str, ...] = ()  # each commonly built platform: native, emulated and how, or why not

    def lines(self) -> list[str]:
        def ranges(rs: tuple[tuple[int, int, int], ...]) -> str:
            return ", ".join(f"{i}->{o} ({c})" for i, o, c in rs)

        out = [
            f"isolation:       {self.isolation}",
            *([f"                 lacks: {self.isolation_lacks}"] if self.isolation_lacks else []),
            f"this process:    {'; '.join(self.allowed)}",
            f"namespaces:      {' '.join(self.namespaces) or 'none'}",
            f"id map:          {self.id_mode}: uids {ranges(self.uid_map)}; gids {ranges(self.gid_map)}",
        ]
        if self.id_warning:
            out.append(f"                 {self.id_warning}")
        caps = " ".join(self.capabilities) or "none"
        out += [
            f"capabilities:    bounding set {self.capability_mask:#010x}: {caps}",
            f"seccomp:         {self.seccomp}",
            f"masked paths:    {' '.join(self.masked_paths) or 'none'}",
            f"read-only paths: {' '.join((*self.readonly_paths, '/sys')) if self.readonly_paths else 'none'}",
            f"network:         {self.network}",
            "opt-ins:         RUN --security=insecure (--allow security.insecure): all capabilities, "
            "no seccomp, no masked paths; --network=host (RUN: --allow network.host): the host's network",
        ]
        for i, platform in enumerate(self.platforms):
            out.append(f"{'platforms:' if i == 0 else '':<17}{platform}")
        return out


def describe() -> SandboxInfo:
    from lamina.engine.sandbox import isolation

    found = isolation.probe()
    mode, lacks, chosen = _chosen(found)
    namespaces = (
        {
            isolation.Isolation.USERNS: ("user", "mount", "pid", "uts", "ipc", "network"),
            isolation.Isolation.ROOTNS: ("mount", "pid", "uts", "ipc", "network"),
        }.get(mode, ())
        if mode
        else ()
    )
    ids = detect_ids()
    seccomp = _seccomp()
    caps, cap_mask = tuple(_confine.DEFAULT_CAPS), _confine.DEFAULT_CAP_MASK
    masked, readonly = _confine.MASKED_PATHS, _confine.READONLY_PATHS
    if mode is isolation.Isolation.PROOT:
        # A plain uid under proot: no capabilities, the container's /proc as it is, and
        # the calls that would show or change owners answered by lamina.
        caps, cap_mask, masked, readonly = (), 0, (), ()
        seccomp = seccomp.replace("no_new_privs off", "no_new_privs on") + (
            "; chown, mknod, stat, get*id and set*id answered by lamina (seccomp user notification)"
        )
    net = _default_network()
    return SandboxInfo(
        namespaces=namespaces,
        id_mode={
            IdMode.ROOT: "root (identity map; /proc/sys read-only, capabilities limited)",
            IdMode.SUBORDINATE: "subordinate ids",
            IdMode.SINGLE: "single id (yours, as root)",
            IdMode.RECORDED: "none (no user namespace): files are yours; owners are recorded in xattrs",
        }[ids.mode],
        uid_map=tuple((r.inside, r.outside, r.count) for r in ids.uids),
        gid_map=tuple((r.inside, r.outside, r.count) for r in ids.gids),
        id_warning=ids.warning,
        capabilities=caps,
        capability_mask=cap_mask,
        seccomp=seccomp,
        masked_paths=masked,
        readonly_paths=readonly,
        network=net if namespaces else "the host's (no network namespace)",
        isolation=chosen,
        isolation_lacks=lacks,
        allowed=tuple(found.facts()),
        platforms=_platforms(mode),
    )


def _platforms(mode: Isolation | None) -> tuple[str, ...]:
    """What `lamina info` says of each platform: run natively, emulated (and through what), or not."""
    from lamina.engine.sandbox.emulation import runnable

    return tuple(how for _, how in runnable(mode.value if mode is not None else "userns"))


def _chosen(found: Probe) -> tuple[Isolation | None, str, str]:
    """(the isolation a build gets here or None, what it lacks, how `lamina sandbox info` says it)."""
    from lamina.engine.sandbox import isolation
    from lamina.errors import SandboxError

    try:
        choice = isolation.choose(isolation.requested(), found)
        mode, why, lacks = choice.isolation, choice.why, choice.lacks
        chosen = f"{mode.value} ({why})"
    except SandboxError as err:
        mode, lacks, chosen = None, "", f"none: {err}"
    return mode, lacks, chosen


def _seccomp() -> str:
    """The seccomp filter a RUN step gets, or why it cannot have one."""
    try:
        _confine.Filter()
        seccomp = (
            f"Docker's default profile's denials ({len(_confine.DENIED_SYSCALLS)} calls, clone's namespace "
            "flags, personality), EPERM; no_new_privs off"
        )
    except OSError as err:
        seccomp = f"unavailable: {err.strerror or err} (RUN steps will fail to start)"
    return seccomp


def _default_network() -> str:
    """What the default network is here."""
    why = network.unavailable()
    return (
        f"default: a namespace of its own through {network.slirp4netns()}, host loopback unreachable"
        if not why
        else f"default: {network.fallback_warning(why)}"
    )
