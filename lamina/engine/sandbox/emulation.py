"""Running another platform's programs: which platforms this host runs, and how.

A RUN step of a linux/arm64 stage on an amd64 host executes arm64 ELF files.
The kernel hands such a file to an interpreter registered in binfmt_misc for
its ELF header; Debian's qemu-user-static ships one per architecture
(`/usr/bin/qemu-aarch64-static`) and the rules to register them
(`/usr/lib/binfmt.d/qemu-aarch64.conf`, registered at install by
binfmt-support or systemd-binfmt). How a sandbox gets one, best first:

    native    the host's own platform
    binfmt    a handler registered on the host with the F (fix-binary) flag: the
              kernel opened the interpreter when it was registered, so it works
              inside any root filesystem and any user namespace (rootless too).
              One registered without F is unusable here: the kernel would look
              for its interpreter inside the image.
    private   nothing registered, qemu-user-static installed, userns isolation:
              Linux 6.7 gives each user namespace a binfmt_misc of its own. The
              sandbox mounts its own at /proc/sys/fs/binfmt_misc (read-only once
              filled) and registers Debian's rule there with F, from the host's
              view, before pivot_root; every program the step starts (a shell's
              children too) is emulated. The host's handlers are never touched.
    proot     proot isolation: `proot -q qemu-<arch>-static`, proot runs every program
              of the step through the interpreter (registered or not: proot's own
              loader starts programs, so the kernel's handlers are never asked).

Without any of these, a build fails before its first step with the remedy
(`check_platforms`). lamina itself never registers a handler on the host: that
is root's choice (`apt-get install qemu-user-static`, or .ci/run's `update-binfmts`).
"""

from __future__ import annotations

import dataclasses
import os
import platform as _platform
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from lamina.errors import SandboxError
from lamina.oci.image import Platform, host_platform

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
RULES_DIR = Path("/usr/lib/binfmt.d")  # Debian's qemu-user-static rules
REMEDY = "apt-get install qemu-user-static"

# platform (normalised arch, variant) -> (qemu's name, ELF class, ELF data, e_machine)
_ELF = {
    ("amd64", ""): ("x86_64", 2, 1, 62),
    ("arm64", ""): ("aarch64", 2, 1, 183),
    ("arm", "v7"): ("arm", 1, 1, 40),
    ("arm", "v6"): ("arm", 1, 1, 40),
    ("arm", "v5"): ("arm", 1, 1, 40),
    ("386", ""): ("i386", 1, 1, 3),
    ("ppc64le", ""): ("ppc64le", 2, 1, 21),
    ("s390x", ""): ("s390x", 2, 2, 22),
    ("riscv64", ""): ("riscv64", 2, 1, 243),
    ("mips64le", ""): ("mips64el", 2, 1, 8),
    ("loong64", ""): ("loongarch64", 2, 1, 258),
}
# What `lamina info` asks about: the platforms images are commonly built for.
LISTED = tuple(
    Platform.parse(p)
    for p in ("linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6", "linux/386", "linux/ppc64le",
              "linux/s390x", "linux/riscv64", "linux/mips64le")
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Emulator:
    """How a sandbox runs `platform`'s programs (see the module docstring)."""

    platform: Platform
    how: Literal["native", "binfmt", "private", "proot"]
    interpreter: str = ""  # binfmt: the registered one; private, proot: qemu's static binary
    rule: str = ""  # private: the line written to the sandbox's own binfmt_misc register

    def describe(self) -> str:
        if self.how == "native":
            return f"{self.platform} (native)"
        where = {"binfmt": "binfmt_misc", "private": "the sandbox's own binfmt_misc", "proot": "proot -q"}
        return f"{self.platform} (emulated: {self.interpreter}, {where[self.how]})"


def is_native(platform: Platform) -> bool:
    host = _key(host_platform())
    return _key(platform) == host or ((host, _key(platform)) == (("amd64", ""), ("386", "")) and _ia32())


def _ia32() -> bool:
    """Whether this x86_64 kernel runs i386 programs: built with IA32 emulation (it then has
    the abi.vsyscall32 sysctl) and not booted with it off (ia32_emulation=, Linux 6.7)."""
    if not os.path.exists("/proc/sys/abi/vsyscall32"):
        return False
    try:
        cmdline = Path("/proc/cmdline").read_text().split()
    except OSError:
        return True
    return not any(arg in cmdline for arg in ("ia32_emulation=0", "ia32_emulation=false", "ia32_emulation=n"))


def qemu_name(platform: Platform) -> str | None:
    found = _ELF.get(_key(platform))
    return found[0] if found is not None else None


def _key(platform: Platform) -> tuple[str, str]:
    p = platform.normalized()
    return p.architecture, p.variant


def elf_header(platform: Platform) -> bytes | None:
    """The first 20 bytes of an executable ELF file of `platform` (what binfmt_misc matches)."""
    found = _ELF.get(_key(platform))
    if found is None:
        return None
    _, elf_class, data, machine = found
    order = "little" if data == 1 else "big"
    ident = b"\x7fELF" + bytes((elf_class, data, 1)) + bytes(9)
    return ident + (2).to_bytes(2, order) + machine.to_bytes(2, order)


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    """One binfmt_misc entry of the host, as /proc/sys/fs/binfmt_misc/NAME shows it."""

    name: str
    enabled: bool
    interpreter: str
    flags: str
    offset: int
    magic: bytes
    mask: bytes

    def matches(self, header: bytes) -> bool:
        mask = self.mask or b"\xff" * len(self.magic)
        window = header[self.offset : self.offset + len(self.magic)]
        if len(window) < len(self.magic):
            return False
        return all(h & m == g & m for h, m, g in zip(window, mask, self.magic, strict=True))


def host_handlers(directory: Path = BINFMT_DIR) -> tuple[Handler, ...]:
    """The magic-number handlers registered where this process looks ((); none or not mounted)."""
    found = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return ()
    for name in names:
        if name in ("register", "status"):
            continue
        try:
            text = (directory / name).read_text(errors="replace")
        except OSError:
            continue
        handler = _parse_handler(name, text)
        if handler is not None:
            found.append(handler)
    return tuple(found)


def _parse_handler(name: str, text: str) -> Handler | None:
    fields: dict[str, str] = {}
    enabled = False
    for line in text.splitlines():
        if line.strip() == "enabled":
            enabled = True
        key, _, value = line.partition(" ")
        fields[key.rstrip(":")] = value.strip()
    if "magic" not in fields:
        return None  # an extension handler (.jar): never an ELF
    try:
        return Handler(
            name,
            enabled,
            fields.get("interpreter", ""),
            fields.get("flags", ""),
            int(fields.get("offset", "0")),
            bytes.fromhex(fields["magic"]),
            bytes.fromhex(fields.get("mask", "")),
        )
    except ValueError:
        return None


def _host_handler(platform: Platform, handlers: Iterable[Handler]) -> Handler | None:
    header = elf_header(platform)
    if header is None:
        return None
    for handler in handlers:
        if handler.enabled and handler.matches(header):
            return handler
    return None


def private_rule(platform: Platform, rules: Path = RULES_DIR) -> tuple[str, str] | None:
    """(Debian's register line with the F flag, qemu's static binary) for `platform`, when
    qemu-user-static is installed; the line registers it in a sandbox's own binfmt_misc."""
    name = qemu_name(platform)
    if name is None:
        return None
    static = shutil.which(f"qemu-{name}-static") or ""
    conf = rules / f"qemu-{name}.conf"
    if not static or not conf.is_file():
        return None
    # :name:type:offset:magic:mask:interpreter:flags (magic and mask spell ':' as \x3a)
    parts = conf.read_text(errors="replace").strip().split(":")
    if len(parts) != 8 or parts[2] != "M":
        return None
    # Named for lamina, the static binary itself (no wrapper), P: qemu reads the preserved
    # argv[0] from AT_FLAGS; F: opened now, from the host's view.
    parts[1], parts[6], parts[7] = f"lamina-{name}", static, "PF"
    return ":".join(parts), static


def private_binfmt_works() -> bool:
    """Linux 6.7 and later give each user namespace a binfmt_misc instance of its own."""
    release = _platform.release().split(".")
    try:
        return (int(release[0]), int(release[1].split("-")[0])) >= (6, 7)
    except (ValueError, IndexError):
        return False


def emulator(
    platform: Platform, isolation: str = "userns", handlers: Iterable[Handler] | None = None
) -> Emulator:
    """How a sandbox of `isolation` (userns, rootns, chroot, proot) runs `platform`'s programs;
    SandboxError, one line with the remedy, when it cannot."""
    platform = platform.normalized()
    if is_native(platform):
        return Emulator(platform, "native")
    rule = private_rule(platform)
    if isolation == "proot":
        # proot starts every program through its own loader, which cannot map another
        # architecture's ELF: the kernel's handler is never reached, so always proot -q.
        if rule is not None:
            return Emulator(platform, "proot", rule[1])
        raise SandboxError(f"cannot run {platform} programs under proot isolation: no emulator ({REMEDY})")
    registered = _host_handler(platform, host_handlers() if handlers is None else handlers)
    if registered is not None and "F" in registered.flags:
        return Emulator(platform, "binfmt", registered.interpreter)
    if rule is not None and isolation == "userns" and private_binfmt_works():
        return Emulator(platform, "private", rule[1], rule[0])
    raise SandboxError(_cannot(platform, isolation, registered, rule is not None))


def _cannot(platform: Platform, isolation: str, registered: Handler | None, installed: bool) -> str:
    host = host_platform()
    start = f"cannot run {platform} programs on this {host} host"
    if qemu_name(platform) is None:
        return f"{start}: lamina knows no emulator for {platform.architecture}"
    if registered is not None:
        return (
            f"{start}: binfmt_misc handler {registered.name} lacks the F (fix-binary) flag, so the "
            f"sandbox cannot reach {registered.interpreter} (re-register it with F: {REMEDY}, update-binfmts)"
        )
    if installed:
        return (
            f"{start}: no binfmt_misc handler is registered and {isolation} isolation cannot register "
            "its own (as root: update-binfmts --enable, or mount binfmt_misc and register "
            "/usr/lib/binfmt.d/qemu-*.conf)"
        )
    return f"{start}: no emulator ({REMEDY})"


def check_platforms(platforms: Iterable[Platform], isolation: str | None = None) -> None:
    """Fail, before a build's first step, when a platform's RUN steps cannot run here.

    `isolation` is the one the build will use (None: the one `auto` picks).
    """
    foreign = [p for p in platforms if not is_native(p)]
    if not foreign:
        return
    mode = isolation or _chosen_isolation()
    handlers = host_handlers()
    for platform in foreign:
        emulator(platform, mode, handlers)


def _chosen_isolation() -> str:
    from lamina.engine.sandbox import isolation

    try:
        return isolation.choose(isolation.requested()).isolation.value
    except SandboxError:
        return "userns"  # the build will say why it cannot isolate; not this check's business


def runnable(isolation: str | None = None) -> tuple[tuple[Platform, str], ...]:
    """(platform, how) for each commonly built platform this host runs, for `lamina info`;
    how is Emulator.describe() or why not."""
    mode = isolation or _chosen_isolation()
    handlers = host_handlers()
    out = []
    for platform in LISTED:
        try:
            out.append((platform, emulator(platform, mode, handlers).describe()))
        except SandboxError as err:
            out.append((platform, f"{platform}: cannot run ({str(err).split(' host: ', 1)[-1]})"))
    return tuple(out)
