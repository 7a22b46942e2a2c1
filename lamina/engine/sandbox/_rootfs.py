"""The sandbox's root filesystem, built inside the user namespace (helper side).

Lower dirs are unpacked layers in overlay form: a whiteout is a 0/0 char
device, an opaque directory carries `user.overlay.opaque` (or
`trusted.overlay.opaque`) = "y". `LayerStack` answers "what does the merged
view hold at this path" without mounting anything, which is how mount
points are placed in a separate top lower dir (never in the upper dir, so
never in a layer) and how the copy snapshotter builds its tree.

Imported by the helper: os and stat only (`lamina.oci.overlay` too).
"""

# Helper start-up is sandbox start-up: try/except/pass here instead of importing contextlib.
# ruff: noqa: SIM105

from __future__ import annotations

import errno
import os
import stat

from lamina.engine.sandbox import _libc
from lamina.oci import filecopy, xattrs
from lamina.oci.overlay import is_opaque, is_whiteout

_MAX_SYMLINKS = 40


class LayerStack:
    """The merged view of overlay-form lower dirs (top-most first), read without mounting."""

    def __init__(self, lowers: list[str]) -> None:
        self.lowers = lowers

    def find(self, rel: str) -> tuple[str, os.stat_result] | None:
        """The host path and lstat of what the merged view shows at `rel`, or None."""
        parts = [p for p in rel.split("/") if p]
        limit = len(self.lowers)
        found: tuple[str, os.stat_result] | None = None
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            found = None
            for i in range(limit):
                path = os.path.join(self.lowers[i], prefix)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if is_whiteout(st):
                    return None
                found = (path, st)
                # An opaque dir, or a dir over a non-dir, hides everything below it.
                if stat.S_ISDIR(st.st_mode) and is_opaque(path):
                    limit = i + 1
                break
            if found is None:
                return None
            if depth < len(parts) and not stat.S_ISDIR(found[1].st_mode):
                return None
        return found


def resolve(rel: str, lstat_at, readlink_at) -> str:  # type: ignore[no-untyped-def]
    """`rel` with every symlink resolved as the container would, never leaving the root.

    `lstat_at(rel)` returns a stat result or None, `readlink_at(rel)` the
    link text; both take root-relative paths. The result is root-relative
    and may name a missing path (its missing tail is taken literally).
    """
    todo = [p for p in rel.split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = "/".join([*done, part])
        st = lstat_at(here)
        if st is not None and stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise OSError(40, "too many levels of symbolic links", "/" + rel)
            target = readlink_at(here)
            if target.startswith("/"):
                done = []
            todo[0:0] = [p for p in target.split("/") if p]
            continue
        done.append(part)
    return "/".join(done)


def resolve_in_stack(stack: LayerStack, rel: str) -> str:
    def lstat_at(r: str) -> os.stat_result | None:
        hit = stack.find(r)
        return None if hit is None else hit[1]

    def readlink_at(r: str) -> str:
        hit = stack.find(r)
        assert hit is not None
        return os.readlink(hit[0])

    return resolve(rel, lstat_at, readlink_at)


def resolve_in_dir(root: str, rel: str) -> str:
    def lstat_at(r: str) -> os.stat_result | None:
        try:
            return os.lstat(os.path.join(root, r))
        except OSError:
            return None

    return resolve(rel, lstat_at, lambda r: os.readlink(os.path.join(root, r)))


def add_mountpoints(stack: LayerStack, layer: str, targets: list[tuple[str, bool]]) -> list[str]:
    """Create in `layer` (a fresh top lower dir) each missing (target, is_dir) mount point.

    Directories already in the stack along the way are recreated in
    `layer` with their owner, mode, xattrs and mtime (overlayfs shows the
    top-most one's), so the merged view keeps them.
    Returns the root-relative resolved targets, in the order given.
    """
    resolved = []
    copied: list[tuple[str, str, os.stat_result]] = []
    for target, is_dir in targets:
        rel = resolve_in_stack(stack, target)
        resolved.append(rel)
        parts = rel.split("/") if rel else []
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            path = os.path.join(layer, prefix)
            if os.path.lexists(path):
                continue
            hit = stack.find(prefix)
            last = depth == len(parts)
            if hit is not None:
                if last:
                    break  # the target exists below; nothing to add
                os.mkdir(path, 0o700)
                copied.append((hit[0], path, hit[1]))
            elif last and not is_dir:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            else:
                os.mkdir(path, 0o755)
    # Last, deepest first: making children changes a directory's mtime.
    for src, dst, st in reversed(copied):
        copy_meta(src, dst, st)
    return resolved


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


_PAGE = 4096


def mount_overlay(lowers: list[str], upper: str, work: str, target: str) -> None:
    """Mount overlayfs; rootless it needs `userxattr` or replacing a directory fails with EIO.

    `volatile` (Linux 5.10) first: fsync and sync in the step return without waiting for the
    disk. A step's upper dir is never fsynced once it is a layer (the store names it by
    rename, as every unpacked dir), so dpkg's fsync per file bought nothing but waiting:
    an apt-get step's wall time swung 2-3x with the disk's other writers. A kernel that
    does not know the option gets the mount without it.
    """
    for extra in (["volatile"], []):
        try:
            _mount_overlay(lowers, upper, work, target, extra)
            return
        except OSError as err:
            if not extra or err.errno != errno.EINVAL:
                raise


def _mount_overlay(lowers: list[str], upper: str, work: str, target: str, extra: list[str]) -> None:
    base = os.path.commonpath([*lowers, upper, work])
    # A mount's options must fit in one page: relative paths keep long stacks short.
    rel = [os.path.relpath(p, base) for p in lowers]
    opts = "lowerdir={},upperdir={},workdir={},userxattr".format(
        ":".join(_escape(p) for p in rel),
        _escape(os.path.relpath(upper, base)),
        _escape(os.path.relpath(work, base)),
    ) + "".join("," + flag for flag in extra)
    if len(opts) >= _PAGE:
        # Still too long: one fsconfig per lower dir (`lowerdir+`, Linux 6.8).
        options: list[tuple[str, str | None]] = [("lowerdir+", p) for p in lowers]
        options += [("upperdir", upper), ("workdir", work), ("userxattr", None)]
        options += [(flag, None) for flag in extra]
        _libc.mount_fs("overlay", target, options)
        return
    cwd = os.open(".", os.O_RDONLY)
    try:
        os.chdir(base)
        _libc.mount("overlay", target, "overlay", 0, opts)
    finally:
        os.fchdir(cwd)
        os.close(cwd)


def merge_copy(lowers: list[str], dest: str) -> None:
    """Copy the merged view of `lowers` into `dest`: the copy snapshotter's rootfs."""
    for layer in reversed(lowers):
        _apply_tree(layer, dest, {})
    set_root_meta(dest)


def set_root_meta(dest: str) -> None:
    """Make `dest` (an upper dir, the mount-point layer, a copied rootfs) a container's "/": 0755, root's.

    overlayfs shows the top-most layer's root, yet layers do not record
    their root and a dir made with mkdtemp is 0700: USER app could not even
    traverse /. Docker's "/" is 0755 root:root too.
    """
    try:
        os.chown(dest, 0, 0)
    except OSError:
        pass  # only the caller is mapped, and it already owns dest
    os.chmod(dest, 0o755)


def _apply_tree(src: str, dest: str, links: dict[tuple[int, int], str]) -> None:
    if is_opaque(src):
        for name in os.listdir(dest):
            _remove(os.path.join(dest, name))
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        s = entry.path
        d = os.path.join(dest, entry.name)
        st = entry.stat(follow_symlinks=False)
        if is_whiteout(st):
            _remove(d)
            continue
        if stat.S_ISDIR(st.st_mode):
            if os.path.lexists(d) and not (os.path.isdir(d) and not os.path.islink(d)):
                _remove(d)
            if not os.path.lexists(d):
                os.mkdir(d, 0o700)
            _apply_tree(s, d, links)
            copy_meta(s, d, st)
            continue
        if os.path.lexists(d):
            _remove(d)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            os.link(links[key], d)
            continue
        copy_node(s, d, st)
        copy_meta(s, d, st)
        if st.st_nlink > 1:
            links[key] = d


def copy_node(src: str, dest: str, st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fd_out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                remaining = st.st_size
                if filecopy.is_sparse(fd_in, remaining):  # holes stay holes
                    filecopy.copy_sparse(fd_in, fd_out, remaining)
                    remaining = 0
                while remaining > 0:
                    n = os.copy_file_range(fd_in, fd_out, min(remaining, 1 << 30))
                    if n == 0:
                        break
                    remaining -= n
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dest)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(dest, 0o600)
    else:
        os.mknod(dest, mode, st.st_rdev)


def copy_meta(src: str, dest: str, st: os.stat_result) -> None:
    """Owner, xattrs (not overlay's own), mode, then times: chown clears setuid, so mode after."""
    try:
        os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
    except OSError:
        pass
    if not stat.S_ISLNK(st.st_mode):
        try:
            names = os.listxattr(src, follow_symlinks=False)
        except OSError:
            names = []
        for name in names:
            if ".overlay." in name:
                continue
            try:
                value = os.getxattr(src, name, follow_symlinks=False)
                # One this process may not set (a file capability, unprivileged) is kept as
                # lamina's record (lamina.oci.xattrs), which the layer capture reads back.
                xattrs.write(dest, [(name, value)])
            except OSError:
                pass
        os.chmod(dest, stat.S_IMODE(st.st_mode))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(path)
    else:
        os.unlink(path)


def remove_tree(path: str) -> None:
    """rm -rf that also enters directories with mode 000 (overlay's work/work).

    Iterative: a hostile layer may nest directories deeper than Python recurses.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    stack = [path]
    while stack:
        current = stack[-1]
        if stat.S_IMODE(os.lstat(current).st_mode) & 0o700 != 0o700:
            os.chmod(current, 0o700)
        subdirs = []
        with os.scandir(current) as it:
            for child in it:
                if child.is_dir(follow_symlinks=False):
                    subdirs.append(child.path)
                else:
                    os.unlink(child.path)
        if subdirs:
            stack.extend(subdirs)
        else:
            os.rmdir(current)
            stack.pop()
