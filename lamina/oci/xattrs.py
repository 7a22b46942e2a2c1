"""Extended attributes as an image carries them (PAX `SCHILY.xattr.NAME` records).

What belongs in a layer: every xattr but overlayfs's bookkeeping
(`trusted.overlay.*`, `user.overlay.*`), the host's SELinux label and
lamina's own records (`user.lamina.*`, see `lamina.oci.recorded`).

Two translations keep an image's xattrs exact whoever builds it:

- A file capability set inside a user namespace is stored by the kernel as
  a v3 `security.capability` naming the namespace's root (its host uid);
  read from outside that namespace it shows as v3. A layer carries the
  plain v2 form, as a root build writes it, so `as_v2` drops the root id.
- Where this process may not set an xattr (a plain uid setting
  `security.capability` or `trusted.*`), `write` keeps it as
  `user.lamina.xattr.NAME` on the file instead; `from_disk` (used by the
  layer capture and every copy) reads it back under its own name, so it
  reaches the layer as NAME and never as lamina's record.

Helper-side: the stdlib only.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterable

CAPABILITY = "security.capability"
RECORDED_PREFIX = "user.lamina.xattr."
_LAMINA_PREFIX = "user.lamina."
SKIPPED_PREFIXES = ("trusted.overlay.", "user.overlay.", "security.selinux")
# setxattr errors that mean "not here, not by you", as opposed to a broken file system.
_NOT_PERMITTED = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP)

_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000
_VFS_CAP_FLAGS_EFFECTIVE = 0x000001


def as_v2(value: bytes) -> bytes:
    """A v3 (namespaced) `security.capability` value as the v2 one; others unchanged."""
    if len(value) != 24:
        return value
    (magic,) = struct.unpack_from("<I", value)
    if magic & _VFS_CAP_REVISION_MASK != _VFS_CAP_REVISION_3:
        return value
    return struct.pack("<I", _VFS_CAP_REVISION_2 | (magic & _VFS_CAP_FLAGS_EFFECTIVE)) + value[4:20]


def from_disk(pairs: Iterable[tuple[str, bytes]], records: bool = True) -> tuple[tuple[str, bytes], ...]:
    """The xattrs a file's on-disk ones stand for in an image, sorted by name.

    `user.lamina.xattr.NAME` becomes NAME (a real NAME on the file wins);
    other `user.lamina.*` records, overlayfs's and SELinux's are left out.
    Without `records` (a file lamina did not write: the build context) every
    `user.lamina.*` is left out, so no one else's file stands for a record.
    """
    found: dict[str, bytes] = {}
    recorded: dict[str, bytes] = {}
    for name, value in pairs:
        if name.startswith(RECORDED_PREFIX):
            if records:
                recorded[name[len(RECORDED_PREFIX) :]] = value
        elif not name.startswith(SKIPPED_PREFIXES) and not name.startswith(_LAMINA_PREFIX):
            found[name] = value
    for name, value in recorded.items():
        if not name.startswith(SKIPPED_PREFIXES):
            found.setdefault(name, value)
    if CAPABILITY in found:
        found[CAPABILITY] = as_v2(found[CAPABILITY])
    return tuple(sorted(found.items()))


def read_raw(path: str) -> list[tuple[str, bytes]]:
    """Every xattr of `path` (not followed) as stored; [] where the file system has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # ENOTSUP on file systems without xattrs
        return []
    found = []
    for name in sorted(names):
        try:
            found.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:  # removed meanwhile, or not readable by us
            continue
    return found


def read(path: str, records: bool = True) -> tuple[tuple[str, bytes], ...]:
    """The image xattrs of `path` (not followed), sorted by name (see `from_disk`)."""
    return from_disk(read_raw(path), records)


def write(
    target: int | str, pairs: Iterable[tuple[str, bytes]], *, symlink: bool = False, record: bool = True
) -> list[str]:
    """Set image xattrs `pairs` on `target` (a descriptor, or a path not followed).

    Set after chown, which clears `security.capability`. One this process
    may not set is recorded as `user.lamina.xattr.NAME` (a symlink cannot
    hold `user.` xattrs, so there it is an error naming the xattr); with
    `record` False (an export: lamina's records stay out of it) it is
    skipped instead. Returns the names not set as themselves.
    """
    follow = isinstance(target, int)
    missed = []
    for name, value in pairs:
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
            continue
        except OSError as err:
            if err.errno not in _NOT_PERMITTED or name.startswith("user."):
                raise
            missed.append(name)
            if not record:
                continue
            if symlink:
                raise OSError(err.errno, f"cannot set xattr {name} on a symlink ({err.strerror})") from None
        os.setxattr(target, RECORDED_PREFIX + name, value, follow_symlinks=follow)
    return missed


def lchown_keeping(path: str, uid: int, gid: int) -> None:
    """lchown that keeps a regular file's setuid/setgid bits and file capability.

    The kernel clears both on chown; BuildKit's copier (fsutil) sets the mode
    and xattrs after the owner, so a privileged binary given to another
    owner (COPY/ADD --chown) stays privileged.
    """
    st = os.lstat(path)
    kept: tuple[int, bytes | None] | None = None
    if stat.S_ISREG(st.st_mode):
        try:
            capability: bytes | None = os.getxattr(path, CAPABILITY, follow_symlinks=False)
        except OSError:
            capability = None
        if capability is not None or st.st_mode & 0o6000:
            kept = (stat.S_IMODE(st.st_mode), capability)
    os.lchown(path, uid, gid)
    if kept is not None:
        mode, capability = kept
        if capability is not None:
            os.setxattr(path, CAPABILITY, capability, follow_symlinks=False)
        os.chmod(path, mode)
