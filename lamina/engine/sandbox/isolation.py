"""Which isolation a RUN step gets here: probed once per process, chosen once per build.

Where namespaces cannot be made (docker's default seccomp profile denies
unshare and clone's namespace flags; `user.max_user_namespaces=0` or
`kernel.unprivileged_userns_clone=0` on a host) a build still runs, under
a weaker mechanism that `auto` picks and names once on stderr:

    userns   user, mount, PID, UTS, IPC and network namespaces (the full sandbox)
    rootns   the same without the user namespace: root with CAP_SYS_ADMIN where
             user namespaces are off (a step's root is the host's root, as
             with the identity map root gets anyway, held by the same
             capabilities, seccomp filter and read-only /proc/sys)
    chroot   chroot(2) into a copy of the step's root filesystem, no
             namespaces: container root with Docker's default capabilities
    proot    a plain uid with no namespaces: Debian's proot (ptrace path
             translation, fake root) over a copy of the step's root
             filesystem; chown is recorded in xattrs (`_proot`, `lamina.oci.recorded`)

The probe forks nothing from this (maybe threaded) interpreter: it asks a
fresh helper (`helper.py --probe`) which unshare(2) calls succeed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import sys
from pathlib import Path

from lamina.errors import SandboxError

_HELPER = str(Path(__file__).with_name("helper.py"))
ENV_VAR = "LAMINA_ISOLATION"

CAP_SYS_CHROOT = 18
CAP_SYS_ADMIN = 21
CAP_MKNOD = 27


class Isolation(enum.Enum):
    USERNS = "userns"
    ROOTNS = "rootns"
    CHROOT = "chroot"
    PROOT = "proot"


@dataclasses.dataclass(frozen=True, slots=True)
class Probe:
    """What this process may do, as measured (not guessed from the kernel's sysctls)."""

    uid: int
    userns: str  # "" when unshare(CLONE_NEWUSER | the others) works, else why not
    rootns: str  # "" when unshare of mount/PID/UTS/IPC/net works without a user namespace
    effective_caps: int
    proot: str | None  # its path, if installed

    def has_cap(self, bit: int) -> bool:
        return bool(self.effective_caps >> bit & 1)

    def facts(self) -> list[str]:
        def cap(bit: int, name: str) -> str:
            return f"{name} {'yes' if self.has_cap(bit) else 'no'}"

        return [
            f"user namespaces {'yes' if not self.userns else 'no (' + self.userns + ')'}",
            f"namespaces without one {'yes' if not self.rootns else 'no (' + self.rootns + ')'}",
            f"uid {self.uid}",
            ", ".join(
                (
                    cap(CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
                    cap(CAP_SYS_CHROOT, "CAP_SYS_CHROOT"),
                    cap(CAP_MKNOD, "CAP_MKNOD"),
                )
            ),
            f"proot {self.proot or 'not installed'}",
        ]


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    isolation: Isolation
    why: str  # why this one (for `lamina info`)
    lacks: str  # what a step does not get compared to the full sandbox; "" for none

    def notice(self) -> str:
        """The one line said on stderr once per build when the isolation is weaker than userns."""
        return f"isolation {self.isolation.value}: {self.lacks}" if self.lacks else ""


LACKS = {
    Isolation.USERNS: "",
    Isolation.ROOTNS: "",
    Isolation.CHROOT: (
        "no namespaces: RUN shares this host's network "
        "(--network=none cannot be given) and PID space, sees no /proc or /sys and a /dev of "
        "device nodes, gets --mount contents as copies (writes to a RUN's binds are dropped, a "
        "writable `lamina run --mount` bind is written back when the command ends, cache dirs "
        "are moved in; a read-only cache or tmpfs mount cannot be given), may not chroot itself, "
        "and each step copies its root filesystem"
    ),
    Isolation.PROOT: (
        "no namespaces, a plain uid: RUN runs under proot (ptrace, slower system calls), shares "
        "this host's network (--network=none cannot be given), PID space and /proc, sees a /dev of "
        "the host's null/zero/random/tty, gets no read-only cache or tmpfs mount, may not switch "
        "users (su, setuid), and each step copies its root filesystem"
    ),
}


def _caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


@functools.cache
def probe() -> Probe:
    """Measure, once per process, which namespaces this process may make."""
    import subprocess  # here: a no-op rebuild, which runs nothing, does not load it

    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", _HELPER, "--probe"],
            env={},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
        lines = done.stdout.decode(errors="replace").splitlines()
    except (OSError, subprocess.TimeoutExpired) as err:
        lines = [f"probe failed: {err}"] * 2
    lines += ["probe gave no answer"] * (2 - len(lines))
    return Probe(
        uid=os.geteuid(),
        userns=lines[0].strip(),
        rootns=lines[1].strip(),
        effective_caps=_caps(),
        proot=_which("proot"),
    )


def _which(name: str) -> str | None:
    # shutil is imported here, not at the top: a no-op rebuild imports this module
    # (api's typed isolation) and must stay free of it (tests/test_imports.py).
    import shutil

    return shutil.which(name)


def requested() -> Isolation | None:
    """`$LAMINA_ISOLATION` (what `--isolation` sets): None for auto."""
    value = os.environ.get(ENV_VAR, "")
    try:
        return parse(value)
    except SandboxError:
        names = "|".join(i.value for i in Isolation)
        raise SandboxError(f"{ENV_VAR}={value.strip().lower()}: expected auto|{names}") from None


def choose(want: Isolation | None = None, found: Probe | None = None) -> Choice:
    """The strongest isolation allowed here (`want` None), or `want` if it is allowed.

    Raises SandboxError, naming what is missing, when nothing (or not `want`) is.
    """
    p = found or probe()
    options = _allowed(p)
    if want is not None:
        for choice in options:
            if choice.isolation is want:
                return choice
        raise SandboxError(f"--isolation {want.value}: {_refusal(want, p)}")
    if options:
        return options[0]
    reasons = "; ".join(f"{i.value}: {_refusal(i, p)}" for i in Isolation)
    raise SandboxError(f"no isolation for RUN steps is possible here ({reasons})")


def parse(value: str | Isolation | None) -> Isolation | None:
    """An isolation as the API and `--isolation` take it: a name, "auto" / None for auto."""
    if value is None or isinstance(value, Isolation):
        return value
    if value.strip().lower() in ("", "auto"):
        return None
    try:
        return Isolation(value.strip().lower())
    except ValueError:
        names = "|".join(i.value for i in Isolation)
        raise SandboxError(f"isolation {value!r}: expected auto|{names}") from None


def check_ids(chosen: Isolation, recorded: bool) -> None:
    """Refuse proot where layers keep owners on disk, and the other modes where xattrs keep them.

    The id map (`idmap.detect_ids`) follows $LAMINA_ISOLATION and the probe, and layer dirs
    unpacked under one cannot serve the other: a typed request that disagrees is one line.
    """
    if os.geteuid() == 0 or (chosen is Isolation.PROOT) == recorded:
        return
    if chosen is Isolation.PROOT:
        raise SandboxError(
            f"isolation proot where user namespaces work: set ${ENV_VAR}=proot (or --isolation proot) "
            "for the whole process, so that layers are unpacked for it too"
        )
    raise SandboxError(
        f"isolation {chosen.value}: this process keeps owners in xattrs (proot: ${ENV_VAR} or no user "
        f"namespaces); set ${ENV_VAR}={chosen.value} for the whole process"
    )


def _allowed(p: Probe) -> list[Choice]:
    out = []
    if not p.userns:
        out.append(Choice(Isolation.USERNS, "user namespaces are allowed", ""))
    if not p.rootns and p.uid == 0:
        why = f"no user namespaces ({p.userns or 'asked for'}); root may make the others"
        out.append(Choice(Isolation.ROOTNS, why, ""))
    if p.uid == 0 and p.has_cap(CAP_SYS_CHROOT):
        denied = (p.rootns or p.userns) if p.userns else "asked for"
        why = f"no namespaces ({denied}); root holds CAP_SYS_CHROOT"
        out.append(Choice(Isolation.CHROOT, why, LACKS[Isolation.CHROOT]))
    if p.uid != 0 and p.proot:
        why = f"no namespaces ({p.userns or 'asked for'}) and uid {p.uid}; proot is installed"
        out.append(Choice(Isolation.PROOT, why, LACKS[Isolation.PROOT]))
    return out


def _refusal(want: Isolation, p: Probe) -> str:
    if want is Isolation.USERNS:
        return p.userns or "allowed"
    if want is Isolation.ROOTNS:
        return "needs uid 0" if p.uid != 0 else (p.rootns or "allowed")
    if want is Isolation.CHROOT:
        if p.uid != 0:
            return f"needs uid 0 (this is uid {p.uid})"
        return "needs CAP_SYS_CHROOT" if not p.has_cap(CAP_SYS_CHROOT) else "allowed"
    if p.uid == 0:
        return "is for a plain uid (uid 0 uses chroot)"
    return "allowed" if p.proot else "proot is not installed (apt-get install proot)"
