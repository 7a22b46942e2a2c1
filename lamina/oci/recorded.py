"""Owners kept in lamina's metadata where the process may not chown: `user.lamina.*` xattrs.

A plain uid with no user namespace (`docker run --user 1000`, a host with
`user.max_user_namespaces=0`) cannot give a file another owner or make a
device node. There, a layer dir keeps every file as the caller's (which a
layer shows as 0:0) and records what differs on the file itself, as umoci's
rootless unpack does with `user.rootlesscontainers`:

    user.lamina.owner   b"UID:GID"   the container owner, when not 0:0
    user.lamina.rdev    b"c MAJOR MINOR" | b"b MAJOR MINOR"
                        an empty regular file standing for a device node

The xattrs travel with the file through every copy lamina makes (the
sandbox's root filesystem copy, the copy snapshotter's compare, a stage's
materialised tree) and are turned back into the owner and type when a
layer is written (`snapshot.capture`), never reaching the image.

Symlinks and FIFOs cannot carry `user.` xattrs: an owner other than 0:0 on
one of them is an error naming the path, never silently dropped.

Helper-side: the stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import stat

OWNER_XATTR = "user.lamina.owner"
RDEV_XATTR = "user.lamina.rdev"
PREFIX = "user.lamina."


class CannotRecord(OSError):
    """An owner or node that this file type cannot record (a symlink's owner, a FIFO's)."""


def owner_of(path: str, default: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """The recorded container owner of `path` (not followed), else `default`."""
    try:
        value = os.getxattr(path, OWNER_XATTR, follow_symlinks=False)
    except OSError:
        return default
    return parse_owner(value) or default


def parse_owner(value: bytes) -> tuple[int, int] | None:
    try:
        uid, gid = value.split(b":")
        return int(uid), int(gid)
    except ValueError:
        return None


def parse_rdev(value: bytes) -> tuple[str, int, int] | None:
    """("c" | "b", major, minor) of a device placeholder's xattr."""
    try:
        kind, major, minor = value.split()
        if kind not in (b"c", b"b"):
            return None
        return kind.decode(), int(major), int(minor)
    except ValueError:
        return None


def set_owner(path: str, uid: int, gid: int, *, follow: bool = False) -> None:
    """Record (uid, gid) as `path`'s container owner; 0:0 removes the record.

    Raises CannotRecord for a symlink or FIFO given an owner other than 0:0.
    """
    st = os.stat(path) if follow else os.lstat(path)
    if follow:
        path = os.path.realpath(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        if (uid, gid) == (0, 0):
            return
        kind = "symlink" if stat.S_ISLNK(st.st_mode) else "special file"
        raise CannotRecord(1, f"cannot record owner {uid}:{gid} of a {kind} without chown privilege", path)
    with _writable(path, st):
        if (uid, gid) == (0, 0):
            with contextlib.suppress(OSError):
                os.removexattr(path, OWNER_XATTR, follow_symlinks=False)
            return
        os.setxattr(path, OWNER_XATTR, f"{uid}:{gid}".encode(), follow_symlinks=False)


def set_owner_fd(fd: int, uid: int, gid: int) -> None:
    """set_owner for a regular file or directory this process just opened (and may write)."""
    if (uid, gid) != (0, 0):
        os.setxattr(fd, OWNER_XATTR, f"{uid}:{gid}".encode())


@contextlib.contextmanager
def _writable(path: str, st: os.stat_result):  # type: ignore[no-untyped-def]
    """`user.` xattrs need write permission on the inode: lend the owner's w bit meanwhile."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o200 or st.st_uid != os.geteuid():
        yield
        return
    os.chmod(path, mode | 0o200)
    try:
        yield
    finally:
        os.chmod(path, mode)


def make_device(path: str, kind: str, major: int, minor: int, mode: int, dir_fd: int | None = None) -> None:
    """An empty regular file that stands for device node (`kind` "c" or "b") in a layer."""
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
    )
    try:
        os.setxattr(fd, RDEV_XATTR, f"{kind} {major} {minor}".encode())
        os.fchmod(fd, mode & 0o7777)
    finally:
        os.close(fd)
