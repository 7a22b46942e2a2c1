"""ADD's extras over COPY: local tar archives are unpacked, http(s) URLs fetched.

- A local source file that is a tar archive, plain or compressed with gzip,
  bzip2, xz or zstd, is unpacked into the destination directory instead of
  copied (unless `--unpack=false`); every path in it is hostile and goes
  through the layer extractor's checks.
- A URL is downloaded (redirects followed) into a file named after the
  URL's last path component, mode 0600 as BuildKit writes it, with the
  server's Last-Modified time; it is unpacked only with `--unpack=true`. `--checksum=sha256:...`
  is verified before anything is written. The download's content digest is
  what keys the step, so a changed remote file re-runs it.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import email.utils
import hashlib
import lzma
import os
import posixpath
import stat
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lamina.errors import BuildError, ContextError, DiskFull, LaminaError, is_disk_full

if TYPE_CHECKING:
    from lamina.engine.model import StepHost

_MAX_DOWNLOAD = 8 << 30  # refuse anything larger than 8 GiB


@dataclasses.dataclass(frozen=True, slots=True)
class Fetched:
    url: str
    path: Path  # the downloaded bytes, in the store's scratch dir
    digest: str
    name: str  # the file name BuildKit gives it
    mtime: int | None


def _filename(url: str) -> str:
    # Go's path.Base: trailing slashes do not count (`.../dir/` is named `dir`).
    base = posixpath.basename(urllib.parse.urlparse(url).path.rstrip("/"))
    return base if base not in ("", ".", "/") else "__unnamed__"


def fetch_url(executor: StepHost, url: str, checksum: str | None) -> Fetched:
    """Download `url` once per build (memoised on the executor), verifying `checksum`."""
    memo: dict[str, Fetched] = executor.fetched
    found = memo.get(url)
    if found is not None:
        _check(found, checksum)
        return found
    import httpx

    scratch = executor.store.root / "tmp"
    fd, name = tempfile.mkstemp(prefix="add-", dir=scratch)
    h = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out, httpx.stream("GET", url, follow_redirects=True, timeout=60) as reply:
            if reply.status_code != 200:
                raise BuildError(f"ADD {url}: the server answered {reply.status_code}")
            for chunk in reply.iter_bytes(1 << 20):
                size += len(chunk)
                if size > _MAX_DOWNLOAD:
                    raise BuildError(f"ADD {url}: larger than {_MAX_DOWNLOAD} bytes")
                h.update(chunk)
                out.write(chunk)
            modified = reply.headers.get("last-modified")
    except httpx.HTTPError as err:
        os.unlink(name)
        raise BuildError(f"ADD {url}: {err}") from None
    except LaminaError:
        os.unlink(name)
        raise
    except OSError as err:
        os.unlink(name)
        if is_disk_full(err):  # the download's write names no file: say which
            raise DiskFull.writing(name, err).within(f"ADD {url}") from err
        raise
    mtime = None
    if modified:
        try:
            mtime = int(email.utils.parsedate_to_datetime(modified).timestamp())
        except (TypeError, ValueError):
            mtime = None
    fetched = Fetched(url, Path(name), "sha256:" + h.hexdigest(), _filename(url), mtime)
    memo[url] = fetched
    _check(fetched, checksum)
    return fetched


def _check(fetched: Fetched, checksum: str | None) -> None:
    if checksum and checksum != fetched.digest:
        raise BuildError(f"ADD {fetched.url}: digest mismatch: want {checksum}, got {fetched.digest}")


def write_fetched(
    fetched: Fetched,
    upper: Path,
    dest: str,
    owner: Any,
    chmod: Any,
    image: Any,
    late: list[tuple[Path, int, int]] | None = None,
    unpack: bool = False,
) -> None:
    """Put a downloaded file at `dest` (or `dest/NAME` when dest is a directory).

    With `ADD --unpack=true` a downloaded tar archive is unpacked at dest
    instead, as BuildKit's AttemptUnpack does for an HTTP source.
    """
    import shutil

    if unpack and is_archive(str(fetched.path)):
        unpack_into(str(fetched.path), fetched.url, upper, dest, owner, image, late)
        return

    into_dir = dest.endswith("/")
    if not into_dir and image is not None:
        st = image.stat(dest)
        into_dir = st is not None and stat.S_ISDIR(st.st_mode)
    rel = posixpath.join(dest, fetched.name) if into_dir else dest
    directory, made = make_dest_dirs(upper, posixpath.dirname(rel).strip("/"), image, late)
    target = directory / posixpath.basename(rel)
    clear_target(target)
    shutil.copyfile(fetched.path, target)
    uid, gid = owner if owner else (0, 0)
    from lamina.engine.steps.owners import chown_all, set_owner_and_mode

    if owner and made:  # the directories made for it are the --chown owner's, as BuildKit's
        owners = [(path, uid, gid) for path in made]
        if late is not None:
            late.extend(owners)
        else:
            chown_all(owners)

    if fetched.mtime is not None:
        os.utime(target, (fetched.mtime, fetched.mtime))
    set_owner_and_mode(target, uid, gid, chmod.apply(0o600, False) if chmod is not None else 0o600)


# --- local archives -------------------------------------------------------------------------


def is_archive(path: str) -> bool:
    """True when `path` holds a tar, plain or gzip/bzip2/xz/zstd compressed."""
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return True
    if not head.startswith((b"BZh", b"\xfd7zXZ\x00", b"\x1f\x8b", b"\x28\xb5\x2f\xfd")):
        return False
    from lamina.oci.compression import read_upto

    try:
        with _archive_stream(path) as stream:
            block = read_upto(stream, 512)
    except (OSError, EOFError, lzma.LZMAError, LaminaError):
        return False
    return len(block) >= 262 and block[257:262] == b"ustar"


@contextlib.contextmanager
def _archive_stream(path: str) -> Iterator[BinaryIO]:
    """The uncompressed tar stream of an archive file."""
    from lamina.oci.compression import open_decompressed

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
    import fnmatch

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
    from lamina.engine.steps.copy import Selection
    from lamina.oci.entry import EntryType

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
    from lamina.engine.steps.owners import chown_all
    from lamina.oci.extract import Whiteouts, extract_layer

    target, made = make_dest_dirs(upper, dest.strip("/"), image, late)
    with _archive_stream(source) as stream:
        try:
            extract_layer(stream, target, whiteouts=Whiteouts.APPLY, ignore_owners=os.geteuid() != 0)
        except LaminaError as err:
            raise BuildError(f"ADD {shown}: {err}") from err
    # Owners last: unprivileged, a directory given to another id is no longer writable.
    if owner:
        _chown_tree(target, owner)
        chown_all([(path, *owner) for path in made])
    elif os.geteuid() != 0:
        _rootless_archive_owners(source, target)


def _rootless_archive_owners(source: str, target: Path) -> None:
    """Unprivileged, the extractor could not chown: give the unpacked entries
    the archive's owners inside the user namespace."""
    from lamina.engine.steps.owners import chown_all
    from lamina.oci.extract import iter_layer
    from lamina.oci.safepath import UnsafePath, safe_join

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


def clear_target(target: Path) -> None:
    """Remove a file or symlink this step already wrote at `target`, rather than
    write through it (a symlink may point anywhere; a file may be a hard link
    into an earlier layer, see steps/copy.py)."""
    if target.is_symlink() or target.is_file():
        target.unlink()


def make_dest_dirs(
    upper: Path, target_rel: str, image: Any, late: list[tuple[Path, int, int]] | None
) -> tuple[Path, list[Path]]:
    """Create an archive's destination directory; return it and the directories
    made for it (dest and missing parents), which BuildKit's MkdirAll gives the
    --chown owner."""
    from lamina.engine.steps.copy import resolve_in_image
    from lamina.engine.steps.owners import keep_lower_dir_meta

    if image is not None:
        # Through the image's symlinks (`/lnk/` -> /tmp), as COPY and BuildKit go:
        # a directory made at the link's path would hide the link.
        target_rel = resolve_in_image(image, posixpath.normpath("/" + target_rel).lstrip("/"))
    target = upper / target_rel
    if target.exists():
        return target, []
    made: list[Path] = []
    rel = ""
    for part in [p for p in target_rel.split("/") if p]:
        rel = f"{rel}/{part}"
        path = upper / rel.lstrip("/")
        found = image.stat(rel) if image is not None else None
        if found is not None and not stat.S_ISDIR(found.st_mode):
            # BuildKit's MkdirAll fails here too; never turn the file into a directory.
            raise ContextError(f"ADD failed: cannot unpack to non-directory: {rel}")
        if not os.path.lexists(path) and found is None:
            made.append(path)
    target.mkdir(parents=True, mode=0o755)
    if image is not None:
        keep_lower_dir_meta(image, upper, "/" + target_rel, late)
    return target, made


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    from lamina.engine.steps.owners import chown

    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            chown(os.path.join(base, name), *owner)
