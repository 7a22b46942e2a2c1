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
layer is written (`snapshot.capture`, `restore`), never reaching the image.

Device placeholders are also what a user namespace leaves where mknod is
refused (rootless with subordinate ids or a single id): a base layer's
/dev/null, a stage's device nodes, an ADD archive's, so that a rootless
build writes them to its layers and exports byte for byte as root would.

Symlinks and FIFOs cannot carry `user.` xattrs: an owner other than 0:0 on
one of them is an error naming the path, never silently dropped.

Helper-side: the stdlib only.
"""

from __future__ import annotations

import os
import stat

# os and stat alone at import: a user namespace's PID 1 imports this module for every RUN
# (sandbox._notify records device nodes) before pivot_root, and typing or dataclasses
# would cost each step milliseconds. mypy reads any `TYPE_CHECKING` name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from lamina.oci.entry import LayerEntry

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
    mode = stat.S_IMODE(st.st_mode)
    # `user.` xattrs need write permission on the inode: lend the owner's w bit meanwhile.
    lend = not mode & 0o200 and st.st_uid == os.geteuid()
    if lend:
        os.chmod(path, mode | 0o200)
    try:
        if (uid, gid) != (0, 0):
            os.setxattr(path, OWNER_XATTR, f"{uid}:{gid}".encode(), follow_symlinks=False)
            return
        try:  # noqa: SIM105 (contextlib is not imported here: see the imports)
            os.removexattr(path, OWNER_XATTR, follow_symlinks=False)
        except OSError:
            pass
    finally:
        if lend:
            os.chmod(path, mode)


def set_owner_fd(fd: int, uid: int, gid: int) -> None:
    """set_owner for a regular file or directory this process just opened (and may write)."""
    if (uid, gid) != (0, 0):
        os.setxattr(fd, OWNER_XATTR, f"{uid}:{gid}".encode())


def make_device(path: str, kind: str, major: int, minor: int, mode: int, dir_fd: int | None = None) -> None:
    """An empty regular file that stands for device node (`kind` "c" or "b") in a layer."""
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
    )
    try:
        os.setxattr(fd, RDEV_XATTR, f"{kind} {major} {minor}".encode())
        os.fchmod(fd, mode & 0o7777)
    except OSError:
        os.unlink(path, dir_fd=dir_fd)  # no empty file standing for nothing
        raise
    finally:
        os.close(fd)


def device_of(path: str) -> tuple[str, int, int] | None:
    """("c" | "b", major, minor) when `path` (not followed) is a device placeholder, else None."""
    try:
        return parse_rdev(os.getxattr(path, RDEV_XATTR, follow_symlinks=False))
    except OSError:
        return None


def copy_device(src: str, dst: str) -> None:
    """Give the regular file `dst` the device record of `src`, if `src` is a placeholder."""
    device = device_of(src)
    if device is not None:
        kind, major, minor = device
        os.setxattr(dst, RDEV_XATTR, f"{kind} {major} {minor}".encode(), follow_symlinks=False)


def restore(entry: LayerEntry) -> LayerEntry:
    """A layer entry with lamina's records (owner, device placeholder, unsettable xattrs)
    applied and taken off: what the container saw, as a layer carries it."""
    import dataclasses

    from lamina.oci import xattrs
    from lamina.oci.entry import EntryType

    if not any(name.startswith(PREFIX) for name, _ in entry.xattrs):
        return entry
    found = dict(entry.xattrs)
    # `user.lamina.xattr.NAME` (one this process could not set) goes to the layer as NAME.
    changes: dict[str, object] = {"xattrs": xattrs.from_disk(entry.xattrs)}
    owner = parse_owner(found.get(OWNER_XATTR, b""))
    if owner is not None:
        changes["uid"], changes["gid"] = owner
    device = parse_rdev(found.get(RDEV_XATTR, b""))
    if device is not None and entry.type is EntryType.FILE:
        kind, major, minor = device
        changes.update(
            type=EntryType.CHAR if kind == "c" else EntryType.BLOCK,
            devmajor=major,
            devminor=minor,
            size=0,
            open=None,
        )
    return dataclasses.replace(entry, **changes)  # type: ignore[arg-type]
