"""ADD of a local tar archive: unpacked into the destination, not copied.

A local source file that is a tar archive, plain or compressed with gzip,
bzip2, xz or zstd, is unpacked into the destination directory instead of
copied (unless `--unpack=false`); every path in it is hostile and goes
through the layer extractor's checks. Only an archive named as a source is
unpacked, never one inside a copied directory (as BuildKit does).
"""

from __future__ import annotations

import bz2
import contextlib
import fnmatch
import lzma
import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lamina.engine.steps.copyadd.placement import make_dest_dirs
from lamina.engine.steps.copyadd.selection import Selection
from lamina.engine.steps.owners import chown, chown_all, container_owner
from lamina.errors import BuildError, LaminaError
from lamina.oci.compression import open_decompressed, read_upto
from lamina.oci.entry import EntryType
from lamina.oci.extract import Whiteouts, extract_layer, iter_layer
from lamina.oci.safepath import UnsafePath, safe_join


def is_archive(path: str) -> bool:
    """True when `path` holds a tar, plain or gzip/bzip2/xz/zstd compressed."""
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return True
    if not head.startswith((b"BZh", b"\xfd7zXZ\x00", b"\x1f\x8b", b"\x28\xb5\x2f\xfd")):
        return False
    try:
        with _archive_stream(path) as stream:
            block = read_upto(stream, 512)
    except (OSError, EOFError, lzma.LZMAError, LaminaError):
        return False
    return len(block) >= 262 and block[257:262] == b"ustar"


@contextlib.contextmanager
def _archive_stream(path: str) -> Iterator[BinaryIO]:
    """The uncompressed tar stream of an archive file."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"BZh"):
        with bz2.open(path, "rb") as stream:
            yield stream  # type: ignore[misc]
    elif head.startswith(b"\xfd7zXZ\x00"):
        with lzma.open(path, "rb") as stream:
            yield stream  # type: ignore[misc]
    else:
        with open(path, "rb") as raw:
            yield open_decompressed(raw)


def _named_sources(tree: Any, sources: list[str]) -> tuple[set[str], list[list[str]]]:
    """The tree paths the ADD sources name themselves (not files inside a named directory):
    literal paths resolved, and wildcard patterns split into components."""
    literal: set[str] = set()
    patterns: list[list[str]] = []
    for source in sources:
        clean = posixpath.normpath("/" + source).lstrip("/")
        if any(ch in clean for ch in "*?["):
            patterns.append(clean.split("/"))
        else:
            literal.add(tree.resolve(clean))
    return literal, patterns


def _is_named(path: str, literal: set[str], patterns: list[list[str]]) -> bool:
    if path in literal:
        return True
    parts = path.split("/")
    return any(
        len(p) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, p, strict=True))
        for p in patterns
    )


def unpack_archives(
    tree: Any,
    selection: Any,
    upper: Path,
    dest: str,
    owner: Any,
    image: Any,
    sources: list[str],
    late: list[tuple[Path, int, int]] | None = None,
) -> Any:
    """Unpack the archives the sources name into `dest`; return the selection without them.

    Only an archive given as a source is unpacked, never one inside a copied
    directory (as BuildKit does).
    """
    literal, patterns = _named_sources(tree, sources)
    keep = []
    for item in selection.items:
        source = tree.abspath(item.entry.path)
        if (
            item.entry.type is not EntryType.FILE
            or item.entry.socket
            or not _is_named(item.entry.path, literal, patterns)
            or not is_archive(source)
        ):
            keep.append(item)
            continue
        unpack_into(source, item.entry.path, upper, dest, owner, image, late)
    return Selection(selection.made_dirs, tuple(keep))


def unpack_into(
    source: str,
    shown: str,
    upper: Path,
    dest: str,
    owner: Any,
    image: Any,
    late: list[tuple[Path, int, int]] | None = None,
) -> None:
    """Unpack the archive at `source` as a directory at dest, with or without a trailing slash."""
    target, made = make_dest_dirs(upper, dest.strip("/"), image, late)
    base = "" if target == upper else target.relative_to(upper).as_posix()
    with _archive_stream(source) as stream:
        try:
            names = [entry.path for entry in iter_layer(stream)]
        except LaminaError as err:
            raise BuildError(f"ADD {shown}: {err}") from err
    renames = _through_image_links(image, base, names)
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(_archive_stream(source))
        if renames:
            stream = stack.enter_context(_renamed(stream, renames))
        try:
            # No user namespace (proot isolation): owners and device nodes go to xattrs
            # (lamina.oci.recorded), rather than being lost; rootless, device nodes do.
            record = os.geteuid() != 0 and _owners_recorded()
            unprivileged = os.geteuid() != 0 and not record
            extract_layer(
                stream,
                target,
                whiteouts=Whiteouts.APPLY,
                ignore_owners=unprivileged,
                record_owners=record,
                record_devices=True,
                device_placeholders=True,  # as a base layer's: a later RUN can chmod them
            )
        except LaminaError as err:
            raise BuildError(f"ADD {shown}: {err}") from err
    if image is not None:
        _keep_implied_dirs(image, target, base, [renames.get(name, name) for name in names], late)
    # Owners last: unprivileged, a directory given to another id is no longer writable.
    if owner:
        _chown_tree(target, owner)
        chown_all([(path, *owner) for path in made])
    elif os.geteuid() != 0:
        _rootless_archive_owners(source, target)


def _owners_recorded() -> bool:
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    return detect_ids().mode is IdMode.RECORDED


def _resolve_under(image: Any, base: str, rel: str) -> str:
    """`rel` inside the image directory `base`, its symlinks followed with `base`
    as the root (absolute targets restart there, `..` stops there), as
    BuildKit's chrootarchive.Untar into the destination resolves them."""
    from lamina.errors import UnsafePath
    from lamina.oci.safepath import follow_links

    try:
        return follow_links(rel, lambda walked: image.readlink("/" + posixpath.join(base, walked)))
    except UnsafePath:  # a loop: leave the name alone, the extractor refuses what it must
        return rel


def _through_image_links(image: Any, base: str, names: list[str]) -> dict[str, str]:
    """Archive names whose parent directory goes through a symlink of the image,
    mapped to where they land (`var/run/x` -> `run/x` when the image has
    `var/run -> /run`). The last component is never followed: an entry
    replaces a link of its own name, as Untar does."""
    if image is None or not hasattr(image, "readlink"):
        return {}
    parents: dict[str, str] = {}
    renames: dict[str, str] = {}
    for name in names:
        parent, leaf = posixpath.split(name)
        if parent not in parents:
            parents[parent] = _resolve_under(image, base, parent)
        if parents[parent] != parent:
            renames[name] = posixpath.join(parents[parent], leaf) if parents[parent] else leaf
    return renames


@contextlib.contextmanager
def _renamed(stream: BinaryIO, renames: dict[str, str]) -> Iterator[BinaryIO]:
    """A copy of the tar `stream` with its members (and hard link targets) renamed."""
    with tempfile.TemporaryFile() as out:
        with (
            tarfile.open(fileobj=stream, mode="r|") as src,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
        ):
            for info in src:
                name = posixpath.normpath("/" + info.name).lstrip("/")
                info.name = renames.get(name, info.name)
                if info.islnk():
                    link = posixpath.normpath("/" + info.linkname).lstrip("/")
                    info.linkname = renames.get(link, info.linkname)
                dst.addfile(info, src.extractfile(info) if info.isreg() else None)
        out.seek(0)
        yield out  # type: ignore[misc]


def _keep_implied_dirs(
    image: Any, target: Path, base: str, names: list[str], late: list[tuple[Path, int, int]] | None
) -> None:
    """Directories the archive implies without an entry of their own, which
    exist in the image, keep the image's mode, owner and times: Untar's
    MkdirAll leaves an existing directory alone."""
    entries = set(names)
    implied = {parent for name in names for parent in _ancestors(name)} - entries
    owners: list[tuple[Path, int, int]] = []
    for rel in sorted(implied):
        path = target / rel
        st = image.stat("/" + posixpath.join(base, rel))
        if st is None or not stat.S_ISDIR(st.st_mode) or path.is_symlink() or not path.is_dir():
            continue
        os.chmod(path, st.st_mode & 0o7777)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        owners.append((path, *container_owner(st)))
    if late is not None:
        late.extend(owners)
    else:
        chown_all(owners)


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _rootless_archive_owners(source: str, target: Path) -> None:
    """Unprivileged, the extractor could not chown: give the unpacked entries
    the archive's owners inside the user namespace."""
    owners: dict[Path, tuple[int, int]] = {}
    with _archive_stream(source) as stream:
        for entry in iter_layer(stream):
            name = entry.path.rsplit("/", 1)[-1]
            if name.startswith(".wh.") or (entry.uid, entry.gid) == (0, 0):
                continue
            try:
                owners[safe_join(target, entry.path)] = (entry.uid, entry.gid)
            except UnsafePath:
                continue  # the extractor refused it too
    chown_all([(path, uid, gid) for path, (uid, gid) in owners.items() if os.path.lexists(path)])


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            chown(os.path.join(base, name), *owner)
