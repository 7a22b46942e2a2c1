"""Directory tree -> LayerEntry values, in the layer writer's order.

The walk is depth-first with each directory's names sorted bytewise, which
is exactly `layer.entry_key` order, so `write_layer(entries_from_tree(d))`
streams a whole tree without holding the entry list. File content is never
read here: each FILE entry carries an opener.

Hard links: a regular file whose inode was already seen in this walk becomes
a HARDLINK entry to the first path (in sort order) with that inode, the way
tar and Docker record them. Only regular files are linked; overlayfs hard
links all its whiteout devices to one inode, and those are not files.

With `overlay=True` the tree is read as an overlayfs upper dir (see
`overlay.py`) and its whiteouts are turned into OCI form: a char device 0/0
NAME becomes an empty file `.wh.NAME`, and a directory marked opaque gets a
`.wh..wh..opq` child. A step's snapshot is this walk (`snapshot.capture`).

Given a `holder` (an earlier layer's tar, `oci.donor`), a directory's regular
files that are the very inodes that tar was written from, at the same paths,
are neither stat'ed nor encoded: each run of them comes out as one
`Verbatim`, the old tar's members as they are, which the holder matches
member by member against what this walk would write (path, regular file or
hard link to the same first path); a member it cannot vouch for is walked
as usual. Those files still take their place in the hard-link bookkeeping.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, overload

from lamina.errors import LayerError
from lamina.oci import opened, xattrs
from lamina.oci.entry import EntryType, LayerEntry, Verbatim, type_of_mode
from lamina.oci.firstpaths import FirstPaths
from lamina.oci.overlay import OPAQUE_MARKER, WHITEOUT_PREFIX, is_opaque, is_whiteout

# (uid, gid) on the host -> (uid, gid) recorded in the layer, e.g. to map a
# rootless sandbox's subordinate ids back to the container's.
IdMap = Callable[[int, int], tuple[int, int]]

# overlayfs bookkeeping (opaque, redirect, origin...) is not file content;
# an SELinux label is the host's, not the image's.
_SKIPPED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "security.selinux")


class _Run:
    """Consecutive regular files of a directory that the holder has at the same paths:
    their device and (name, inode) each, from the listing alone."""

    __slots__ = ("device", "files")

    def __init__(self, device: int, files: list[tuple[str, int]]) -> None:
        self.device, self.files = device, files


# (name in the layer, lstat; None for a synthesised whiteout or opaque marker; a _Run
# for the files from `name` on that an earlier layer's tar holds)
_Child = tuple[str, os.stat_result | _Run | None]


class Holder(Protocol):
    """An earlier layer's tar whose members this walk may take as they are (`oci.donor.DonorTar`)."""

    def same_files(self, layer_dir: str, host_dir: str, regular: dict[str, int]) -> tuple[int, set[str]]:
        """Of `regular` (name -> inode, from the listing of `host_dir`, the walk's dir at
        layer path `layer_dir`), those the old tar was written from at the same paths, and
        their device."""
        ...

    def take(self, paths: Sequence[str], links: Sequence[str], start: int) -> tuple[int, bytes]:
        """How many of `paths[start:]` (regular files; `links[i]` is the first path of the
        inode of `paths[i]`, itself when it is the first) the old tar has as this walk would
        write them, and those members' bytes; 0 and b"" when not even `paths[start]`'s."""
        ...


Opener = Callable[[str, os.stat_result], Callable[[], BinaryIO] | None]


@overload
def entries_from_tree(
    root: Path | str,
    *,
    uid_map: IdMap | None = None,
    overlay: bool = False,
    opaque_hides: Callable[[str], bool] | None = None,
    content: Opener | None = None,
    holder: None = None,
) -> Iterator[LayerEntry]: ...


@overload
def entries_from_tree(
    root: Path | str,
    *,
    uid_map: IdMap | None = None,
    overlay: bool = False,
    opaque_hides: Callable[[str], bool] | None = None,
    content: Opener | None = None,
    holder: Holder | None,
) -> Iterator[LayerEntry | Verbatim]: ...


def entries_from_tree(
    root: Path | str,
    *,
    uid_map: IdMap | None = None,
    overlay: bool = False,
    opaque_hides: Callable[[str], bool] | None = None,
    content: Opener | None = None,
    holder: Holder | None = None,
) -> Iterator[LayerEntry | Verbatim]:
    """Every file, directory, link and device under `root` (not `root` itself),
    sorted by `entry_key`. Sockets are skipped, as Docker does.

    With `overlay`, whiteouts and opaque markers come out as BuildKit writes
    them: empty regular files, mode 0, owner 0:0. `opaque_hides(dir)`, if
    given, says whether the opaque marker of directory `dir` (a layer path,
    "" for the top) hides anything below; a marker that hides nothing is
    left out (overlayfs marks a directory made where a file was deleted).
    `content(path, lstat)`, if given, may give a regular file's opener instead
    of reading it from disk (an earlier layer's tar holding the same inode).
    With a `holder`, runs of files come out as `Verbatim` values (see above).
    """
    top = os.fspath(root)

    def listing(path: str) -> list[_Child]:
        found = _children(os.path.join(top, path) if path else top, path, overlay, holder)
        if opaque_hides is None or not any(name == OPAQUE_MARKER for name, _ in found):
            return found
        return found if opaque_hides(path) else [child for child in found if child[0] != OPAQUE_MARKER]

    try:
        stack = [("", iter(listing("")))]
    except OSError as err:
        raise LayerError(f"walk {root}: {err.strerror or err}") from err
    first_path = FirstPaths()
    while stack:
        prefix, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            continue
        name, st = child
        layer_path = prefix + name
        if st is None:
            yield LayerEntry(layer_path, EntryType.FILE, 0)
            continue
        if isinstance(st, _Run):
            assert holder is not None  # only a holder's listing has runs
            try:
                yield from _taken(holder, top, prefix, st, first_path, uid_map, content)
            except OSError as err:
                raise LayerError(f"walk {root}: {layer_path}: {err.strerror or err}") from err
            continue
        try:
            entry = _entry(os.path.join(top, layer_path), layer_path, st, first_path, uid_map, content)
            if entry.type is EntryType.DIR:
                stack.append((layer_path + "/", iter(listing(layer_path))))
        except OSError as err:
            raise LayerError(f"walk {root}: {layer_path}: {err.strerror or err}") from err
        yield entry


def _children(host_dir: str, layer_dir: str, overlay: bool, holder: Holder | None) -> list[_Child]:
    """The entries of one directory, in `entry_key` order."""
    children: list[_Child] = []
    with os.scandir(host_dir) as it:
        dirents = list(it)
    regular: dict[str, int] = {}  # name -> inode of the regular files, from d_type and d_ino: no stat
    if holder is not None:
        regular = {dirent.name: dirent.inode() for dirent in dirents if dirent.is_file(follow_symlinks=False)}
    device, held = holder.same_files(layer_dir, host_dir, regular) if holder and regular else (0, set[str]())
    for dirent in dirents:
        if dirent.name in held:
            children.append((dirent.name, _Run(device, [(dirent.name, regular[dirent.name])])))
            continue
        st = opened.true_stat(dirent.stat(follow_symlinks=False))  # without a rootless read's grant
        # Before hard links: overlayfs links all its whiteouts to one inode.
        if overlay and is_whiteout(st):
            children.append((WHITEOUT_PREFIX + dirent.name, None))
        elif type_of_mode(st.st_mode) is not None:  # sockets are left out
            children.append((dirent.name, st))
    if overlay and is_opaque(host_dir):
        children.append((OPAQUE_MARKER, None))
    children.sort(key=lambda child: child[0].encode("utf-8", "surrogateescape"))  # as entry_key
    return _runs(children) if held else children


def _runs(children: list[_Child]) -> list[_Child]:
    """`children` with each run of consecutive held files made one child."""
    merged: list[_Child] = []
    run: _Run | None = None
    for child in children:
        st = child[1]
        if not isinstance(st, _Run):
            merged.append(child)
            run = None
        elif run is None:
            run = st
            merged.append(child)
        else:
            run.files += st.files
    return merged


def _taken(
    holder: Holder,
    top: str,
    prefix: str,
    run: _Run,
    first_path: FirstPaths,
    uid_map: IdMap | None,
    content: Opener | None,
) -> Iterator[LayerEntry | Verbatim]:
    """A run of held files: what the holder takes as it is, the rest walked as `_entry` does."""
    device, files = run.device, run.files
    paths = [prefix + name for name, _ in files]
    # What `_entry` would note, in the same order: each of these inodes is linked from the old
    # layer too (st_nlink > 1), so the first path met is every later path's link target.
    links = first_path.firsts(device, prefix, files)
    at = 0
    while at < len(paths):
        count, data = holder.take(paths, links, at)
        if count:
            end = at + count
            pairs = zip(paths[at:end], links[at:end], strict=True)
            firsts = "\0".join(path for path, first in pairs if first == path)
            yield Verbatim(paths[at], paths[end - 1], firsts, data)
            at = end
            continue
        host_path = os.path.join(top, paths[at])
        st = opened.true_stat(os.lstat(host_path))
        yield _entry(host_path, paths[at], st, first_path, uid_map, content)
        at += 1


def _entry(
    host_path: str,
    layer_path: str,
    st: os.stat_result,
    first_path: FirstPaths,
    uid_map: IdMap | None,
    content: Callable[[str, os.stat_result], Callable[[], BinaryIO] | None] | None = None,
) -> LayerEntry:
    kind = type_of_mode(st.st_mode)
    assert kind is not None  # `_children` leaves sockets out
    uid, gid = (st.st_uid, st.st_gid) if uid_map is None else uid_map(st.st_uid, st.st_gid)
    size, linkname, opener = 0, "", None
    if kind is EntryType.FILE and st.st_nlink > 1:
        first = first_path.first(st.st_dev, st.st_ino, layer_path)
        if first != layer_path:
            kind, linkname = EntryType.HARDLINK, first
    if kind is EntryType.FILE:
        size, opener = st.st_size, (content(layer_path, st) if content is not None and st.st_size else None)
        opener = opener or functools.partial(_open_file, host_path)
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
        xattrs=() if kind is EntryType.HARDLINK else read_xattrs(host_path),
        open=opener,
        linkable=st.st_nlink > 1,  # only such a file can be a `first_path` a HARDLINK names
    )


def _open_file(host_path: str) -> BinaryIO:
    # O_NOFOLLOW: the walk saw a regular file here; if a symlink has taken
    # its place since, fail rather than read what the link points at.
    # Unbuffered: the layer writer reads whole files or CHUNKs, and a buffered reader
    # costs two more system calls a file (isatty, lseek) for nothing.
    return os.fdopen(os.open(host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb", buffering=0)


def read_xattrs(host_path: str) -> tuple[tuple[str, bytes], ...]:
    """The xattrs of `host_path` that belong in a layer, sorted by name.

    lamina's own `user.lamina.*` records are kept, for `snapshot.capture` to
    apply and take off; a namespaced (v3) file capability is read as v2.
    """
    found = []
    for name, value in xattrs.read_raw(host_path):
        if name.startswith(_SKIPPED_XATTR_PREFIXES):
            continue
        found.append((name, xattrs.as_v2(value) if name == xattrs.CAPABILITY else value))
    return tuple(found)
