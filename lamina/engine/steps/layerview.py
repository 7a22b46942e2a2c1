"""Read a stage's files through its stack of overlay-form layer directories.

A stage is a list of layer dirs, bottom first, each in the form overlayfs
uses for lower dirs: a 0/0 character device hides the same path below, a
directory marked opaque (`trusted.overlay.opaque` or `user.overlay.opaque`
= "y") hides everything below it. `LayerView` answers "what is at this
path" without merging the stack, following symlinks inside the view (never
out of it), which is what WORKDIR, `--chown` name lookups and USER need.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Sequence
from pathlib import Path

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_MAX_SYMLINKS = 40


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: Path | str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


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
            return candidate, st
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
        pending = [p for p in path.split("/") if p and p != "."]
        done: list[str] = []
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            rel = "/".join([*done, part])
            found = self._lookup_exact(rel)
            if found is None:
                return None
            real, st = found
            if stat.S_ISLNK(st.st_mode) and (pending or follow_last):
                hops += 1
                if hops > _MAX_SYMLINKS:
                    return None
                target = os.readlink(real)
                if target.startswith("/"):
                    done = []
                pending = [p for p in target.split("/") if p and p != "."] + pending
                continue
            done.append(part)
        return "/" + "/".join(done)

    def stat(self, path: str) -> os.stat_result | None:
        resolved = self.resolve(path)
        if resolved is None:
            return None
        found = self._lookup_exact(resolved.lstrip("/"))
        return found[1] if found else None

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
