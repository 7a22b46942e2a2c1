"""Source trees for COPY/ADD: the build context, or a stage's root filesystem.

A `SourceTree` is a directory that COPY may read from. For the build context
it applies .dockerignore (pruning whole directories when no `!` exception can
reach inside them) and refuses any path that leaves the directory, by `..`
or through a symlink. For a stage's root filesystem it resolves symlinks as
a chroot would (`/` is the tree's root), since absolute links are normal
there.

File contents are digested through a `StatCache` (passed in, so several
builds share it and a no-op rebuild reads no file), never by mtime.

Paths inside a tree are relative, `/`-separated, clean, with "" for the root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from lamina.cache.statcache import StatCache, StatKey, stat_key
from lamina.engine import statpass
from lamina.engine.buildfiles import dockerfile_ignore_file
from lamina.engine.dockerfile.ignore import DockerIgnore, IgnoreMatch, read_ignore_file
from lamina.errors import ContextError
from lamina.oci import opened, xattrs
from lamina.oci.digest import Digest
from lamina.oci.entry import EntryType, type_of_mode

__all__ = ["SourceTree", "TreeEntry", "bulk", "entry_record", "open_build_context", "open_rootfs"]

_MAX_SYMLINKS = 40  # as Linux's MAXSYMLINKS
# lamina's limits on one walk (BuildKit has none), so that a runaway context (a build
# directory, a home directory) stops with a line saying what to leave out, not after hours.
MAX_CONTEXT_ENTRIES = 10_000_000  # entries looked at by one COPY/ADD source walk (a 1M-file monorepo fits)
MAX_CONTEXT_DEPTH = 1024  # directory levels below the walk's start (PATH_MAX allows ~2048)


_EMPTY_DIGEST = hashlib.sha256(b"").digest()
# Modes and owners as shared int objects: few distinct values in a tree (at most
# one per entry, so no worse than not sharing them).
_SAME: dict[int, int] = {}
_bulk_lock = threading.Lock()
_bulk_depth = 0
_bulk_restore = False


@contextlib.contextmanager
def bulk() -> Iterator[None]:
    """No cycle collection while a big selection is built or written.

    Each full collection visits every live object, and making a million
    entries triggers many of them (a quarter of the CPU of a 100,000-file
    rebuild, more at 1,000,000). Entries, items and digests form no cycles:
    reference counting frees them, and collection resumes after (nested and
    concurrent uses keep it off until the last one ends).
    """
    global _bulk_depth, _bulk_restore
    with _bulk_lock:
        if _bulk_depth == 0:
            _bulk_restore = gc.isenabled()
            gc.disable()
        _bulk_depth += 1
    try:
        yield
    finally:
        with _bulk_lock:
            _bulk_depth -= 1
            if _bulk_depth == 0 and _bulk_restore:
                gc.enable()


_same = _SAME.setdefault


@dataclasses.dataclass(slots=True)
class TreeEntry:
    """One path of a source tree, as lstat saw it (read-only by convention).

    Not a frozen dataclass: one is made per entry of contexts of a million
    files, and a frozen one's __init__ costs four times as much.
    """

    path: str  # relative to the tree root
    type: EntryType
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str = ""  # symlink target
    rdev: int = 0
    key: StatKey = dataclasses.field(default=b"", compare=False)  # packed (statcache.stat_key)
    # A unix socket, which no layer can hold: copied as an empty regular file
    # with its permission bits (fsutil clears the socket bit, and its copier
    # writes a stub), so its content is never read.
    socket: bool = False
    # Hard links: only a FILE with more than one can share its inode with another path.
    nlink: int = 1

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


def entry_record(path: str, entry: TreeEntry, mode: int, uid: int, gid: int, content: bytes) -> bytes:
    """The bytes a content key hashes for one entry: never its mtime or inode."""
    device = f"{os.major(entry.rdev)},{os.minor(entry.rdev)}" if entry.rdev else ""
    fields = (path, entry.type.value, f"{mode:o}", str(uid), str(gid), entry.linkname, device)
    return "\0".join(fields).encode("utf-8", "surrogateescape") + b"\0" + content + b"\n"


class SourceTree:
    """A directory COPY/ADD reads from; see the module docstring."""

    __slots__ = ("_recorded", "_root", "chroot", "ignore", "root", "scope", "stat_cache")

    def __init__(
        self,
        root: Path,
        stat_cache: StatCache,
        ignore: DockerIgnore | None = None,
        chroot: bool = False,
        scope: str | None = None,
    ) -> None:
        self.root = root
        self._root = str(root)
        self.stat_cache = stat_cache
        self.ignore = ignore if ignore else None
        self.chroot = chroot
        self.scope = scope  # the stat cache's persistent scope; None: remember in memory only
        self._recorded: bool | None = None  # a stage tree whose owners are in xattrs (lamina.oci.recorded)

    def __repr__(self) -> str:
        return f"SourceTree({str(self.root)!r}, chroot={self.chroot})"

    def abspath(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root

    def resolve(self, rel: str, follow_last: bool = True) -> str:
        """Resolve `..` and symlinks in `rel` without leaving the tree.

        Missing components are kept as written (the caller reports them).
        Raises ContextError when a build-context path escapes the context.
        """
        pending = [p for p in reversed(rel.split("/")) if p not in ("", ".")]
        resolved: list[str] = []
        followed = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if resolved:
                    resolved.pop()
                elif not self.chroot:
                    raise ContextError(f"{rel}: path is outside of the build context")
                continue
            candidate = "/".join([*resolved, part])
            if pending or follow_last:
                try:
                    st = os.lstat(self.abspath(candidate))
                except OSError:
                    st = None
                if st is not None and stat.S_ISLNK(st.st_mode):
                    followed += 1
                    if followed > _MAX_SYMLINKS:
                        raise ContextError(f"{rel}: too many levels of symbolic links")
                    target = os.readlink(self.abspath(candidate))
                    if target.startswith("/"):
                        if not self.chroot:
                            raise ContextError(
                                f"{rel}: symlink {candidate} -> {target} points outside of the build context"
                            )
                        resolved = []
                    elif not self.chroot and _climbs_out(resolved, target):
                        raise ContextError(
                            f"{rel}: symlink {candidate} -> {target} points outside of the build context"
                        )
                    pending.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                    continue
            resolved.append(part)
        return "/".join(resolved)

    def entry(self, rel: str) -> TreeEntry | None:
        """The entry at `rel` (not following a final symlink), or None if missing or ignored."""
        try:
            st = opened.true_stat(os.lstat(self.abspath(rel)))  # a rootless stage tree's shut dirs
        except (FileNotFoundError, NotADirectoryError):
            return None
        entry = self._entry(rel, st)
        if entry is None or not rel or self.ignore is None:
            return entry
        if not self.excluded(rel):
            return entry
        # An excluded directory still exists when a `!` exception keeps something inside it.
        if entry.type is EntryType.DIR and not self.ignore.can_prune(rel):
            for _ in self.walk(rel):
                return entry
        return None

    def excluded(self, rel: str) -> bool:
        return self.ignore is not None and bool(rel) and self.ignore.excludes(rel)

    def walk(
        self,
        rel: str = "",
        *,
        include: DockerIgnore | None = None,
        exclude: DockerIgnore | None = None,
    ) -> Iterator[TreeEntry]:
        """Entries below the directory `rel`, depth first, by name, ignore applied.

        Symlinks are listed, not followed. `include` (COPY --parents) and
        `exclude` (COPY --exclude) match paths relative to `rel`: an entry is
        listed when `include` matches it or a parent and `exclude` does not.
        A directory that is left out is still listed, before its first
        descendant, when something below it is kept.
        """
        state: IgnoreMatch | None = None
        if self.ignore is not None and rel:
            parts = rel.split("/")
            for depth in range(1, len(parts) + 1):
                state = self.ignore.match("/".join(parts[:depth]), state)
        walk = _Walk(self, len(rel) + 1 if rel else 0, include, exclude)
        yield from walk.entries(rel, state)

    def _owner(self, rel: str, st: os.stat_result) -> tuple[int, int]:
        """A stage's file owner; where no user namespace could be made, its recorded container owner."""
        if not self.chroot or os.geteuid() == 0:
            return st.st_uid, st.st_gid
        if self._recorded is None:
            from lamina.engine.sandbox.idmap import IdMode, detect_ids

            self._recorded = detect_ids().mode is IdMode.RECORDED
        if not self._recorded:
            return st.st_uid, st.st_gid
        from lamina.oci import recorded

        mine = (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
        return recorded.owner_of(self.abspath(rel), (0, 0) if mine else (st.st_uid, st.st_gid))

    def _entry(self, rel: str, st: os.stat_result) -> TreeEntry | None:
        kind = type_of_mode(st.st_mode)
        if kind is None:
            if not stat.S_ISSOCK(st.st_mode):
                return None
            return TreeEntry(
                path=rel,
                type=EntryType.FILE,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                size=0,
                mtime_ns=st.st_mtime_ns,
                key=stat_key(st),
                socket=True,
            )
        if kind is EntryType.FILE and not st.st_size and self.chroot:
            device = self._placeholder(rel, st)
            if device is not None:
                return device
        if kind is EntryType.FILE or kind is EntryType.DIR:  # most entries: no more calls than needed
            uid, gid = self._owner(rel, st) if self.chroot else (st.st_uid, st.st_gid)
            size = st.st_size if kind is EntryType.FILE else 0
            nlink = st.st_nlink if kind is EntryType.FILE else 1
            # One int object per distinct mode and owner, not three per entry (ints above
            # 256 are objects of their own: ~80 bytes an entry of a big context).
            mode = st.st_mode & 0o7777
            mode, uid, gid = _same(mode, mode), _same(uid, uid), _same(gid, gid)
            key = stat_key(st)
            return TreeEntry(rel, kind, mode, uid, gid, size, st.st_mtime_ns, "", 0, key, False, nlink)
        link = os.readlink(self.abspath(rel)) if kind is EntryType.SYMLINK else ""
        uid, gid = self._owner(rel, st)
        return TreeEntry(
            path=rel,
            type=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=uid,
            gid=gid,
            size=st.st_size if kind is EntryType.FILE else 0,
            mtime_ns=st.st_mtime_ns,
            linkname=link,
            rdev=st.st_rdev if kind in (EntryType.CHAR, EntryType.BLOCK) else 0,
            key=stat_key(st),
        )

    def _placeholder(self, rel: str, st: os.stat_result) -> TreeEntry | None:
        """The device node a stage's empty file stands for where mknod was refused (oci.recorded)."""
        from lamina.oci import recorded

        device = recorded.device_of(self.abspath(rel))
        if device is None:
            return None
        kind, major, minor = device
        uid, gid = self._owner(rel, st)
        return TreeEntry(
            path=rel,
            type=EntryType.CHAR if kind == "c" else EntryType.BLOCK,
            mode=stat.S_IMODE(st.st_mode),
            uid=uid,
            gid=gid,
            size=0,
            mtime_ns=st.st_mtime_ns,
            rdev=os.makedev(major, minor),
            key=stat_key(st),
        )

    def file_digest(self, entry: TreeEntry) -> bytes:
        """sha256 of a FILE entry's content (from the stat cache when unchanged)."""
        if entry.socket:
            return _EMPTY_DIGEST
        known = self.stat_cache.known(entry.key, self.scope)
        if known is not None:
            return known
        try:
            return self.stat_cache.digest(self.abspath(entry.path), entry.key, self.scope)
        except OSError as err:
            raise ContextError(f"{entry.path}: cannot read: {err.strerror or err}") from None

    def file_digests(self, entries: Sequence[TreeEntry]) -> dict[str, bytes]:
        """Content digests of the FILE entries among `entries`, by path (hashed in parallel)."""
        files = [e for e in entries if e.type is EntryType.FILE and not e.socket]
        try:
            digests = self.stat_cache.digest_many([(e.path, e.key) for e in files], self.scope, self._root)
        except OSError as err:
            name = os.path.relpath(err.filename, self._root) if err.filename else "?"
            raise ContextError(f"{name}: cannot read: {err.strerror or err}") from None
        found = {e.path: _EMPTY_DIGEST for e in entries if e.socket}
        found.update((e.path, d) for e, d in zip(files, digests, strict=True))
        return found

    def xattrs(self, entry: TreeEntry) -> tuple[tuple[str, bytes], ...]:
        """The image xattrs of an entry (lamina's records only in a tree lamina wrote).

        A file whose digest the stat cache holds is noted there when it has
        none, so an unchanged one costs no listxattr the next time (an xattr
        change moves the ctime, hence the identity).
        """
        if entry.socket:
            return ()
        cache = self.stat_cache if entry.type is EntryType.FILE else None
        if cache is not None and cache.plain(entry.key, self.scope):
            return ()
        found = xattrs.read(self.abspath(entry.path), self.chroot)
        if cache is not None and not found:
            cache.note_plain(entry.key, self.scope)
        return found

    def checksum(self, rel: str = "") -> Digest:
        """One digest over everything below `rel`: paths, types, modes, owners, links, contents."""
        h = hashlib.sha256()
        resolved = self.resolve(rel)
        top = self.entry(resolved) if resolved else None
        # A single file too (RUN --mount=type=bind,source=requirements.txt,...).
        entries = list(self.walk(resolved)) if top is None or top.type is EntryType.DIR else [top]
        digests = self.file_digests(entries)
        for entry in entries:
            content = digests.get(entry.path, b"")
            h.update(entry_record(entry.path, entry, entry.mode, entry.uid, entry.gid, content))
        return Digest("sha256", h.hexdigest())


class _Walk:
    """One walk's filters; `pending` holds left-out directories awaiting a kept descendant."""

    def __init__(
        self, tree: SourceTree, cut: int, include: DockerIgnore | None, exclude: DockerIgnore | None
    ) -> None:
        self.tree = tree
        self.cut = cut
        self.include = include
        self.exclude = exclude
        self.pending: list[TreeEntry] = []

    def entries(self, rel: str, state: IgnoreMatch | None) -> Iterator[TreeEntry]:
        # An explicit stack, not recursion: one generator frame however deep the tree.
        tree = self.tree
        ignore, include, exclude, pending = tree.ignore, self.include, self.exclude, self.pending
        Frame = tuple[str, IgnoreMatch | None, IgnoreMatch | None, IgnoreMatch | None]
        stack: list[tuple[Frame, Iterator[tuple[str, os.stat_result]], TreeEntry | None]] = [
            ((rel, state, None, None), iter(self.children(rel)), None)
        ]
        seen, start = 0, rel
        while stack:
            (rel, state, xstate, istate), children, own = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                if own is not None and pending and pending[-1] is own:
                    pending.pop()
                continue
            name, st = child
            path = f"{rel}/{name}" if rel else name
            seen += 1
            if seen > MAX_CONTEXT_ENTRIES:
                raise ContextError(
                    f"{start or '.'}: more than {MAX_CONTEXT_ENTRIES} files and directories"
                    " (lamina's limit): leave some out with .dockerignore"
                )
            if len(stack) > MAX_CONTEXT_DEPTH:
                raise ContextError(
                    f"{path[:100]}...: more than {MAX_CONTEXT_DEPTH} directory levels deep (lamina's limit)"
                )
            entry = tree._entry(path, st)
            if entry is None:
                continue
            is_dir = entry.type is EntryType.DIR
            keep, descend = True, is_dir
            match = xmatch = imatch = None
            if ignore is not None:
                match = ignore.match(path, state)
                if match.excluded:
                    keep, descend = False, descend and not ignore.can_prune(path)
            if include is not None or exclude is not None:
                local = path[self.cut :]
                if exclude is not None:
                    xmatch = exclude.match(local, xstate)
                    if xmatch.excluded:
                        keep, descend = False, descend and not exclude.can_prune(local)
                if include is not None:
                    imatch = include.match(local, istate)
                    if not imatch.excluded:  # the include pattern did not match
                        keep, descend = False, descend and include.may_match_below(local)
            if keep:
                if pending:  # the left-out parents of a kept entry come first
                    yield from pending
                    pending.clear()
                yield entry
                if is_dir:
                    stack.append(((path, match, xmatch, imatch), iter(self.children(path)), None))
            elif descend:
                pending.append(entry)
                stack.append(((path, match, xmatch, imatch), iter(self.children(path)), entry))

    def children(self, rel: str) -> list[tuple[str, os.stat_result]]:
        """The entries of directory `rel` and their lstat, by name: the build context's
        from the memo's stat pass of this build when it made one (`statpass`)."""
        tree = self.tree
        tree.stat_cache.check_stop()  # a directory at a time: a big context's walk is long
        if tree.scope is not None:
            seen = statpass.take(tree.scope, rel)
            if seen is not None:
                return seen
        try:
            with os.scandir(tree.abspath(rel)) as it:
                return [
                    (e.name, opened.true_stat(e.stat(follow_symlinks=False))) for e in sorted(it, key=_name)
                ]
        except OSError as err:
            raise ContextError(f"{rel or '.'}: cannot read directory: {err.strerror}") from None


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


def _climbs_out(resolved: list[str], target: str) -> bool:
    depth = len(resolved)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def open_build_context(
    root: Path, stat_cache: StatCache, dockerfile: Path | None = None, *, ignore: bool = True
) -> SourceTree:
    """The build context at `root`, with its ignore file.

    `<Dockerfile>.dockerignore` beside a named Dockerfile wins over
    `<root>/.dockerignore`, as in BuildKit. `ignore=False` reads none: a git
    or tar context, which BuildKit fetches itself, is never filtered (the
    ignore file only ever applied to the client's upload of a local directory).
    """
    if not root.is_dir():
        raise ContextError(f"build context {root}: not a directory")
    candidates = [dockerfile_ignore_file(root, dockerfile), root / ".dockerignore"] if ignore else []
    rules = None
    for candidate in candidates:
        try:
            text = candidate.read_text(encoding="utf-8", errors="surrogateescape")
        except (FileNotFoundError, NotADirectoryError):
            continue
        except IsADirectoryError:
            # Silently building without it would send what it meant to leave out.
            raise ContextError(f"{candidate}: is a directory, not an ignore file") from None
        except OSError as err:
            raise ContextError(f"{candidate}: cannot read: {err.strerror}") from None
        rules = read_ignore_file(text, source=str(candidate))
        break
    # A context given as a symlink is the directory it names (docker's CLI evaluates the
    # symlinks of the context path): its root is never copied as the link itself.
    real = os.path.realpath(root)
    return SourceTree(Path(real), stat_cache, ignore=rules, scope=real)


def open_rootfs(root: Path, stat_cache: StatCache) -> SourceTree:
    """A stage's root filesystem (for COPY --from): symlinks resolve inside it.

    Its digests are not persisted: the executor merges a fresh copy each build.
    """
    return SourceTree(root, stat_cache, chroot=True)
