"""What a step is held by, beyond its namespaces: runc's default spec, as data (helper side).

The masked and read-only paths, the capability bounding set and the
seccomp filter are those of runc's default spec as Docker and BuildKit
fill it in. `RUN --security=insecure` (entitlement `security.insecure`)
is the one way out of them.

Seccomp: Docker's default profile is an allowlist of ~350 system calls
per architecture; what it leaves out (with Docker's 14 capabilities) is
the list below, plus argument rules for clone and personality. lamina
keeps that list as a denylist through Debian's libseccomp, which knows
every architecture's numbers: the list is short enough to read and
review, and a call Docker would refuse is refused here with the same
EPERM. The difference: a system call newer than this list is allowed
(Docker's allowlist refuses it with EPERM too). Foreign architectures are
added as Docker adds them (i386 and x32 on x86_64, arm on aarch64); any
other ABI kills the process, libseccomp's default.

Imported by the helper: os and ctypes only.
"""

from __future__ import annotations

import ctypes
import os

from lamina.engine.sandbox import _libc

# runc's default spec (Docker's oci/defaults, containerd's populateDefaultUnixSpec).
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# Docker's default capabilities: the bounding set a step gets (0xa80425fb).
DEFAULT_CAPS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18,
    "CAP_MKNOD": 27,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}
DEFAULT_CAP_MASK = sum(1 << bit for bit in DEFAULT_CAPS.values())

# What Docker's default profile does not allow without added capabilities: EPERM.
DENIED_SYSCALLS = (
    # kernel modules, kexec, reboot, swap, accounting, quotas
    "create_module",
    "init_module",
    "finit_module",
    "delete_module",
    "get_kernel_syms",
    "query_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "nfsservctl",
    # mounts and namespaces (clone's namespace flags: see CLONE_NAMESPACE_FLAGS)
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "setns",
    "unshare",
    # clocks
    "clock_adjtime",
    "clock_settime",
    "settimeofday",
    "stime",
    "adjtimex",
    # keyrings: not namespaced
    "add_key",
    "request_key",
    "keyctl",
    # reading or steering other processes and the kernel
    "kcmp",
    "bpf",
    "perf_event_open",
    "lookup_dcookie",
    "syslog",
    "userfaultfd",
    "fanotify_init",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "pidfd_getfd",
    # file handles: open_by_handle_at reads any file of the file system
    "name_to_handle_at",
    "open_by_handle_at",
    # NUMA policy
    "get_mempolicy",
    "set_mempolicy",
    "set_mempolicy_home_node",
    "mbind",
    "move_pages",
    "migrate_pages",
    # I/O ports, old and obsolete calls
    "ioperm",
    "iopl",
    "vm86",
    "vm86old",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "vhangup",
)
CLONE_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
# personality(2) values Docker allows: PER_LINUX, UNAME26, PER_LINUX32, both, and the query.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

_ACT_ALLOW = 0x7FFF0000
_EPERM, _ENOSYS = 1, 38
_ATTR_CTL_NNP = 3
_CMP_MASKED_EQ = 7
_ARCH_X86, _ARCH_X32, _ARCH_ARM = 0x40000003, 0x4000003E, 0x40000028
_EXTRA_ARCHES = {"x86_64": (_ARCH_X86, _ARCH_X32), "aarch64": (_ARCH_ARM,)}
_PR_CAPBSET_DROP = 24
_PR_SET_NAME = 15
_PR_SET_DUMPABLE = 4


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _personality_denials() -> list[tuple[int, int]]:
    """(mask, value) pairs whose union is every 32-bit persona but PERSONALITIES.

    libseccomp takes one comparison per argument in a rule, so "none of five
    values" is spelt as masked-equal rules: a persona is refused when it has
    a bit outside PER_LINUX32|UNAME26 and is not the query (all ones), i.e.
    bit 0 set with some other bit clear, or bit 0 clear with an outside bit set.
    """
    allowed_bits = 0
    for value in PERSONALITIES[:-1]:
        allowed_bits |= value
    rules = [(1 | 1 << bit, 1) for bit in range(1, 32)]
    rules += [(1 | 1 << bit, 1 << bit) for bit in range(1, 32) if not allowed_bits & (1 << bit)]
    return rules


def _errno_action(errno: int) -> int:
    return 0x00050000 | (errno & 0xFFFF)


class Filter:
    """A seccomp filter built before pivot_root (the library is the host's) and loaded just before exec."""

    def __init__(self, no_new_privs: bool = False) -> None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError as err:
            raise OSError(
                err.errno or 2, "seccomp: libseccomp.so.2 not found (apt-get install libseccomp2)"
            ) from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = (ctypes.c_uint32,)
        lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
        lib.seccomp_arch_add.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
        lib.seccomp_rule_add_array.argtypes = (
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        )
        lib.seccomp_load.argtypes = (ctypes.c_void_p,)
        self._lib = lib
        self._ctx = lib.seccomp_init(_ACT_ALLOW)
        if not self._ctx:
            raise OSError(12, "seccomp: seccomp_init failed")
        # As Docker: no_new_privs stays off, so setuid programs (su, sudo) keep working.
        # Without CAP_SYS_ADMIN (chroot isolation) the kernel loads a filter only with it on.
        self._check(
            lib.seccomp_attr_set(self._ctx, _ATTR_CTL_NNP, int(no_new_privs)), "no_new_privs attribute"
        )
        for arch in _EXTRA_ARCHES.get(os.uname().machine, ()):
            lib.seccomp_arch_add(self._ctx, arch)  # a kernel without that ABI: native only
        eperm = _errno_action(_EPERM)
        for name in DENIED_SYSCALLS:
            self._rule(eperm, name)
        for flag in CLONE_NAMESPACE_FLAGS:
            self._rule(eperm, "clone", [(0, _CMP_MASKED_EQ, flag, flag)])
        # clone3 passes its flags in memory a filter cannot read: ENOSYS, so libc falls back to clone.
        self._rule(_errno_action(_ENOSYS), "clone3")
        for mask, value in _personality_denials():
            self._rule(eperm, "personality", [(0, _CMP_MASKED_EQ, mask, value)])

    def _rule(self, action: int, name: str, cmps: list[tuple[int, int, int, int]] | None = None) -> None:
        number = self._lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a system call of this architecture
        array = (_ArgCmp * max(1, len(cmps or ())))(*(_ArgCmp(*c) for c in cmps or ()))
        self._check(
            self._lib.seccomp_rule_add_array(self._ctx, action, number, len(cmps or ()), array),
            f"rule for {name}",
        )

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result < 0:
            raise OSError(-result, f"seccomp: {what}: {os.strerror(-result)}")

    def load(self) -> None:
        """Install the filter on this thread; needs CAP_SYS_ADMIN in the user namespace (root inside)."""
        self._check(self._lib.seccomp_load(self._ctx), "load the filter")


def drop_bounding_set(keep_mask: int) -> None:
    """Drop every capability not in `keep_mask` from the bounding set (root's caps after exec)."""
    for cap in range(64):
        if keep_mask & (1 << cap):
            continue
        try:
            _libc.prctl(_PR_CAPBSET_DROP, cap)
        except OSError as err:
            if err.errno == 22:  # EINVAL: past the kernel's last capability
                return
            raise


def hide_process(name: str) -> None:
    """Make this process (PID 1 of a step) show nothing of the builder.

    Its environment is already empty (the runner starts the helper with
    none); this blanks the argument area, which /proc/1/cmdline shows,
    renames it and makes it non-dumpable, so without CAP_SYS_PTRACE a step
    cannot open its /proc/1/environ, /proc/1/mem or /proc/1/fd at all.
    """
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # After "pid (comm)", fields 3.. ; arg_start..env_end are fields 48..51.
    arg_start, arg_end, env_start, env_end = (int(v) for v in fields[45:49])
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        for start, end in ((arg_start, arg_end), (env_start, env_end)):
            if end > start:
                os.pwrite(fd, bytes(end - start), start)
    finally:
        os.close(fd)
    comm = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(_PR_SET_NAME, ctypes.addressof(comm))
    _libc.prctl(_PR_SET_DUMPABLE, 0)
