"""Directory tree -> LayerEntry values, in the layer writer's order.

The walk is depth-first with each directory's names sorted bytewise, which
is exactly `layer.entry_key` order, so `write_layer(entries_from_tree(d))`
streams a whole tree without holding the entry list. File content is never
read here: each FILE entry carries an opener.

Hard links: a regular file whose inode was already seen in this walk becomes
a HARDLINK entry to the first path (in sort order) with that inode, the way
tar and Docker record them. Only regular files are linked; overlayfs hard
links all its whiteout devices to one inode, and those are not files.

With `overlay=True` the tree is read as an overlayfs upper dir and its
whiteouts are turned into OCI form: a char device 0/0 NAME becomes an empty
file `.wh.NAME`, and a directory marked opaque (`trusted.overlay.opaque` or
`user.overlay.opaque` = y) gets a `.wh..wh..opq` child.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from lamina.errors import LayerError
from lamina.oci.entry import EntryType, LayerEntry

# (uid, gid) on the host -> (uid, gid) recorded in the layer, e.g. to map a
# rootless sandbox's subordinate ids back to the container's.
IdMap = Callable[[int, int], tuple[int, int]]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
# overlayfs bookkeeping (opaque, redirect, origin...) is not file content;
# an SELinux label is the host's, not the image's.
_SKIPPED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "security.selinux")


def entries_from_tree(
    root: Path, *, uid_map: IdMap | None = None, overlay: bool = False
) -> Iterator[LayerEntry]:
    """Every file, directory, link and device under `root` (not `root` itself),
    sorted by `entry_key`. Sockets are skipped, as Docker does."""
    try:
        top = _children(os.fspath(root), overlay)
    except OSError as err:
        raise LayerError(f"walk {root}: {err.strerror or err}") from err
    stack: list[tuple[str, str, Iterator[tuple[bytes, str, str | None]]]] = [(os.fspath(root), "", iter(top))]
    first_path: dict[tuple[int, int], str] = {}
    while stack:
        host_dir, prefix, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            continue
        _, layer_name, host_name = child
        layer_path = prefix + layer_name
        if host_name is None:  # a synthesised whiteout entry
            yield LayerEntry(layer_path, EntryType.FILE, 0o644)
            continue
        host_path = os.path.join(host_dir, host_name)
        try:
            entry = _entry(host_path, layer_path, first_path, uid_map)
            if entry is not None and entry.type is EntryType.DIR:
                stack.append((host_path, layer_path + "/", iter(_children(host_path, overlay))))
        except OSError as err:
            raise LayerError(f"walk {root}: {layer_path}: {err.strerror or err}") from err
        if entry is not None:
            yield entry


def _children(host_dir: str, overlay: bool) -> list[tuple[bytes, str, str | None]]:
    """(sort key, name in the layer, name on disk or None) for one directory."""
    children: list[tuple[bytes, str, str | None]] = []
    with os.scandir(host_dir) as it:
        for dirent in it:
            name = dirent.name
            if overlay and _is_whiteout(dirent):
                name = WHITEOUT_PREFIX + name
                children.append((os.fsencode(name), name, None))
            else:
                children.append((os.fsencode(name), name, name))
    if overlay and _is_opaque(host_dir):
        children.append((os.fsencode(OPAQUE_MARKER), OPAQUE_MARKER, None))
    children.sort(key=lambda child: child[0])
    return children


def _is_whiteout(dirent: os.DirEntry[str]) -> bool:
    if dirent.is_dir(follow_symlinks=False) or dirent.is_file(follow_symlinks=False):
        return False
    st = dirent.stat(follow_symlinks=False)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(host_dir: str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(host_dir, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


_KINDS = {
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFCHR: EntryType.CHAR,
    stat.S_IFBLK: EntryType.BLOCK,
    stat.S_IFIFO: EntryType.FIFO,
}


def _entry(
    host_path: str,
    layer_path: str,
    first_path: dict[tuple[int, int], str],
    uid_map: IdMap | None,
) -> LayerEntry | None:
    st = os.lstat(host_path)
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:  # a socket
        return None
    uid, gid = (st.st_uid, st.st_gid) if uid_map is None else uid_map(st.st_uid, st.st_gid)
    size, linkname, opener = 0, "", None
    if kind is EntryType.FILE and st.st_nlink > 1:
        linkname = first_path.setdefault((st.st_dev, st.st_ino), layer_path)
        if linkname != layer_path:
            kind = EntryType.HARDLINK
        else:
            linkname = ""
    if kind is EntryType.FILE:
        size, opener = st.st_size, functools.partial(_open_file, host_path)
    elif kind is EntryType.SYMLINK:
        linkname = os.readlink(host_path)
    is_device = kind in (EntryType.CHAR, EntryType.BLOCK)
    return LayerEntry(
        layer_path,
        kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=uid,
        gid=gid,
        size=size,
        mtime=int(st.st_mtime),
        linkname=linkname,
        devmajor=os.major(st.st_rdev) if is_device else 0,
        devminor=os.minor(st.st_rdev) if is_device else 0,
        # A hard link shares its target's inode, xattrs included.
        xattrs=() if kind is EntryType.HARDLINK else _xattrs(host_path),
        open=opener,
    )


def _open_file(host_path: str) -> BinaryIO:
    # O_NOFOLLOW: the walk saw a regular file here; if a symlink has taken
    # its place since, fail rather than read what the link points at.
    return os.fdopen(os.open(host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def _xattrs(host_path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(host_path, follow_symlinks=False)
    except OSError:  # ENOTSUP on filesystems without xattrs
        return ()
    found = []
    for name in sorted(names):
        if name.startswith(_SKIPPED_XATTR_PREFIXES):
            continue
        try:
            found.append((name, os.getxattr(host_path, name, follow_symlinks=False)))
        except OSError:  # removed meanwhile, or not readable by us
            continue
    return tuple(found)
