"""Seccomp user notification (helper side): a few of a step's system calls answered by lamina.

A filter returning SECCOMP_RET_USER_NOTIF for chosen system calls hands each
such call to a listener fd. The process holding it reads the call's
arguments (strings from /proc/PID/mem), does what the call should have done
and answers with a value or an errno, or lets the kernel run the call as it
is (CONTINUE). Calls the filter does not name never leave the kernel: a
step pays for nothing it does not call.

Two users: proot isolation (`_proot`: chown, stat, get/set*id, mknod and
exit_group, recorded in xattrs) and a user namespace (`_inside`'s PID 1:
mknod of a device node alone, which a user namespace refuses even to root;
the node becomes a placeholder, `lamina.oci.recorded`, as proot's does).

Helper-side: the stdlib only (os, ctypes, struct, stat).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct

from lamina.oci import recorded

PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 8
RET_ALLOW = 0x7FFF0000
RET_USER_NOTIF = 0x7FC00000
_NOTIF_RECV = 0xC0502100
_NOTIF_SEND = 0xC0182101
_NOTIF_ID_VALID = 0x40082102
_FLAG_CONTINUE = 1
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
X32_BIT = 0x40000000
_CAP_MKNOD = 27

# (audit arch, seccomp syscall number, {name: number}); x86_64 keeps its x32 numbers too.
ARCHES = {
    "x86_64": (
        0xC000003E,
        317,
        {
            "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "mknod": 133, "mknodat": 259,
            "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setresuid": 117,
            "setresgid": 119, "setfsuid": 122, "setfsgid": 123,
            "setgroups": 116, "exit_group": 231, "getuid": 102,
            "geteuid": 107, "getgid": 104, "getegid": 108, "getresuid": 118, "getresgid": 120,
            "stat": 4, "fstat": 5, "lstat": 6, "newfstatat": 262, "statx": 332,
        },
    ),
    "aarch64": (
        0xC00000B7,
        277,
        {
            "fchown": 55, "fchownat": 54, "mknodat": 33, "setuid": 146, "setgid": 144, "setreuid": 145,
            "setregid": 143, "setresuid": 147, "setresgid": 149, "setfsuid": 151, "setfsgid": 152,
            "setgroups": 159,
            "exit_group": 94, "getuid": 174, "geteuid": 175, "getgid": 176, "getegid": 177,
            "getresuid": 148, "getresgid": 150, "fstat": 80, "newfstatat": 79, "statx": 291,
        },
    ),
}  # fmt: skip
MKNOD_CALLS = ("mknod", "mknodat")


class Call:
    """One notification: its id, the calling pid (in the listener holder's PID namespace), the
    call's name ("" for one the filter names by number only), audit arch and six arguments."""

    __slots__ = ("arch", "args", "name", "nid", "nr", "pid")

    def __init__(self, nid: int, pid: int, nr: int, arch: int, args: tuple[int, ...], name: str) -> None:
        self.nid, self.pid, self.nr, self.arch, self.args, self.name = nid, pid, nr, arch, args, name


def supported() -> bool:
    return os.uname().machine in ARCHES


def install_filter(names: tuple[str, ...], *, foreign_notified: bool, no_new_privs: bool) -> int:
    """Load a filter handing `names` of this architecture to a new listener; return its fd
    (close-on-exec). A call of another ABI (i386) is notified too with `foreign_notified`
    (a supervisor that must refuse to follow it), else allowed (the kernel answers it)."""
    arch, seccomp_nr, numbers = ARCHES[os.uname().machine]
    nrs = sorted({numbers[name] for name in names if name in numbers})
    code: list[bytes] = []

    def op(kind: int, jt: int, jf: int, k: int) -> None:
        code.append(struct.pack("=HBBI", kind, jt, jf, k))

    n = len(nrs)
    op(0x20, 0, 0, 4)  # ld arch
    op(0x15, 1, 0, arch)  # native: go on
    op(0x06, 0, 0, RET_USER_NOTIF if foreign_notified else RET_ALLOW)  # another ABI (i386)
    op(0x20, 0, 0, 0)  # ld nr
    op(0x54, 0, 0, ~X32_BIT & 0xFFFFFFFF)  # x32 numbers are the x86_64 ones with a bit set
    for i, nr in enumerate(nrs):
        op(0x15, n - i, 0, nr)
    op(0x06, 0, 0, RET_ALLOW)
    op(0x06, 0, 0, RET_USER_NOTIF)
    program = ctypes.create_string_buffer(b"".join(code))
    fprog = ctypes.create_string_buffer(struct.pack("=HxxxxxxQ", len(code), ctypes.addressof(program)))
    libc = ctypes.CDLL(None, use_errno=True)
    if no_new_privs and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "no_new_privs")
    fd = libc.syscall(seccomp_nr, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_NEW_LISTENER, fprog)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp user notification: {os.strerror(err)}")
    return int(fd)


class Listener:
    """The listener fd's three ioctls: receive a call, check it is still waiting, answer it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.arch, _, numbers = ARCHES[os.uname().machine]
        self.names = {nr: name for name, nr in numbers.items()}
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
        self._recv = ctypes.create_string_buffer(80)
        self._send = ctypes.create_string_buffer(24)

    def receive(self) -> Call | None:
        """The next call, or None when its caller died (ENOENT) or an interrupt came first."""
        buf = self._recv
        ctypes.memset(buf, 0, 80)
        if self.libc.ioctl(self.fd, _NOTIF_RECV, buf) != 0:
            return None
        nid, pid, _flags, nr, arch = struct.unpack_from("=QIIiI", buf.raw)
        args = struct.unpack_from("=6Q", buf.raw, 32)
        name = self.names.get(nr & ~X32_BIT, "") if arch == self.arch else ""
        return Call(nid, pid, nr, arch, args, name)

    def answer(self, nid: int, value: int = 0, error: int = 0, cont: bool = False) -> None:
        """Return `value` (or -`error`) to the caller; `cont`: the kernel runs the call itself."""
        struct.pack_into(
            "=QqiI", self._send, 0, nid, value, -error if error else 0, _FLAG_CONTINUE if cont else 0
        )
        self.libc.ioctl(self.fd, _NOTIF_SEND, self._send)

    def valid(self, nid: int) -> bool:
        """Whether the call still waits: what was read from its memory was its own, not a reused pid's."""
        ident = ctypes.c_uint64(nid)
        return self.libc.ioctl(self.fd, _NOTIF_ID_VALID, ctypes.byref(ident)) == 0


def mknod_args(call: Call) -> tuple[int, int, int, int]:
    """(dirfd, path address, mode, dev) of a mknod or mknodat call."""
    a = call.args
    if call.name == "mknod":
        return AT_FDCWD, a[0], a[1] & 0xFFFFFFFF, a[2]
    return signed(a[0]), a[1], a[2] & 0xFFFFFFFF, a[3]


def is_device(mode: int, dev: int) -> bool:
    """A char or block node other than overlayfs's whiteout (char 0/0, which a namespace may make)."""
    kind = stat.S_IFMT(mode)
    return kind == stat.S_IFBLK or (kind == stat.S_IFCHR and dev != 0)


def record_device(path: str, mode: int, dev: int, umask: int) -> None:
    """Make the placeholder a device mknod would have made at `path` (EEXIST if something is there)."""
    kind = "c" if stat.S_IFMT(mode) == stat.S_IFCHR else "b"
    recorded.make_device(path, kind, os.major(dev), os.minor(dev), mode & ~umask & 0o7777)


def fd_path(pid: int, dirfd: int) -> str:
    """The /proc link of a process's descriptor; AT_FDCWD is its working directory."""
    return f"/proc/{pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"


def signed(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def status_fields(pid: int, names: tuple[str, ...]) -> dict[str, list[str]]:
    """Lines of /proc/PID/status named `names`, split ({} for a process that is gone)."""
    found: dict[str, list[str]] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in names:
                    found[key] = rest.split()
    except OSError:
        pass
    return found


def umask(pid: int) -> int:
    try:
        return int(status_fields(pid, ("Umask",))["Umask"][0], 8)
    except (KeyError, IndexError, ValueError):
        return 0o022


def read_string(pid: int, address: int, limit: int = 4096) -> str:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = b""
        while len(out) < limit:
            chunk = os.pread(fd, 4096 - address % 4096, address)
            if not chunk:
                break
            end = chunk.find(b"\0")
            if end >= 0:
                return (out + chunk[:end]).decode("utf-8", "surrogateescape")
            out += chunk
            address += len(chunk)
        raise OSError(errno.ENAMETOOLONG, "path too long")
    finally:
        os.close(fd)


def mount_id(fd: int) -> int:
    """The mount an open fd is on (its fdinfo's mnt_id): binds of one file system told apart."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return -1


class DeviceRecorder:
    """PID 1 of a user namespace: a step's mknod of a device node, which the kernel refuses
    there even to root, made as its placeholder (`lamina.oci.recorded`) and answered as done;
    the layer written from the upper dir holds the device node, as BuildKit's as root does.

    As the kernel would: a caller without CAP_MKNOD gets EPERM; the node is owned by the
    caller's fsuid and fsgid (the directory's group when it is setgid), the caller's umask
    applied. Only on the mounts in `mounts` (the root file system, the layer; /dev's tmpfs,
    gone after the step as BuildKit's): on a bind or cache mount EPERM, as before.
    """

    def __init__(self, listener: Listener, mounts: tuple[int, ...], made_fd: int = -1) -> None:
        self.listener = listener
        self.mounts = mounts
        self.made_fd = made_fd  # each placeholder's inode and record, for the helper (sandbox._forged)

    def serve_one(self) -> None:
        call = self.listener.receive()
        if call is None:
            return
        if call.name not in MKNOD_CALLS:  # another ABI's call: the kernel answers it
            self.listener.answer(call.nid, cont=True)
            return
        dirfd, address, mode, dev = mknod_args(call)
        if not is_device(mode, dev):
            self.listener.answer(call.nid, cont=True)  # a FIFO, socket or file: no help needed
            return
        try:
            self._mknod(call, dirfd, address, mode, dev)
            error = 0
        except OSError as err:
            error = err.errno or errno.EPERM
        self.listener.answer(call.nid, error=error)

    def _mknod(self, call: Call, dirfd: int, address: int, mode: int, dev: int) -> None:
        fields = status_fields(call.pid, ("CapEff", "Uid", "Gid", "Umask"))
        try:
            caps = int(fields["CapEff"][0], 16)
            fsuid, fsgid = int(fields["Uid"][3]), int(fields["Gid"][3])
            mask = int(fields["Umask"][0], 8)
        except (KeyError, IndexError, ValueError):
            raise OSError(errno.ESRCH, "the caller is gone") from None
        if not caps & (1 << _CAP_MKNOD):
            raise OSError(errno.EPERM, "no CAP_MKNOD")
        text = read_string(call.pid, address)
        name = os.path.basename(text.rstrip("/"))
        if not text or text.endswith("/"):
            raise OSError(errno.EEXIST if name in ("", ".", "..") else errno.ENOENT, "not a new name")
        if name in (".", ".."):
            raise OSError(errno.EEXIST, "exists")
        # Resolved from the caller's root, cwd or dirfd, as the kernel would for it.
        base = f"/proc/{call.pid}/root" if text.startswith("/") else fd_path(call.pid, dirfd)
        parent = os.path.join(base, os.path.dirname(text.rstrip("/")).lstrip("/"))
        parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not self.listener.valid(call.nid):
                raise OSError(errno.ESRCH, "the caller is gone")  # what was read was another's
            if mount_id(parent_fd) not in self.mounts:
                raise OSError(errno.EPERM, "not on the layer's file system")
            parent_st = os.fstat(parent_fd)
            kind = "c" if stat.S_IFMT(mode) == stat.S_IFCHR else "b"
            recorded.make_device(name, kind, os.major(dev), os.minor(dev), mode & ~mask, dir_fd=parent_fd)
            if self.made_fd >= 0:
                ino = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_ino
                value = f"{kind} {os.major(dev)} {os.minor(dev)}".encode().hex()
                os.write(self.made_fd, f"{ino} {recorded.RDEV_XATTR} {value}\n".encode())
            gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else fsgid
            if (fsuid, gid) != (os.getuid(), os.getgid()):
                os.chown(name, fsuid, gid, dir_fd=parent_fd, follow_symlinks=False)
        finally:
            os.close(parent_fd)
