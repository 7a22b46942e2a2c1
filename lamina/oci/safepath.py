"""The one door for hostile paths: tar entry names, link targets, COPY sources.

Every such path is first `clean`ed: absolute paths, `..` components and NUL
bytes are refused outright rather than rewritten, because a layer or context
that needs them is broken or hostile, and silently rooting them (as umoci's
CleanPath does) would write somewhere the author did not mean.

A clean path is then resolved inside a root one component at a time, by file
descriptor (`openat` with `O_NOFOLLOW`), so that a symlink planted by an
earlier entry cannot carry a later write out of the root: `Root.open_dir`
refuses any parent component that is a symlink. The last component is never
resolved here; callers act on it with `dir_fd` and no-follow flags.

`resolve_in_root` is the other, read-side policy: follow symlinks as a
chroot would (absolute targets restart at the root, `..` stops at it), for
paths a user names inside an image, such as `COPY --from=stage /lib/x`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from lamina.errors import UnsafePath

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # Linux's MAXSYMLINKS
IMPLICIT_DIR_MODE = 0o755  # parents a layer does not list, as Docker creates them


def clean(name: str) -> str:
    """The canonical relative form of an archive path ('' is the root itself).

    Drops `.` components, repeated and trailing slashes. Raises UnsafePath
    for an absolute path, any `..` component, or a NUL byte.
    """
    if "\0" in name:
        raise UnsafePath("name contains a NUL byte")
    if name.startswith("/"):
        raise UnsafePath("absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafePath("path contains '..'")
    return "/".join(parts)


def split(rel: str) -> tuple[str, str]:
    """('a/b', 'c') for a clean 'a/b/c'; ('', 'c') for 'c'."""
    parent, _, base = rel.rpartition("/")
    return parent, base


def safe_join(root: Path, name: str) -> Path:
    """`root/name` for a hostile `name`, refusing paths through symlinks.

    Path-based (for reading trees lamina itself controls, such as a build
    context); writers into a tree use `Root`, which holds descriptors.
    """
    rel = clean(name)
    path = root
    parts = rel.split("/") if rel else []
    for i, part in enumerate(parts):
        path = path / part
        if i == len(parts) - 1:
            break
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return root / rel  # the rest does not exist: nothing to follow
        if stat.S_ISLNK(mode):
            raise UnsafePath(f"{'/'.join(parts[: i + 1])} is a symlink")
    return path


def resolve_in_root(root: Path, name: str) -> Path:
    """The path `name` denotes inside `root` when `root` is `/`, all symlinks
    followed (absolute targets restart at `root`, `..` stops at it).

    Components that do not exist are kept as they are. Raises UnsafePath
    after 40 symlinks (a loop).
    """
    if "\0" in name:
        raise UnsafePath("name contains a NUL byte")

    def readlink(rel: str) -> str | None:
        candidate = root / rel
        try:
            return os.readlink(candidate) if stat.S_ISLNK(os.lstat(candidate).st_mode) else None
        except OSError:
            return None

    return root / follow_links(name, readlink)


def follow_links(name: str, readlink: Callable[[str], str | None], *, follow_last: bool = True) -> str:
    """`name` (relative to a root, `/`-separated) with its symlinks followed as a chroot
    would: absolute targets restart at the root, `..` stops at it. The one walk for every
    tree lamina reads as an image (a host dir, a stack of layers, an image through ADD).

    `readlink(rel)` gives the target of the symlink at `rel` (a path already walked, no
    leading slash), or None when it is not one; it is asked of every component and may
    raise to end the walk (a missing component, where the caller wants to know). With
    `follow_last` False, a symlink as the last component is kept. Returns the relative
    path, "" for the root; raises UnsafePath after 40 symlinks (a loop).
    """
    todo = [part for part in reversed(name.split("/")) if part not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if done:
                done.pop()
            continue
        target = readlink("/".join([*done, part]))  # asked of the last too: it may not exist
        if target is None or not (todo or follow_last):
            done.append(part)
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise UnsafePath(f"{name}: too many levels of symbolic links")
        if target.startswith("/"):
            done = []
        todo.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
    return "/".join(done)


def remove_tree(path: str | Path, *, dir_fd: int | None = None) -> None:
    """Remove a file, or a directory and everything in it, without following
    symlinks and without recursion: a layer can nest directories deeper than
    Python's stack (shutil.rmtree recurses) or the open-files limit, so this
    holds one descriptor and climbs back up with `..`. Missing is fine."""
    try:
        mode = os.lstat(path, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        os.unlink(path, dir_fd=dir_fd)
        return
    fd = os.open(path, _LIST_FLAGS, dir_fd=dir_fd)
    below: list[str] = []  # names from `path` down to the directory `fd` is
    try:
        while True:
            child = _empty_but_directories(fd)
            if child is not None:
                next_fd = os.open(child, _LIST_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
                below.append(child)
                continue
            if not below:
                break
            parent = os.open("..", _LIST_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(below.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path, dir_fd=dir_fd)


def _empty_but_directories(fd: int) -> str | None:
    """Unlink every non-directory in `fd`; the name of a subdirectory, if any."""
    for name in os.listdir(fd):
        try:
            if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                return name
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            continue
    return None


class Root:
    """A directory that hostile paths are resolved in by descriptor.

    Use as a context manager; `fd` is the root's O_PATH descriptor.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, _DIR_FLAGS)
        # The last directory resolved, kept open: layers list paths in tree
        # order, so the next entry's parent is almost always it or below
        # it, and a deep tree does not cost a walk from the top per entry.
        self._last: tuple[str, int] | None = None

    def close(self) -> None:
        self.forget()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def forget(self) -> None:
        """Drop the remembered directory; call after removing a directory,
        so that a path is never resolved through a stale descriptor."""
        if self._last is not None:
            os.close(self._last[1])
            self._last = None

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_dir(self, rel: str, *, create: bool) -> int | None:
        """A new O_PATH descriptor of directory `rel` (a `clean` path), or
        None when it does not exist and `create` is false.

        Missing directories are made (mode IMPLICIT_DIR_MODE) when `create`
        is true. A component that is a symlink or not a directory raises
        UnsafePath: nothing is ever written through a symlink.
        """
        parts = rel.split("/") if rel else []
        fd, done = self._nearest(parts)
        try:
            for i in range(done, len(parts)):
                next_fd = self._step(fd, parts[i], parts, i, create)
                os.close(fd)
                fd = next_fd
                if fd < 0:
                    return None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self.forget()
        self._last = (rel, os.dup(fd))
        return fd

    @contextlib.contextmanager
    def parent(self, rel: str, *, create: bool) -> Iterator[tuple[int, str] | None]:
        """(descriptor of the parent directory, base name) of a clean non-root
        `rel`, or None when the parent does not exist and `create` is false."""
        parent, base = split(rel)
        fd = self.open_dir(parent, create=create)
        try:
            yield None if fd is None else (fd, base)
        finally:
            if fd is not None:
                os.close(fd)

    def _nearest(self, parts: list[str]) -> tuple[int, int]:
        """A new descriptor of the deepest known directory on the way to
        `parts`, and how many of `parts` it covers: the remembered directory
        or one of its ancestors (reached by `..`, which is never a symlink),
        else the root."""
        if self._last is None:
            return os.dup(self.fd), 0
        last_path, last_fd = self._last
        last_parts = last_path.split("/") if last_path else []
        common = 0
        for mine, theirs in zip(parts, last_parts, strict=False):
            if mine != theirs:
                break
            common += 1
        ups = len(last_parts) - common
        if ups > common:  # as cheap to walk down from the root
            return os.dup(self.fd), 0
        fd = os.dup(last_fd)
        for _ in range(ups):
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
        return fd, common

    @staticmethod
    def _step(fd: int, part: str, parts: list[str], index: int, create: bool) -> int:
        """Descend into parts[index]; -1 when it is missing and not to be created."""
        for attempt in range(2):
            try:
                return os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create or attempt:
                    return -1
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, IMPLICIT_DIR_MODE, dir_fd=fd)
                    os.chmod(part, IMPLICIT_DIR_MODE, dir_fd=fd)  # not subject to the umask
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = "/".join(parts[: index + 1])
                if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                    raise UnsafePath(f"{where} is a symlink; refusing to write through it") from None
                raise UnsafePath(f"{where} is not a directory") from None
        return -1
