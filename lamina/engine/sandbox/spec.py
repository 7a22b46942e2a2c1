"""What a sandboxed process is: the typed values the executor and `lamina run` fill in."""

from __future__ import annotations

import dataclasses
import enum
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from lamina.engine.sandbox.isolation import Isolation
    from lamina.oci.image import Platform


class Network(enum.Enum):
    # A network namespace of its own with outbound access through slirp4netns
    # (sandbox.network); the host's loopback is out of reach. BuildKit's default.
    DEFAULT = "default"
    HOST = "host"  # the host's network, /etc/resolv.conf and /etc/hosts bound read-only
    NONE = "none"  # a new network namespace with only loopback, up


class Snapshotter(enum.Enum):
    OVERLAY = "overlay"  # overlayfs over the lower dirs; the upper dir is the diff
    COPY = "copy"  # copy the lowers, run, compare: for where overlayfs will not mount


class Sharing(enum.Enum):
    SHARED = "shared"  # concurrent runs use the same directory
    PRIVATE = "private"  # a busy cache directory is replaced by a fresh empty one
    LOCKED = "locked"  # concurrent runs wait for each other


@dataclasses.dataclass(frozen=True, slots=True)
class BindMount:
    """A host file or directory (or a stage's rootfs) at `target`.

    Read-only by default, as for `RUN --mount=type=bind`; with `readonly=False`
    writes reach the source unless `discard_writes`, when they go to a
    scratch upper dir that is thrown away.
    """

    source: Path
    target: str
    readonly: bool = True
    discard_writes: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class CacheMount:
    """A persistent directory (the caller picks it, e.g. keyed by cache id) at `target`.

    `uid`, `gid` and `mode` apply when the directory is first created. With
    `readonly` (`--mount=type=cache,ro`) the step sees it read-only: writes fail with EROFS.
    """

    source: Path
    target: str
    sharing: Sharing = Sharing.SHARED
    uid: int = 0
    gid: int = 0
    mode: int = 0o755
    readonly: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class TmpfsMount:
    target: str
    size: int = 0  # bytes; 0 is the kernel default (half of RAM)
    readonly: bool = False  # `--mount=type=tmpfs,ro`: an empty read-only tmpfs, as BuildKit's


@dataclasses.dataclass(frozen=True, slots=True)
class SecretMount:
    """A secret file at `target` (default /run/secrets/ID), on a tmpfs: never in a layer."""

    id: str
    source: Path
    target: str = ""
    uid: int = 0
    gid: int = 0
    mode: int = 0o400

    @property
    def path(self) -> str:
        return self.target or f"/run/secrets/{self.id}"


Mount = BindMount | CacheMount | TmpfsMount | SecretMount


# docker's ulimitNameMapping, with Linux's RLIMIT_* numbers (asm-generic/resource.h).
RLIMITS = {
    "cpu": 0,
    "fsize": 1,
    "data": 2,
    "stack": 3,
    "core": 4,
    "rss": 5,
    "nproc": 6,
    "nofile": 7,
    "memlock": 8,
    "locks": 10,
    "sigpending": 11,
    "msgqueue": 12,
    "nice": 13,
    "rtprio": 14,
    "rttime": 15,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Ulimit:
    """`--ulimit NAME=SOFT[:HARD]`: a resource limit (RLIMIT_<NAME>) set before exec; -1 is unlimited."""

    name: str  # docker's names: nofile, nproc, core, stack, memlock, ...
    soft: int
    hard: int


@dataclasses.dataclass(frozen=True, slots=True)
class PublishedPort:
    """`host_addr:host_port` on the host forwarded to `guest_port` in the sandbox (TCP), as `-p`.

    Only with Network.DEFAULT: slirp4netns listens on the host side.
    """

    host_port: int
    guest_port: int
    host_addr: str = "127.0.0.1"


@dataclasses.dataclass(frozen=True, slots=True)
class Started:
    """A sandbox that is running: `pid` is the helper's (its namespaces are the command's);
    `stop()` interrupts it, then kills it after a grace period."""

    pid: int
    stop: Callable[[], None]
    spec: SandboxSpec | None = None  # what it runs, as the runner resolved it (an exec into it reads it)


# Where a stream goes: None inherits ours, an int is a file descriptor
# (or subprocess.DEVNULL), else a file object.
Output = int | IO[bytes] | None


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxSpec:
    """One process to run in a fresh sandbox over `lower_dirs`.

    `lower_dirs` are unpacked layers in overlay form (top-most first).
    `upper_dir` receives the changes (it must be empty or missing, and is
    kept); None runs on a scratch upper dir that is removed afterwards.
    `user` is `name`, `uid`, `name:group` or `uid:gid`, resolved in the
    image's /etc/passwd and /etc/group. `snapshotter` None picks
    `$LAMINA_SNAPSHOTTER`, else overlay where it mounts, else copy.
    `scratch_dir` is where temporary dirs go (default: beside `upper_dir`,
    else the system temp dir).
    """

    argv: tuple[str, ...]
    lower_dirs: tuple[Path, ...] = ()
    upper_dir: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/"
    user: str = ""
    hostname: str = "lamina"
    network: Network = Network.DEFAULT
    # `RUN --security=insecure`: all capabilities, no seccomp filter, no masked
    # or read-only /proc and /sys paths (runc's default spec otherwise).
    insecure: bool = False
    publish: tuple[PublishedPort, ...] = ()  # Network.DEFAULT only
    mounts: tuple[Mount, ...] = ()
    snapshotter: Snapshotter | None = None
    stdin: Output = subprocess.DEVNULL  # a build step reads nothing; None passes ours through
    stdout: Output = None
    stderr: Output = None
    scratch_dir: Path | None = None
    extra_hosts: tuple[tuple[str, str], ...] = ()  # (name, ip) lines added to /etc/hosts
    ulimits: tuple[Ulimit, ...] = ()
    shm_size: int = 0  # bytes of the /dev/shm tmpfs; 0: 64 MiB, runc's and BuildKit's default
    # --cgroup-parent and the memory= limit (bytes, 0: none): the step in a cgroup of its own
    # below the parent (sandbox.cgroups); either set makes one.
    cgroup_parent: str = ""
    memory: int = 0
    # How the step is isolated (isolation.Isolation); None: $LAMINA_ISOLATION, else auto.
    isolation: Isolation | None = None
    # The platform of the image's programs; None or the host's: native. Another is run
    # under emulation (sandbox.emulation), or refused in one line with the remedy.
    platform: Platform | None = None


def parse_publish(text: str) -> PublishedPort:
    """`-p` as `docker run` takes it, TCP only: `HOST:GUEST` or `ADDR:HOST:GUEST` (ADDR default 127.0.0.1)."""
    from lamina.errors import SandboxError

    parts = text.removesuffix("/tcp").rsplit(":", 2)
    if len(parts) == 2:
        parts.insert(0, "127.0.0.1")
    numbers = parts[1:]
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and 0 < int(p) < 65536 for p in numbers):
        raise SandboxError(f"-p {text}: expected HOST_PORT:CONTAINER_PORT or ADDR:HOST_PORT:CONTAINER_PORT")
    return PublishedPort(int(parts[1]), int(parts[2]), parts[0] or "127.0.0.1")


def parse_mount(text: str) -> Mount:
    """A `--mount` flag as `docker run` takes it: `type=bind,source=S,target=T[,readonly]`,
    `type=tmpfs,target=T[,tmpfs-size=N]`. Bind mounts are writable unless `ro`/`readonly`.
    """
    from lamina.errors import SandboxError

    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not key:
            continue
        if key in ("ro", "readonly") and (not sep or value.lower() in ("1", "true")):
            fields["readonly"] = "true"
            continue
        if not sep:
            raise SandboxError(f"--mount {text}: {key!r} needs a value (key=value)")
        fields[{"src": "source", "dst": "target", "destination": "target"}.get(key, key)] = value
    kind = fields.pop("type", "volume")
    target = fields.pop("target", "")
    if not target.startswith("/"):
        raise SandboxError(f"--mount {text}: target must be an absolute path")
    if kind == "bind":
        source = fields.pop("source", "")
        if not source:
            raise SandboxError(f"--mount {text}: a bind mount needs source=")
        readonly = fields.pop("readonly", "false").lower() in ("1", "true")
        mount: Mount = BindMount(Path(source).absolute(), target, readonly=readonly)
    elif kind == "tmpfs":
        size = fields.pop("tmpfs-size", "0")
        try:
            mount = TmpfsMount(target, int(size))
        except ValueError:
            raise SandboxError(f"--mount {text}: tmpfs-size must be a number of bytes") from None
    else:
        raise SandboxError(f"--mount {text}: type {kind!r} is not supported (bind or tmpfs)")
    if fields:
        raise SandboxError(f"--mount {text}: unknown option {sorted(fields)[0]!r}")
    return mount
