"""ctypes bindings for the namespace and mount system calls CPython 3.11 lacks.

Imported by the helper process, whose start-up time is the sandbox's
start-up time: only `ctypes` and `os` here, no dataclasses, enum or re.
Every call raises OSError with errno and the path involved, like `os`.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2

PR_SET_PDEATHSIG = 1

_SYS_PIVOT_ROOT_BY_ARCH = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(result: int, what: str, path: str | None = None) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {fstype or 'bind'}", target
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT_BY_ARCH.get(os.uname().machine, 155)
    _check(_libc.syscall(number, _b(new_root), _b(put_old)), "pivot_root", new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def set_parent_death_signal(signum: int) -> None:
    prctl(PR_SET_PDEATHSIG, signum)


def prctl(option: int, arg2: int = 0) -> None:
    _check(_libc.prctl(option, arg2, 0, 0, 0), f"prctl({option})")


# The new mount API, for overlay stacks whose options exceed one page.
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT, _SYS_MOVE_MOUNT = 430, 431, 432, 429  # same on all 64-bit arches
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
_FSOPEN_CLOEXEC = 1
_FSMOUNT_CLOEXEC = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4
_AT_FDCWD = -100


def _syscall_fd(what: str, path: str | None, number: int, *args: object) -> int:
    fd = _libc.syscall(number, *args)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return fd


def mount_fs(fstype: str, target: str, options: list[tuple[str, str | None]]) -> None:
    """Mount `fstype` at `target`, options set one by one (key, value or None for a flag)."""
    fs = _syscall_fd(f"fsopen {fstype}", target, _SYS_FSOPEN, fstype.encode(), _FSOPEN_CLOEXEC)
    try:
        for key, value in options:
            if value is None:
                args = (fs, FSCONFIG_SET_FLAG, key.encode(), None, 0)
            else:
                args = (fs, FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0)
            _syscall_fd(f"mount {fstype}: {key}", value, _SYS_FSCONFIG, *args)
        _syscall_fd(f"mount {fstype}", target, _SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0)
        mnt = _syscall_fd(f"mount {fstype}", target, _SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, 0)
        try:
            flags = _MOVE_MOUNT_F_EMPTY_PATH
            _syscall_fd(f"mount {fstype}", target, _SYS_MOVE_MOUNT, mnt, b"", _AT_FDCWD, _b(target), flags)
        finally:
            os.close(mnt)
    finally:
        os.close(fs)
