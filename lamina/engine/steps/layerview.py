"""Read a stage's files through its stack of overlay-form layer directories.

A stage is a list of layer dirs, bottom first, each in the form overlayfs
uses for lower dirs: a 0/0 character device hides the same path below, a
directory marked opaque (`trusted.overlay.opaque` or `user.overlay.opaque`
= "y") hides everything below it. `LayerView` answers "what is at this
path" without merging the stack, following symlinks inside the view (never
out of it), which is what WORKDIR, `--chown` name lookups and USER need.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from collections.abc import Sequence
from pathlib import Path

from lamina.errors import UnsafePath
from lamina.oci import opened
from lamina.oci.overlay import is_opaque, is_whiteout
from lamina.oci.safepath import follow_links


class LayerView:
    """The merged view of `layers` (bottom first); paths are absolute inside the image."""

    def __init__(self, layers: Sequence[Path]) -> None:
        self.layers = tuple(layers)

    def _lookup_exact(self, rel: str) -> tuple[Path, os.stat_result] | None:
        """The top-most entry at `rel` (no symlink resolution), None when absent or whited out."""
        parts = rel.split("/") if rel else []
        for layer in reversed(self.layers):
            candidate = layer.joinpath(*parts)
            try:
                st = candidate.lstat()
            except (FileNotFoundError, NotADirectoryError):
                if self._hidden_below(layer, parts):
                    return None
                continue
            if is_whiteout(st):
                return None
            return candidate, opened.true_stat(st)  # the mode without materialize's grant
        return None

    def _hidden_below(self, layer: Path, parts: list[str]) -> bool:
        """True when an ancestor of `parts` in `layer` is opaque, a whiteout or not a dir."""
        current = layer
        for part in parts[:-1]:
            current = current / part
            try:
                st = current.lstat()
            except FileNotFoundError:
                return False
            if is_whiteout(st) or not stat.S_ISDIR(st.st_mode):
                return True
            if is_opaque(current):
                return True
        return False

    def resolve(self, path: str, *, follow_last: bool = True) -> str | None:
        """The image path `path` points at after following symlinks; None if it does not exist."""

        def readlink(rel: str) -> str | None:
            found = self._lookup_exact(rel)
            if found is None:
                raise FileNotFoundError(rel)
            real, st = found
            return os.readlink(real) if stat.S_ISLNK(st.st_mode) else None

        try:
            return "/" + follow_links(path, readlink, follow_last=follow_last)
        except (FileNotFoundError, UnsafePath):  # missing, or a symlink loop
            return None

    def stat(self, path: str) -> os.stat_result | None:
        resolved = self.resolve(path)
        if resolved is None:
            return None
        found = self._lookup_exact(resolved.lstrip("/"))
        return found[1] if found else None

    def readlink(self, path: str) -> str | None:
        """The target of the symlink at `path` (its parents followed); None if it is not one."""
        resolved = self.resolve(path, follow_last=False)
        found = self._lookup_exact(resolved.lstrip("/")) if resolved is not None else None
        if found is None or not stat.S_ISLNK(found[1].st_mode):
            return None
        return os.readlink(found[0])

    def real_path(self, path: str) -> Path | None:
        """The host path of the top-most copy of the file at `path` (symlinks followed)."""
        resolved = self.resolve(path)
        if resolved is None:
            return None
        found = self._lookup_exact(resolved.lstrip("/"))
        return found[0] if found else None

    def read_text(self, path: str, limit: int = 4 << 20) -> str | None:
        real = self.real_path(path)
        if real is None:
            return None
        try:
            with open(real, "rb") as f:
                return f.read(limit).decode("utf-8", "replace")
        except (IsADirectoryError, PermissionError):
            return None

    def missing_dirs(self, path: str) -> list[str]:
        """Components of absolute `path` that do not exist yet (for mkdir -p), top-down."""
        missing: list[str] = []
        current = "/"
        for part in [p for p in posixpath.normpath(path).split("/") if p]:
            current = posixpath.join(current, part)
            if missing or self.stat(current) is None:
                missing.append(current)
        return missing


# --- materialising part of a view -------------------------------------------------------------


def _listdir(view: LayerView, rel: str) -> list[str]:
    """Names in the merged directory `rel` (relative, resolved), whiteouts and opaque dirs applied."""
    parts = rel.split("/") if rel else []
    names: dict[str, bool] = {}  # name -> visible
    for layer in reversed(view.layers):
        if parts and view._hidden_below(layer, parts):
            break
        host = layer.joinpath(*parts)
        try:
            st = host.lstat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        if is_whiteout(st) or not stat.S_ISDIR(st.st_mode):
            break
        with os.scandir(host) as entries:
            for entry in entries:
                if entry.name in names:
                    continue
                names[entry.name] = not is_whiteout(entry.stat(follow_symlinks=False))
        if parts and is_opaque(host):
            break
    return sorted(name for name, visible in names.items() if visible)


def _copy_meta(
    dst: Path, st: os.stat_result, lost: dict[str, tuple[int, int]] | None = None, real: Path | None = None
) -> None:
    if lost is not None and real is not None and not stat.S_ISLNK(st.st_mode):
        # Where no user namespace could be made, the layer holds the owner in
        # an xattr (lamina.oci.recorded): that is a container owner already.
        from lamina.oci import recorded

        owner = recorded.owner_of(os.fspath(real), (-1, -1))
        if owner != (-1, -1):
            lost[os.fspath(dst)] = owner
            recorded.set_owner(os.fspath(dst), *owner)  # for the tree's entries (and COPY --from keys)
    try:
        os.lchown(dst, st.st_uid, st.st_gid)
    except PermissionError:
        # Unprivileged: the copy stays the caller's. Remember the owner so the
        # caller can give it back inside the user namespace.
        if lost is not None and (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            lost[os.fspath(dst)] = (st.st_uid, st.st_gid)
    if real is not None:  # after chown, which clears security.capability
        from lamina.oci import xattrs

        xattrs.write(os.fspath(dst), xattrs.read(os.fspath(real)), symlink=stat.S_ISLNK(st.st_mode))
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _node(
    view: LayerView,
    rel: str,
    dest: Path,
    dirs: list[tuple[Path, os.stat_result, Path]],
    lost: dict[str, tuple[int, int]],
    links: dict[tuple[int, int], Path] | None = None,
) -> None:
    """Put the view's entry at `rel` into `dest`, recursing into directories.

    Files hard-linked in a layer dir stay linked in `dest` (`links`: inode -> first copy).
    """
    from lamina.oci import filecopy

    found = view._lookup_exact(rel)
    if found is None:
        return
    real, st = found
    target = dest / rel
    if os.path.lexists(target):
        if not stat.S_ISDIR(st.st_mode):
            return
    elif stat.S_ISDIR(st.st_mode):
        target.mkdir()
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(real), target)
        _copy_meta(target, st, lost, real)
        return
    elif stat.S_ISREG(st.st_mode):
        first = links.get((st.st_dev, st.st_ino)) if links is not None and st.st_nlink > 1 else None
        if first is not None:
            os.link(first, target)  # linked in the layer: linked in the copy
            return
        # A copy, not a hard link: linking changes the layer file's ctime,
        # which a concurrent build reading the same file takes for a change.
        filecopy.copy_path(os.fspath(real), os.fspath(target))  # holes stay holes
        if not st.st_size:  # a device node rootless unpacking kept as a placeholder stays one
            from lamina.oci import recorded

            recorded.copy_device(os.fspath(real), os.fspath(target))
        _copy_meta(target, st, lost, real)
        if links is not None and st.st_nlink > 1:
            links[(st.st_dev, st.st_ino)] = target
        return
    else:
        # A FIFO or device node, for COPY --from to copy (a device only where this
        # process may make one: rootless, COPY never sees it, as before).
        try:
            if stat.S_ISFIFO(st.st_mode):
                os.mkfifo(target, 0o600)
            else:
                os.mknod(target, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
        except PermissionError:
            return
        _copy_meta(target, st, lost, real)
        return
    dirs.append((target, st, real))
    os.chmod(target, 0o700 | stat.S_IMODE(st.st_mode))
    for name in _listdir(view, rel):
        _node(view, f"{rel}/{name}" if rel else name, dest, dirs, lost, links)


def materialize(view: LayerView, paths: list[str], dest: Path) -> dict[str, tuple[int, int]]:
    """Make `dest` a read-only-use copy of the view's subtrees at `paths` (absolute image paths).

    Symlinks met on the way to each path are recreated, so that resolving
    the path inside `dest` (chroot-style) reaches the same subtree. Returns
    the (host) owners the copy could not keep, by path under `dest`
    (unprivileged runs only).
    """
    with contextlib.ExitStack() as grants:  # rootless: what is shut to its owner (opened)
        return _materialize(view, paths, dest, grants)


def _materialize(
    view: LayerView, paths: list[str], dest: Path, grants: contextlib.ExitStack
) -> dict[str, tuple[int, int]]:
    lost: dict[str, tuple[int, int]] = {}
    dest.mkdir(parents=True, exist_ok=True)
    dirs: list[tuple[Path, os.stat_result, Path]] = []
    pending = list(paths)
    seen: set[str] = set()
    links: dict[tuple[int, int], Path] = {}
    while pending:
        path = posixpath.normpath("/" + pending.pop()).lstrip("/")
        if path in seen:
            continue
        seen.add(path)
        for layer in view.layers:  # the path's subtree and the directories down to it
            grants.enter_context(opened.opened([layer / path], base=layer))
        # Walk the components; a symlink is recreated and its target queued.
        parts = [p for p in path.split("/") if p]
        done: list[str] = []
        complete = True
        for i, part in enumerate(parts):
            rel = "/".join([*done, part])
            found = view._lookup_exact(rel)
            if found is None:
                complete = False
                break
            real, st = found
            if stat.S_ISLNK(st.st_mode):
                target = dest / rel
                (dest / "/".join(done)).mkdir(parents=True, exist_ok=True)
                if not os.path.lexists(target):
                    os.symlink(os.readlink(real), target)
                link = os.readlink(real)
                base = "/" if link.startswith("/") else "/" + "/".join(done)
                pending.append(posixpath.join(base, link, *parts[i + 1 :]))
                complete = False
                break
            if not stat.S_ISDIR(st.st_mode) and i < len(parts) - 1:
                complete = False
                break
            done.append(part)
            if i < len(parts) - 1 and not (dest / rel).exists():
                (dest / rel).mkdir()
                dirs.append((dest / rel, st, real))
        if complete:
            _node(view, "/".join(parts), dest, dirs, lost, links)
    for target, st, real in reversed(dirs):
        _copy_meta(target, st, lost, real)
    return lost
