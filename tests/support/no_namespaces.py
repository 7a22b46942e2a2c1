"""Run a command where namespaces are denied, as in a CI container, without docker.

    python tests/support/no_namespaces.py docker  -- COMMAND...
    python tests/support/no_namespaces.py nouserns -- COMMAND...

`docker`: what docker's default seccomp profile and capabilities deny a
container's root: unshare, setns, mount and clone with any namespace flag
(EPERM), clone3 (ENOSYS, so libc falls back to clone), and CAP_SYS_ADMIN
(dropped from the bounding set, so root's exec loses it).
`nouserns`: a host with user namespaces off (user.max_user_namespaces=0):
only CLONE_NEWUSER is refused, root keeps CAP_SYS_ADMIN.

As root the filter is loaded with CAP_SYS_ADMIN, so no_new_privs stays off
and exec keeps root's capabilities; as a plain user (`docker run --user
1000`) it is loaded with no_new_privs, as the kernel requires. Needs
libseccomp.so.2.
"""

from __future__ import annotations

import ctypes
import os
import sys

_ALLOW, _EPERM, _ENOSYS = 0x7FFF0000, 0x00050001, 0x00050026
_MASKED_EQ = 7
_CLONE_NEWUSER = 0x10000000
_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_PR_CAPBSET_DROP, _CAP_SYS_ADMIN = 24, 21
_ATTR_CTL_NNP = 3


class _Cmp(ctypes.Structure):
    _fields_ = (("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64))


def deny(kind: str) -> None:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_Cmp),
    )
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    ctx = lib.seccomp_init(_ALLOW)
    if lib.seccomp_attr_set(ctx, _ATTR_CTL_NNP, int(os.geteuid() != 0)) < 0:
        raise OSError("seccomp no_new_privs attribute")
    # As docker's profile: x86 and x32 too, so a number no ABI knows (proot cancels
    # a call with -2) is not the "bad architecture" kill.
    lib.seccomp_arch_add.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    for arch in {"x86_64": (0x40000003, 0x4000003E), "aarch64": (0x40000028,)}.get(os.uname().machine, ()):
        lib.seccomp_arch_add(ctx, arch)

    def rule(action: int, name: str, flag: int | None = None) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        cmps = (_Cmp * 1)(_Cmp(0, _MASKED_EQ, flag, flag)) if flag is not None else (_Cmp * 1)()
        if lib.seccomp_rule_add_array(ctx, action, number, 1 if flag is not None else 0, cmps) < 0:
            raise OSError(f"seccomp rule for {name}")

    if kind == "docker":
        for name in ("unshare", "setns", "mount", "umount2", "pivot_root"):
            rule(_EPERM, name)
        for flag in _NAMESPACE_FLAGS:
            rule(_EPERM, "clone", flag)
    else:
        rule(_EPERM, "unshare", _CLONE_NEWUSER)
        rule(_EPERM, "clone", _CLONE_NEWUSER)
    rule(_ENOSYS, "clone3")
    if lib.seccomp_load(ctx) < 0:
        raise OSError("seccomp_load failed")
    if kind == "docker" and os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_CAPBSET_DROP, _CAP_SYS_ADMIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "drop CAP_SYS_ADMIN")


if __name__ == "__main__":
    kind, sep, *command = sys.argv[1:]
    if kind not in ("docker", "nouserns") or sep != "--" or not command:
        sys.exit(__doc__)
    deny(kind)
    os.execvp(command[0], command)
