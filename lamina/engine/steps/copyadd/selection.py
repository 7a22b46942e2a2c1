"""COPY/ADD source selection: what a COPY writes, and the key of exactly that.

Two plain steps, so the step can check the cache between them and write
only on a miss (`placement.write_selection`):

    selection = select_sources(tree, sources, dest, options, image)
    key = selection_key(tree, selection)          # cache lookup

`tree` is a SourceTree (the build context, or a stage's root filesystem
for `--from`); `image` answers what already exists in the stage being
written to (None for `--link` and `FROM scratch`). Nothing here knows the
sandbox, the cache or the Dockerfile.

Rules (BuildKit's dockerfile2llb + fsutil copy, and the Dockerfile reference):
Rules (BuildKit's dockerfile2llb + fsutil copy, and the Dockerfile reference):
- A source is relative to the tree root; `..` may not leave the build
  context. A top-level source that is a symlink is followed; symlinks met
  inside a copied directory are copied as symlinks.
- A directory source copies its *contents* into the destination; the
  destination directory is created 0755 (or the octal --chmod), owned by the
  --chown user.
- A file goes to `dest/<name>` when dest ends in `/` (or is `.`), when there
  are several sources, or when dest is an existing directory of the image;
  otherwise it becomes `dest` itself, also when it is a wildcard's one
  match (fsutil copies each match as if it had been named).
- Wildcards are Go filepath.Match globs (`*`, `?`, `[...]`, no `**`)
  resolved component by component without following symlinks; a wildcard
  that matches nothing copies nothing (BuildKit's AllowEmptyWildcard); a
  literal source that does not exist is an error.
- `--exclude` patterns (.dockerignore syntax) apply to paths below a
  copied directory, relative to it, and to the files a wildcard matches,
  relative to the wildcard's directory (`COPY --exclude=*.txt hom* /d/`, as
  the Dockerfile reference says); a directory a wildcard matches is copied
  with its contents filtered, never left out whole (fsutil).
- `--parents`: the source path is kept under dest; `a/./b/c` keeps only
  `b/c`. The source is a .dockerignore-style pattern (`**` allowed), and
  the parent directories of what it selects are created with their metadata.
- Owners: `--chown` for everything written; else the build context's files
  are 0:0 and a stage's files keep theirs. `--chmod` (octal or symbolic)
  applies to files and directories, not symlinks.
- The key covers exactly what is written: destination path, type, mode,
  owner, link target, device numbers and content digest, never mtimes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import stat
from collections.abc import Collection, Sequence
from typing import Protocol, runtime_checkable

from lamina.engine.context import SourceTree, TreeEntry, entry_record
from lamina.engine.dockerfile.ignore import DockerIgnore, compile_glob
from lamina.engine.steps.copyadd.chmod import Chmod
from lamina.engine.steps.copyadd.items import CopyItem, Items
from lamina.errors import ContextError
from lamina.oci.digest import Digest
from lamina.oci.entry import EntryType

__all__ = [
    "DIR_MODE",
    "CopyItem",
    "CopyOptions",
    "ImageLookup",
    "MadeDir",
    "Selection",
    "destination_path",
    "resolve_in_image",
    "select_sources",
    "selection_key",
]

DIR_MODE = 0o755  # of the directories a copy makes (unless an octal --chmod)
_MAX_LINK_HOPS = 40  # as the kernel (ELOOP)


class ImageLookup(Protocol):
    """What the stage being written to already holds (LayerView satisfies this)."""

    def stat(self, path: str) -> os.stat_result | None:
        """stat of the absolute image path, symlinks followed; None if missing."""
        ...

    def resolve(self, path: str, *, follow_last: bool = True) -> str | None:
        """The absolute path after following symlinks inside the image; None if missing."""
        ...


@runtime_checkable
class LinkReader(Protocol):
    """An ImageLookup that can also read a symlink, dangling or not (LayerView can)."""

    def readlink(self, path: str) -> str | None:
        """The target of the symlink at the absolute image path; None if it is not one."""
        ...


# --- options and the selection ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CopyOptions:
    chown: tuple[int, int] | None = None  # numeric uid, gid (names resolved by the caller)
    chmod: Chmod | None = None
    excludes: tuple[str, ...] = ()
    parents: bool = False
    source_name: str = "build context"  # for messages: "build context", "stage builder"


@dataclasses.dataclass(frozen=True, slots=True)
class MadeDir:
    """A destination directory to create when missing (BuildKit's MkdirAll)."""

    dest: str
    uid: int
    gid: int
    mode: int = DIR_MODE
    entry: TreeEntry | None = None  # --parents: the source dir whose metadata it takes


@dataclasses.dataclass(frozen=True, slots=True)
class Selection:
    """Everything one COPY/ADD writes, in write order; last write to a path wins.
    `items` is iterated (packed `Items` for a walk's, issue 22), never indexed."""

    made_dirs: tuple[MadeDir, ...]
    items: Collection[CopyItem]


def destination_path(dest: str, workdir: str) -> str:
    """Dest made absolute against WORKDIR, keeping a trailing `/` (it means "directory")."""
    is_dir = dest in ("", ".") or dest.endswith("/") or dest.endswith("/.")
    joined = posixpath.normpath(posixpath.join("/", workdir or "/", dest or "."))
    if joined.startswith("//"):
        joined = joined[1:]
    return joined + "/" if is_dir and joined != "/" else joined


def select_sources(
    tree: SourceTree,
    sources: Sequence[str],
    dest: str,
    options: CopyOptions,
    image: ImageLookup | None = None,
) -> Selection:
    """Decide what COPY `sources` `dest` writes; raises ContextError for a missing source."""
    if not sources:
        raise ContextError("COPY failed: no source files were specified")
    dest_rel = _clean_rel(dest)
    if image is not None:
        dest_rel = resolve_in_image(image, dest_rel)
    picked = _Picked(tree, options, image)
    if options.parents:
        picked.make_dirs(dest_rel)
        for source in sources:
            _select_parents(tree, source, dest_rel, options, picked.excludes, picked.items, picked.made)
        return picked.selection()
    into_dir = dest.endswith("/") or dest in ("", ".") or len(sources) > 1
    for source in sources:
        picked.add_source(source, dest_rel, into_dir)
    return picked.selection()


class _Picked:
    """What one COPY has picked so far: the directories it makes, the items it writes."""

    def __init__(self, tree: SourceTree, options: CopyOptions, image: ImageLookup | None) -> None:
        self.tree = tree
        self.options = options
        self.image = image
        self.made: list[MadeDir] = []
        self.items = Items()
        self.dir_dests: set[str] = set()  # the items' that are directories (is_dir_in_image)
        self.excludes = DockerIgnore(options.excludes, source="--exclude") if options.excludes else None
        self.owner = options.chown if options.chown is not None else (0, 0)
        self.made_dirs_seen: set[str] = set()
        # fsutil's MkdirAll takes an octal --chmod as the mode of the directories it
        # creates (`COPY --chmod=777 f /parent/f` makes /parent 0777); symbolic modes do not.
        octal = options.chmod.octal if options.chmod is not None else None
        self.made_mode = octal if octal is not None else DIR_MODE

    def selection(self) -> Selection:
        self.items.seal()
        return Selection(tuple(self.made), self.items)

    def add(self, item: CopyItem) -> None:
        self.items.append(item)
        if item.entry.type is EntryType.DIR:
            self.dir_dests.add(item.dest)

    def make_dirs(self, path: str) -> None:
        """MkdirAll of `path` and its parents, owned by the --chown user."""
        parts = path.split("/") if path else []
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if sub not in self.made_dirs_seen:
                self.made_dirs_seen.add(sub)
                self.made.append(MadeDir(sub, *self.owner, self.made_mode))

    def is_dir_in_image(self, path: str) -> bool:
        if path in self.made_dirs_seen:
            return True
        if path in self.dir_dests:
            return True
        if self.image is None:
            return False
        st = self.image.stat("/" + path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def add_source(self, source: str, dest_rel: str, dest_is_dir: bool) -> None:
        """One source (a path or a wildcard) to `dest_rel`; `dest_is_dir`: dest ends in `/`,
        is `.`, or there are several sources."""
        tree, options = self.tree, self.options
        rel = _source_rel(tree, source, options)
        wildcard = _has_wildcards(rel)
        matches = _glob(tree, rel, self.excludes) if wildcard else [rel]
        for match in matches:
            real = tree.resolve(match)  # the top-level source follows symlinks
            entry = tree.entry(real)
            if entry is None:
                if wildcard:
                    continue
                raise ContextError(f"COPY failed: file not found in {options.source_name}: {source}")
            if entry.type is EntryType.DIR:
                self.make_dirs(dest_rel)
                for child in tree.walk(real, exclude=self.excludes):
                    target = _join(dest_rel, child.path[len(real) + 1 :] if real else child.path)
                    self.add(_item(tree, target, child, options))
                continue
            # fsutil's prepareTargetDir: a wildcard's matches are copied one by one like a
            # named file, so one match to `foo2.go` writes the file `foo2.go`.
            into_dir = dest_is_dir or self.is_dir_in_image(dest_rel)
            target = _join(dest_rel, posixpath.basename(match)) if into_dir else dest_rel
            if not target:
                raise ContextError(f"COPY failed: cannot copy {source} over the root directory")
            self.make_dirs(posixpath.dirname(target))
            self.add(_item(tree, target, entry, options))


def _item(tree: SourceTree, dest: str, entry: TreeEntry, options: CopyOptions) -> CopyItem:
    if options.chown is not None:
        uid, gid = options.chown
    elif tree.chroot:  # a stage's files keep their owners
        uid, gid = entry.uid, entry.gid
    else:  # the build context is sent as root-owned, as BuildKit's client does
        uid, gid = 0, 0
    mode = entry.mode
    if options.chmod is not None and entry.type is not EntryType.SYMLINK:
        mode = options.chmod.apply(mode, entry.type is EntryType.DIR)
    if entry.type is EntryType.SYMLINK:
        mode = 0o777
    return CopyItem(dest, entry, mode, uid, gid)


def resolve_in_image(image: ImageLookup, rel: str, hops: int = 0) -> str:
    """Follow the image's symlinks along `rel` as far as it exists (fsutil's RootPath).

    Like RootPath, a dangling symlink is followed too: `COPY f /dangling`
    writes the link's target, as BuildKit does, rather than replacing the link.
    """
    if not rel:
        return rel
    resolved = image.resolve("/" + rel)
    if resolved is not None:
        return resolved.lstrip("/")
    parent, name = posixpath.split(rel)
    base = resolve_in_image(image, parent, hops)
    joined = _join(base, name)
    if isinstance(image, LinkReader) and hops < _MAX_LINK_HOPS:
        target = image.readlink("/" + joined)
        if target is not None:
            start = "/" if target.startswith("/") else "/" + base
            return resolve_in_image(image, _clean_rel(posixpath.join(start, target)), hops + 1)
    return joined


def _clean_rel(path: str) -> str:
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    return "" if cleaned == "." else cleaned


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base and name else base or name


def _source_rel(tree: SourceTree, source: str, options: CopyOptions) -> str:
    """A source path relative to the tree; `..` may not climb out of the build context."""
    depth = 0
    for part in source.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0 and not tree.chroot:
                raise ContextError(f"COPY failed: forbidden path outside the {options.source_name}: {source}")
            depth = max(depth, 0)
        elif part not in ("", "."):
            depth += 1
    return _clean_rel(source)


def _has_wildcards(path: str) -> bool:
    """fsutil's containsWildcards: `*`, `?` or `[` not escaped by a backslash."""
    i = 0
    while i < len(path):
        ch = path[i]
        if ch == "\\":
            i += 2
            continue
        if ch in "*?[":
            return True
        i += 1
    return False


def _glob(tree: SourceTree, pattern: str, excludes: DockerIgnore | None) -> list[str]:
    """Paths matching a filepath.Match pattern, in walk order, ignore and --exclude applied."""
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if _has_wildcards(p))
    literal = "/".join(parts[:first])
    base = tree.resolve(literal) if literal else ""
    try:
        regexes = [compile_glob(p) for p in parts[first:]]
    except ValueError as err:
        raise ContextError(f"COPY failed: invalid wildcard {pattern!r}: {err}") from None
    found: list[str] = []

    def descend(directory: str, shown: str, depth: int) -> None:
        try:
            with os.scandir(tree.abspath(directory)) as it:
                names = sorted(d.name for d in it)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as err:
            raise ContextError(f"COPY failed: cannot read {shown or '.'}: {err.strerror}") from None
        last = depth == len(regexes) - 1
        for name in names:
            if regexes[depth].fullmatch(name) is None:
                continue
            path = _join(directory, name)
            shown_path = _join(shown, name)
            entry = tree.entry(path)
            if entry is None:  # left out by .dockerignore
                continue
            if last:
                relative = shown_path[len(literal) + 1 :] if literal else shown_path
                # A matched directory is the root of its own copy, which --exclude
                # never removes (fsutil matches it against paths below the root):
                # `ADD --exclude=* dir* /6` still makes an empty /6.
                is_dir = entry.type is EntryType.DIR or _is_dir(tree, path)
                if excludes is None or is_dir or not excludes.excludes(relative):
                    found.append(shown_path)
            elif entry.type is EntryType.DIR:  # like filepath.Walk: no symlinked dirs
                descend(path, shown_path, depth + 1)

    descend(base, literal, 0)
    return found


def _is_dir(tree: SourceTree, path: str) -> bool:
    """A symlink to a directory counts as one: the top-level source is followed."""
    entry = tree.entry(tree.resolve(path))
    return entry is not None and entry.type is EntryType.DIR


def _select_parents(
    tree: SourceTree,
    source: str,
    dest_rel: str,
    options: CopyOptions,
    excludes: DockerIgnore | None,
    items: Items,
    made: list[MadeDir],
) -> None:
    pivot, sep, pattern = source.partition("/./")
    if not sep:
        pivot, pattern = "", source
    pivot_rel = _source_rel(tree, pivot, options) if pivot else ""
    pattern_rel = _clean_rel(pattern)
    if not pattern_rel:
        raise ContextError(f"COPY --parents failed: empty source path: {source}")
    if _has_wildcards(pivot_rel):
        # `/a/b*/./c/**/e`: every directory the part before the pivot matches is a
        # pivot of its own (BuildKit copies each wildcard match with the pattern).
        bases = [base for base in map(tree.resolve, _glob(tree, pivot_rel, None)) if _is_dir(tree, base)]
    else:
        bases = [tree.resolve(pivot_rel) if pivot_rel else ""]
        if not _has_wildcards(pattern_rel) and tree.entry(tree.resolve(_join(bases[0], pattern_rel))) is None:
            raise ContextError(f"COPY failed: file not found in {options.source_name}: {source}")
    include = DockerIgnore([pattern_rel], source="--parents")
    for base in bases:
        for entry in tree.walk(base, include=include, exclude=excludes):
            relative = entry.path[len(base) + 1 :] if base else entry.path
            target = _join(dest_rel, relative)
            if entry.type is EntryType.DIR and not include.excludes(relative):
                # a parent of what the pattern selects: made with the source dir's
                # metadata (and --chmod/--chown, as fsutil's createParentDirs does)
                parent = _item(tree, target, entry, options)
                made.append(MadeDir(target, parent.uid, parent.gid, parent.mode, entry))
                continue
            items.append(_item(tree, target, entry, options))


# --- the key ------------------------------------------------------------------------------------


def selection_key(tree: SourceTree, selection: Selection) -> Digest:
    """sha256 over what the selection writes (never mtimes); reads only changed files."""
    h = hashlib.sha256()
    for made in selection.made_dirs:
        h.update(made_dir_record(made))
    digests = tree.file_digests([item.entry for item in selection.items])
    first_links: dict[bytes, str] = {}
    for item in selection.items:
        h.update(item_record(tree, item, digests.get(item.entry.path, b"")))
        if item.entry.type is EntryType.FILE and item.entry.nlink > 1:
            first = first_links.setdefault(item.entry.key[:16], item.dest)  # st_dev, st_ino
            if first != item.dest:  # written as a hardlink: the layer differs
                h.update(f"hardlink\0{item.dest}\0{first}\n".encode("utf-8", "surrogateescape"))
    return Digest("sha256", h.hexdigest())


def made_dir_record(made: MadeDir) -> bytes:
    """The bytes the key hashes for a directory the copy makes."""
    return f"mkdir\0{made.dest}\0{made.mode:o}\0{made.uid}\0{made.gid}\n".encode("utf-8", "surrogateescape")


def item_record(tree: SourceTree, item: CopyItem, content: bytes) -> bytes:
    """The bytes the key hashes for one item (`content`: its file's digest, else b""),
    but for hard links, which depend on the items before it (dirkeys stores these bytes)."""
    record = entry_record(item.dest, item.entry, item.mode, item.uid, item.gid, content)
    # The xattrs COPY writes too (a file's ctime, hence its digest's stat key, moves with them).
    found = tree.xattrs(item.entry)
    if found:
        record += b"xattrs\0" + b"".join(b"%s\0%d:%s" % (os.fsencode(n), len(v), v) for n, v in found) + b"\n"
    return record
