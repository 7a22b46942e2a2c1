"""A step's filesystem change -> a layer.

Both snapshotters leave the change as an overlay-form upper dir (whiteouts
as 0/0 char devices, opaque dirs marked `user.overlay.opaque`), so one
function turns either into layer entries:

- overlay: the kernel writes the upper dir while the command runs;
- copy: `record()` notes the copied rootfs before the command runs and
  `write_diff()` compares after, by inode, ctime, mtime, size, mode and
  owner, hashing content only for files whose ctime moved while all else
  stayed the same. Both run inside the sandbox's user namespace.

`capture()` reads the upper dir as the container saw it: host ids are
translated back through the sandbox's id map, overlay's own xattrs are
dropped, whiteouts become `.wh.NAME` and opaque dirs `.wh..wh..opq`
(recognised before hard links: the kernel links all whiteouts to one inode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, overload, runtime_checkable

from lamina.engine.sandbox._rootfs import LayerStack, copy_meta, copy_node
from lamina.engine.sandbox.idmap import IdMap
from lamina.errors import LaminaError
from lamina.oci import fresh, recorded
from lamina.oci.donor import DonorTar
from lamina.oci.entry import EntryType, LayerEntry, Verbatim
from lamina.oci.walk import entries_from_tree, read_xattrs

if TYPE_CHECKING:
    from lamina.oci.layer import Compression, LayerInfo

OPAQUE_XATTR = "user.overlay.opaque"

# An earlier layer directory this one was linked from, and a fresh reader of the
# uncompressed tar of that directory (see oci.donor): a COPY rerun's blob takes the
# bytes of every file the two share from there instead of reading the file again.
Donor = tuple[Path, Callable[[], BinaryIO]]


@overload
def capture(
    upper_dir: Path, ids: IdMap | None = None, lowers: Sequence[Path] = (), donor: None = None
) -> Iterator[LayerEntry]: ...


@overload
def capture(
    upper_dir: Path, ids: IdMap | None = None, lowers: Sequence[Path] = (), *, donor: DonorTar | None
) -> Iterator[LayerEntry | Verbatim]: ...


def capture(
    upper_dir: Path, ids: IdMap | None = None, lowers: Sequence[Path] = (), donor: DonorTar | None = None
) -> Iterator[LayerEntry | Verbatim]:
    """The layer entries of an upper dir, in `write_layer` order, owners as the container saw them.

    Whiteouts and opaque markers come out as BuildKit writes them: empty
    regular files, mode 0, owner 0:0. Given the `lowers` (top-most first),
    an opaque marker that would hide nothing (overlayfs marks a directory
    made where a file was deleted) is left out, as the copy snapshotter does.
    Rootless with subordinate ids, files a container user kept private are
    unreadable from here: `write_upper()` reads them inside the namespace.
    With a `donor`, files it holds (the same inode) take their content from it, and runs
    of them come out as its tar's members as they are (`Verbatim`, see oci.donor).
    """
    return _restored(_walked(upper_dir, ids, lowers, donor))


def _walked(
    upper_dir: Path, ids: IdMap | None, lowers: Sequence[Path], donor: DonorTar | None
) -> Iterator[LayerEntry | Verbatim]:
    """`capture`'s entries before lamina's records are applied."""
    uid_map = _inside(ids) if ids is not None and ids.rootless else None
    below = functools.partial(_shows_dir, LayerStack([os.fspath(p) for p in lowers])) if lowers else None
    return entries_from_tree(
        upper_dir,
        uid_map=uid_map,
        overlay=True,
        opaque_hides=below,
        content=_content(donor),
        holder=donor,
    )


def _restored(walked: Iterator[LayerEntry | Verbatim]) -> Iterator[LayerEntry | Verbatim]:
    # A donor's members as they are already carry the records applied (oci.donor).
    return (entry if isinstance(entry, Verbatim) else recorded.restore(entry) for entry in walked)


def _content(donor: DonorTar | None) -> Callable[[str, os.stat_result], Callable[[], BinaryIO] | None]:
    """Where a file's bytes come from if not from disk: what a COPY of this process just
    wrote (oci.fresh), else the old layer's tar (a rerun's `donor`)."""
    if donor is None:
        return fresh.opener
    return lambda path, st: fresh.opener(path, st) or donor.opener(path, st)


def _inside(ids: IdMap) -> Callable[[int, int], tuple[int, int]]:
    """Host ids -> the ids the container saw."""
    return lambda uid, gid: (ids.uid_inside(uid), ids.gid_inside(gid))


def _shows_dir(stack: LayerStack, rel: str) -> bool:
    """Whether the lower dirs show a directory at `rel` (an opaque marker there hides something)."""
    hit = stack.find(rel)
    return hit is not None and stat.S_ISDIR(hit[1].st_mode)


@runtime_checkable
class Restartable(Protocol):
    """An output that can drop what was written to it and start again empty (the store's
    blob writer, engine.output): rootless, a layer tried in this process goes there."""

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def discard(self) -> None: ...


class _Unreadable(Exception):
    """A file of the layer the caller may not read as the user namespace's root reads it."""


def write_upper(
    upper_dir: Path,
    out: BinaryIO,
    compression: Compression,
    *,
    lowers: Sequence[Path] = (),
    source_date_epoch: int | None = None,
    ids: IdMap | None = None,
    donor: Donor | None = None,
) -> LayerInfo:
    """Capture `upper_dir` and write it as a layer blob to `out` (only `out.write` is called).

    Rootless with subordinate ids, this runs inside a user namespace, where
    files the container made private to one of its users can be read (the
    `donor`, written as the caller, is not used there); `write_uppers` writes
    the same bytes in this process where it can.
    """
    from lamina.engine.sandbox.idmap import IdMode, detect_ids
    from lamina.oci import layer

    ids = ids or detect_ids()
    if ids.mode is not IdMode.SUBORDINATE:
        return _write_here(upper_dir, out, compression, lowers, source_date_epoch, ids, donor)
    from lamina.engine.sandbox.runner import write_layer_inside
    from lamina.oci.digest import Digest

    fields = write_layer_inside(upper_dir, out, compression.value, lowers, source_date_epoch, ids)
    return layer.LayerInfo(
        digest=Digest.parse(fields["digest"]),
        diff_id=Digest.parse(fields["diff_id"]),
        size=fields["size"],
        media_type=fields["media_type"],
    )


def _write_here(
    upper_dir: Path,
    out: BinaryIO | Restartable,
    compression: Compression,
    lowers: Sequence[Path],
    source_date_epoch: int | None,
    ids: IdMap,
    donor: Donor | None,
) -> LayerInfo:
    """`write_upper` in this process. Rootless with subordinate ids, `_Unreadable` is raised
    (some of the blob written) where a file might read otherwise than the helper reads it."""
    from lamina.engine.sandbox.idmap import IdMode
    from lamina.oci import layer
    from lamina.oci.opened import opened

    subordinate = ids.mode is IdMode.SUBORDINATE
    # Dirs shut to their owner read too; not with subordinate ids, where `opened` would stat
    # the whole tree first and chmod the published layer's inodes: `_as_caller` refuses those.
    lend = contextlib.nullcontext() if subordinate else opened([upper_dir])
    with lend, contextlib.ExitStack() as stack:
        tar = None
        if donor is not None:
            with contextlib.suppress(OSError, LaminaError):  # no donor: every file is read
                tar = stack.enter_context(contextlib.closing(DonorTar(donor[1](), os.fspath(donor[0]))))
        walked = _walked(upper_dir, ids, lowers, tar)
        if not subordinate:
            return layer.write_layer(_restored(walked), out, compression, source_date_epoch=source_date_epoch)  # type: ignore[arg-type]
        try:
            entries = _restored(_as_caller(walked))
            return layer.write_layer(entries, out, compression, source_date_epoch=source_date_epoch)  # type: ignore[arg-type]
        except (OSError, LaminaError) as err:
            if _denied(err):
                raise _Unreadable(str(err)) from err
            raise


def _as_caller(walked: Iterator[LayerEntry | Verbatim]) -> Iterator[LayerEntry | Verbatim]:
    """`walked`, up to the first entry whose bytes the caller might read otherwise than the user
    namespace's root (`_Unreadable` there, before its content is read).

    The walk maps the ids back as the helper sees them (0 is the caller) and reads what the
    caller may: its own files and directories that its owner may read (and search), another
    id's that group and others alike may, whatever groups the caller has. Any
    xattr but a `user.` one may read otherwise across the namespace (a POSIX ACL's ids, a file
    capability's root id), and a `user.` one is not read (silently) where the file is not: such
    an entry is left to the helper too. A donor's members (`Verbatim`) are taken without
    reading their files. A walk denied anyway (an ACL, a security module) fails with EACCES:
    `_write_here` makes that `_Unreadable` as well.
    """
    for entry in walked:
        if not isinstance(entry, Verbatim):
            if any(not name.startswith("user.") for name, _ in entry.xattrs):
                raise _Unreadable(f"{entry.path}: xattrs read otherwise outside the user namespace")
            # (A whiteout or opaque marker the walk makes up has no opener: nothing to read.)
            if entry.type is EntryType.DIR or (entry.type is EntryType.FILE and entry.open is not None):
                needed = 0o444 if entry.type is EntryType.FILE else 0o555
                needed &= 0o700 if entry.uid == 0 else 0o077
                if entry.mode & needed != needed:
                    raise _Unreadable(f"{entry.path}: mode {entry.mode:04o} of uid {entry.uid}")
        yield entry


def _denied(err: BaseException) -> bool:
    """Whether `err` comes of a permission denied (EACCES, EPERM) to this process."""
    import errno

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.EACCES, errno.EPERM):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def write_uppers(
    jobs: Sequence[tuple[Path, Sequence[Path]]],
    outs: Sequence[BinaryIO | Restartable],
    compression: Compression,
    *,
    source_date_epoch: int | None = None,
    ids: IdMap | None = None,
    donors: Sequence[Donor | None] = (),
    ran: Sequence[bool] = (),
) -> list[LayerInfo]:
    """`write_upper` for each (upper_dir, lowers) in `jobs`, blob i to `outs[i]`, with
    `donors[i]` if given. Each blob's bytes are those `write_upper` writes.

    They are written on threads (compression releases the GIL). Rootless with
    subordinate ids, a layer whose files lamina wrote as the caller (COPY, ADD,
    WORKDIR) is written here too, with the ids mapped back as the helper does,
    the bytes a COPY just wrote (oci.fresh) and its donor; one helper process
    writes the others, inside the user namespace (not one per layer): those
    `ran[i]` says a RUN made (the container's files, often private to one of its
    users), those whose `outs[i]` cannot start over (not `Restartable`), and
    those where a file turned out unreadable here (the blob written so far
    discarded).
    """
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    ids = ids or detect_ids()

    def here(i: int) -> LayerInfo | None:
        upper, lowers = jobs[i]
        donor = donors[i] if i < len(donors) else None
        try:
            return _write_here(upper, outs[i], compression, lowers, source_date_epoch, ids, donor)
        except _Unreadable:  # rootless with subordinate ids, into a Restartable only
            outs[i].discard()  # type: ignore[union-attr]
            return None

    if ids.mode is not IdMode.SUBORDINATE:
        return _on_threads(here, range(len(jobs)))  # type: ignore[arg-type]
    inside = [
        i for i in range(len(jobs)) if (i < len(ran) and ran[i]) or not isinstance(outs[i], Restartable)
    ]
    tried = [i for i in range(len(jobs)) if i not in inside]
    found: dict[int, LayerInfo | None] = dict.fromkeys(inside)
    if tried:
        from concurrent.futures import ThreadPoolExecutor

        # The helper writes the RUN layers meanwhile (it is another process), then those
        # found unreadable here.
        with ThreadPoolExecutor(1, thread_name_prefix="lamina-layers") as pool:
            mine = pool.submit(_on_threads, here, tried)
            made = _helper_writes(
                [jobs[i] for i in inside], [outs[i] for i in inside], compression, source_date_epoch, ids
            )
            found.update(zip(inside, made, strict=True))
            found.update(zip(tried, mine.result(), strict=True))
        again = [i for i in tried if found[i] is None]
        made = _helper_writes(
            [jobs[i] for i in again], [outs[i] for i in again], compression, source_date_epoch, ids
        )
        found.update(zip(again, made, strict=True))
    else:
        found.update(
            zip(inside, _helper_writes(jobs, outs, compression, source_date_epoch, ids), strict=True)
        )
    return [found[i] for i in range(len(jobs))]  # type: ignore[misc]


def _on_threads(one: Callable[[int], LayerInfo | None], indices: Sequence[int]) -> list[LayerInfo | None]:
    """`one(i)` for each of `indices`, several at once."""
    if len(indices) < 2:
        return [one(i) for i in indices]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(
        min(len(indices), os.cpu_count() or 1), thread_name_prefix="lamina-layer"
    ) as pool:
        return list(pool.map(one, indices))


def _helper_writes(
    jobs: Sequence[tuple[Path, Sequence[Path]]],
    outs: Sequence[BinaryIO | Restartable],
    compression: Compression,
    source_date_epoch: int | None,
    ids: IdMap,
) -> list[LayerInfo]:
    """The blobs of `jobs`, each to its `outs`, written by one helper in the user namespace."""
    if not jobs:
        return []
    from lamina.engine.sandbox.runner import write_layers_inside
    from lamina.oci import layer
    from lamina.oci.digest import Digest

    answers = write_layers_inside(jobs, outs, compression.value, source_date_epoch, ids)  # type: ignore[arg-type]
    return [
        layer.LayerInfo(
            digest=Digest.parse(fields["digest"]),
            diff_id=Digest.parse(fields["diff_id"]),
            size=fields["size"],
            media_type=fields["media_type"],
        )
        for fields in answers
    ]


# --- copy snapshotter ---------------------------------------------------------

# (file type and mode, inode, ctime_ns, mtime_ns, size, uid, gid, links): the
# link count tells a file that gained a hard link, so both come out linked.
_Facts = tuple[int, int, int, int, int, int, int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Baseline:
    """The copied rootfs as it was before the command ran."""

    lowers: tuple[str, ...]
    facts: dict[str, _Facts]  # root-relative path -> facts; "" is the root


def _facts(st: os.stat_result) -> _Facts:
    links = 0 if stat.S_ISDIR(st.st_mode) else st.st_nlink
    return (st.st_mode, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size, st.st_uid, st.st_gid, links)


def record(root: str, lowers: list[str] | tuple[str, ...] = ()) -> Baseline:
    """Note every path under `root` (the copy of `lowers`) before the command runs."""
    facts: dict[str, _Facts] = {"": _facts(os.lstat(root))}
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(os.path.join(root, rel)) as it:
            for entry in it:
                child = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                facts[child] = _facts(st)
                if stat.S_ISDIR(st.st_mode):
                    todo.append(child)
    return Baseline(tuple(lowers), facts)


def write_diff(baseline: Baseline, root: str, upper: str) -> None:
    """Write into `upper` (empty) the overlay-form difference between `baseline` and `root` now."""
    _Differ(baseline, root, upper).run()


class _Differ:
    def __init__(self, baseline: Baseline, root: str, upper: str) -> None:
        self.before = baseline.facts
        self.stack = LayerStack(list(baseline.lowers))
        self.root = root
        self.upper = upper
        self.made_dirs: list[str] = []  # upper dirs whose times are set last
        self.linked: dict[tuple[int, int], str] = {}  # inode in root -> its copy in upper
        self.children_before: dict[str, list[str]] = {}
        for path in self.before:
            if path:
                self.children_before.setdefault(os.path.dirname(path), []).append(path)

    def run(self) -> None:
        self._dir("")
        for rel in reversed(self.made_dirs):
            copy_meta(self._src(rel), self._dst(rel), os.lstat(self._src(rel)))

    def _src(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _dst(self, rel: str) -> str:
        return os.path.join(self.upper, rel) if rel else self.upper

    def _dir(self, rel: str) -> None:
        """Compare directory `rel`, which existed before with the same inode."""
        with os.scandir(self._src(rel)) as it:
            now = {e.name: e.stat(follow_symlinks=False) for e in it}
        prefix = f"{rel}/" if rel else ""
        before_names = {p[len(prefix) :] for p in self.children_before.get(rel, ())}
        for name in sorted(before_names - now.keys()):
            self._whiteout(prefix + name)
        for name in sorted(now):
            child, st = prefix + name, now[name]
            old = self.before.get(child)
            if old is None or stat.S_IFMT(old[0]) != stat.S_IFMT(st.st_mode):
                self._copy(child, st, replaced_dir=old is not None and stat.S_ISDIR(old[0]))
            elif stat.S_ISDIR(st.st_mode):
                if old[1] != st.st_ino:
                    self._copy(child, st, replaced_dir=True)  # removed and made again
                    continue
                if _facts(st)[:2] + _facts(st)[3:] != old[:2] + old[3:] or (
                    old[2] != st.st_ctime_ns and self._meta_changed(child, st)
                ):
                    self._ensure_dir(child)
                self._dir(child)
            elif self._changed(child, st, old):
                self._copy(child, st)
        if rel == "" and _owner_mode(os.lstat(self.root)) != _owner_mode_of(self.before[""]):
            self._ensure_dir("")

    def _changed(self, rel: str, st: os.stat_result, old: _Facts) -> bool:
        now = _facts(st)
        if now == old:
            return False
        if now[:2] + now[3:] != old[:2] + old[3:]:
            return True
        # Only the ctime moved (a chmod back, a touch to the same time, a
        # link count change): ambiguous, so compare with what the layers hold.
        return self._meta_changed(rel, st) or (stat.S_ISREG(st.st_mode) and not self._same_content(rel))

    def _meta_changed(self, rel: str, st: os.stat_result) -> bool:
        hit = self.stack.find(rel)
        if hit is None:
            return True
        lower, lst = hit
        if (lst.st_mode, lst.st_uid, lst.st_gid) != (st.st_mode, st.st_uid, st.st_gid):
            return True
        return read_xattrs(lower) != read_xattrs(self._src(rel))

    def _same_content(self, rel: str) -> bool:
        hit = self.stack.find(rel)
        if hit is None:
            return False
        if stat.S_ISLNK(hit[1].st_mode):
            return os.readlink(hit[0]) == os.readlink(self._src(rel))
        return _digest(hit[0]) == _digest(self._src(rel))

    def _ensure_dir(self, rel: str) -> None:
        """Make `rel` and its parents exist in upper as directories (overlay's copy-up)."""
        if not rel:
            if "" not in self.made_dirs:
                self.made_dirs.insert(0, "")
            return
        dst = self._dst(rel)
        if os.path.lexists(dst):
            return
        self._ensure_dir(os.path.dirname(rel))
        os.mkdir(dst, 0o700)
        self.made_dirs.append(rel)

    def _whiteout(self, rel: str) -> None:
        self._ensure_dir(os.path.dirname(rel))
        os.mknod(self._dst(rel), stat.S_IFCHR, os.makedev(0, 0))

    def _copy(self, rel: str, st: os.stat_result, replaced_dir: bool = False) -> None:
        """Copy `rel` (and, for a directory, all under it) from root to upper."""
        self._ensure_dir(os.path.dirname(rel))
        src, dst = self._src(rel), self._dst(rel)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(dst, 0o700)
            if replaced_dir:
                # A new directory over an old one: nothing below may show through.
                os.setxattr(dst, OPAQUE_XATTR, b"y", follow_symlinks=False)
            self.made_dirs.append(rel)
            with os.scandir(src) as it:
                children = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
            for name, child_st in children:
                self._copy(f"{rel}/{name}", child_st)
            return
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.linked:
            os.link(self.linked[key], dst)
            return
        copy_node(src, dst, st)
        copy_meta(src, dst, st)
        if st.st_nlink > 1:
            self.linked[key] = dst


def _owner_mode(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_mode, st.st_uid, st.st_gid


def _owner_mode_of(facts: _Facts) -> tuple[int, int, int]:
    return facts[0], facts[5], facts[6]


def _digest(path: str) -> bytes:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()
