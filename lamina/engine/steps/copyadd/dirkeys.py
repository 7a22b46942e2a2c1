"""A COPY of build-context directories keyed from per-directory records (issue 22).

`selection_key` hashes one record per item a COPY writes, in walk order.
A rebuild whose steps all hit but whose build memo missed (one file
touched, a `--label` changed) would make and key every entry of the
context again. Here the same bytes are fed to the same hash, but a
directory whose listing is unchanged contributes the bytes it contributed
last time, from a record, in one update: touching one file re-keys one
directory. The key is exactly `selection_key`'s (tests compare them).

A directory's record holds the bytes of its children's items (with the
places where each descended subdirectory's own bytes go) and is reused
only when all of these are what they were:
- the *keying context* (the file it lives in): the format and a sample
  record made now, the context's real path, the source
  directory, the destination, the options (--chown, --chmod, --exclude),
  the .dockerignore patterns;
- the directory's path, and its listing: names and every entry's lstat
  (mode, owner, links, size, mtime, ctime, inode, device, rdev), as the
  build's stat pass saw it (`statpass`). A file's content, xattrs and
  symlink target cannot change without its ctime moving (the stat cache's
  rule), nor an entry be renamed, added or removed without the listing
  changing.
A record is not stored when an entry's ctime is within `_SETTLE_NS` of the
listing being read (a write in the same timestamp tick would go unseen), and
never for a directory holding a hard-linked file (its bytes depend on the
items before it): such a copy is keyed the ordinary way.

Only plain shapes are keyed here: every source a literal path to a
directory of the build context, no --parents. Anything else, or a walk past
lamina's limits, returns None and the caller keys the selection itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import marshal
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from lamina.engine import context, statpass
from lamina.engine.context import SourceTree, TreeEntry, entry_record
from lamina.engine.dockerfile.ignore import DockerIgnore, IgnoreMatch
from lamina.engine.steps.copyadd.items import Items
from lamina.engine.steps.copyadd.selection import (
    CopyItem,
    CopyOptions,
    ImageLookup,
    Selection,
    _clean_rel,
    _has_wildcards,
    _item,
    _join,
    _Picked,
    _source_rel,
    item_record,
    made_dir_record,
    resolve_in_image,
)
from lamina.oci.digest import Digest
from lamina.oci.entry import EntryType

__all__ = ["DIR_NAME", "Keyed", "context_key"]

FORMAT = "lamina-dirkeys-2"  # bump when a record's meaning changes
DIR_NAME = "dirkeys"
_SETTLE_NS = 100_000_000  # as the stat cache's: far above any kernel timestamp granularity
_BATCH = 20_000  # items whose digests and records are made at once (bounded memory)
_MAX_DEPTH = 200  # deeper trees are keyed the ordinary way (the expansion recurses)
_DAYS = 30  # records of a keying context not used for this long are removed

# A stored record: (listing digest, bytes, subdirectories, entries listed, items in the bytes).
# A subdirectory is (offset in the bytes, name, its own item's bytes when it is left out:
# written before its first kept descendant, and not at all when it keeps none).
_Sub = tuple[int, str, bytes | None]
_Record = tuple[bytes, bytes, tuple[_Sub, ...], int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Keyed:
    """A selection's key, and how many items it writes (without making them). When no
    record served (a first build), the walk made every item: `selection` is that of
    select_sources, so it is not walked twice."""

    digest: Digest
    items: int
    selection: Selection | None = None


def context_key(
    tree: SourceTree,
    sources: Sequence[str],
    dest: str,
    options: CopyOptions,
    image: ImageLookup | None,
    cache_root: Path,
) -> Keyed | None:
    """`selection_key(tree, select_sources(tree, sources, dest, options, image))`, from the
    records of unchanged directories; None when the shape is not one keyed here."""
    if tree.chroot or tree.scope is None or options.parents or not sources:
        return None
    dest_rel = _clean_rel(dest)
    if image is not None:
        dest_rel = resolve_in_image(image, dest_rel)
    starts = []
    for source in sources:
        rel = _source_rel(tree, source, options)  # `..` out of the context: the same error
        if _has_wildcards(rel):
            return None
        real = tree.resolve(rel)
        entry = tree.entry(real)
        if entry is None or entry.type is not EntryType.DIR:
            return None  # a file, or missing (the ordinary path says so)
        starts.append(real)
    picked = _Picked(tree, options, image)
    picked.make_dirs(dest_rel)  # what each directory source makes (select_sources)
    h = hashlib.sha256()
    for made in picked.selection().made_dirs:
        h.update(made_dir_record(made))
    exclude = picked.excludes
    items = 0
    made: Items | None = Items()  # packed, as select_sources keeps them
    for real in starts:
        walk = _Walk(tree, real, dest_rel, options, exclude, cache_root)
        if not walk.run(made):
            return None
        for piece in walk.pieces:
            h.update(piece)
        items += walk.items
        if walk.reused:
            made = None  # the selection is made if the step runs
    selection = None
    if made is not None:
        made.seal()
        selection = Selection(picked.selection().made_dirs, made)
    return Keyed(Digest("sha256", h.hexdigest()), items, selection)


@dataclasses.dataclass(slots=True)
class _Draft:
    """A directory whose record is made again: its children's items in walk order, packed
    (`Items`: a first build drafts every directory, and objects per item would double
    its peak memory)."""

    rel: str
    fp: bytes
    count: int
    settled: bool
    items: Items
    left_out: set[int]  # positions of directories walked into only for what is kept below
    subs: list[str]  # the subdirectories walked into, in order

    def children(self) -> Iterator[tuple[CopyItem, str | None, bool]]:
        """(item, its name when a subdirectory walked into, whether it is left out)."""
        left_out = self.left_out
        for at, item in enumerate(self.items):
            entry = item.entry
            yield item, entry.name if entry.type is EntryType.DIR else None, at in left_out


class _Walk:
    """One directory source: its directories' records, reused or made, then its bytes."""

    def __init__(
        self,
        tree: SourceTree,
        real: str,
        dest_rel: str,
        options: CopyOptions,
        exclude: DockerIgnore | None,
        cache_root: Path,
    ) -> None:
        self.tree = tree
        self.real = real
        self.dest_rel = dest_rel
        self.options = options
        self.exclude = exclude
        self.cut = len(real) + 1 if real else 0
        ignore = tree.ignore
        keying = [
            FORMAT,
            _sample(),
            tree.scope,
            real,
            dest_rel,
            repr(options),
            list(ignore.patterns) if ignore is not None else None,
            list(exclude.patterns) if exclude is not None else None,
        ]
        self.context = repr(keying)
        name = hashlib.sha256(self.context.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self.path = cache_root / DIR_NAME / f"{name}.bin"
        self.records: dict[str, _Record] = {}
        self.pieces: list[bytes | memoryview] = []
        self.items = 0
        self.reused = False  # some directory's record served
        self.drafts: dict[str, _Draft] = {}

    def run(self, made: Items | None) -> bool:
        """Find or make every directory's record and lay out the bytes; False: key it the
        ordinary way (a hard link, an unreadable directory, a tree past the limits). When
        no record served, the items are appended to `made` in walk order."""
        old = _load(self.path, self.context)
        tree, ignore, exclude = self.tree, self.tree.ignore, self.exclude
        state: IgnoreMatch | None = None
        if ignore is not None and self.real:  # as SourceTree.walk starts
            parts = self.real.split("/")
            for depth in range(1, len(parts) + 1):
                state = ignore.match("/".join(parts[:depth]), state)
        drafts: list[_Draft] = []
        reused = False
        listed = 0
        pending: list[tuple[str, IgnoreMatch | None, IgnoreMatch | None, int]] = [(self.real, state, None, 0)]
        while pending:
            tree.stat_cache.check_stop()  # the build is stopping: not after a million files
            rel, state, xstate, depth = pending.pop()
            if depth > _MAX_DEPTH:
                return False
            found = statpass.listing(tree.scope or "", rel)
            if found is None:
                try:
                    found, _ = statpass.scan(tree.abspath(rel))
                except OSError:
                    return False  # the ordinary walk says what is wrong
            fp = hashlib.sha256(_encode(found.names) + b"\0" + found.packed).digest()
            count = len(found.packed) // statpass.RECORD_SIZE
            listed += count
            if listed > context.MAX_CONTEXT_ENTRIES:  # read now: the ordinary walk's limit, which says so
                return False
            record = old.get(rel)
            if record is not None and record[0] == fp:
                reused = True
                self.records[rel] = record
                subs = [name for _, name, _ in record[2]]
            else:
                draft = self._draft(rel, fp, count, found, state, xstate)
                if draft is None:
                    return False
                # Its items are the listing's, made: keying a million files otherwise holds both.
                statpass.drop(tree.scope or "", rel)
                drafts.append(draft)
                subs = draft.subs
            for name in subs:
                path = f"{rel}/{name}" if rel else name
                match = ignore.match(path, state) if ignore is not None else None
                xmatch = exclude.match(path[self.cut :], xstate) if exclude is not None else None
                pending.append((path, match, xmatch, depth + 1))
        remade = bool(drafts)
        if remade:
            self._finish(drafts)
        self.reused = reused
        if not reused and made is not None:
            self.drafts = {draft.rel: draft for draft in drafts}
            drafts.clear()  # each draft is let go as it is expanded
            for item in self._expand_items(self.real):
                made.append(item)
            self.drafts = {}
        drafts.clear()
        if reused:
            tree.stat_cache.hold(tree.scope)  # digests it did not look up are still in use
        self.pieces, self.items = self._expand(self.real)
        if remade:
            _save(self.path, self.context, self.records)
        else:
            with contextlib.suppress(OSError):
                os.utime(self.path)  # in use: not one to forget (_forget_old)
        return True

    def _draft(
        self,
        rel: str,
        fp: bytes,
        count: int,
        found: statpass.Listing,
        state: IgnoreMatch | None,
        xstate: IgnoreMatch | None,
    ) -> _Draft | None:
        """One level of SourceTree.walk below `rel` (its filters, in its order)."""
        tree, ignore, exclude, cut = self.tree, self.tree.ignore, self.exclude, self.cut
        items = Items()
        left_out: set[int] = set()
        subs: list[str] = []
        newest = 0
        for name, st in statpass.stats(found):
            newest = max(newest, st.st_ctime_ns)
            path = f"{rel}/{name}" if rel else name
            entry = tree._entry(path, st)
            if entry is None:
                continue
            is_dir = entry.type is EntryType.DIR
            keep, descend = True, is_dir
            if ignore is not None and ignore.match(path, state).excluded:
                keep, descend = False, descend and not ignore.can_prune(path)
            if exclude is not None:
                local = path[cut:]
                if exclude.match(local, xstate).excluded:
                    keep, descend = False, descend and not exclude.can_prune(local)
            if not keep and not descend:
                continue
            if entry.type is EntryType.FILE and entry.nlink > 1 and not entry.socket:
                return None  # its bytes depend on the items before it (selection_key)
            item = _item(tree, _join(self.dest_rel, path[cut:]), entry, self.options)
            if not keep:
                left_out.add(len(items))
            if descend:
                subs.append(name)
            items.append(item)
        settled = newest < found.since - _SETTLE_NS
        items.seal()
        return _Draft(rel, fp, count, settled, items, left_out, subs)

    def _finish(self, drafts: list[_Draft]) -> None:
        """The drafts' bytes, a batch of drafts at a time (their entries, digests and the
        path->digest table of a million files made at once peaked at ~870 MB; a batch holds
        at most `_BATCH` items), with one progress count for all (StatCache.hashing)."""
        stat_cache = self.tree.stat_cache
        with stat_cache.hashing(sum(len(draft.items) for draft in drafts)):
            batch: list[_Draft] = []
            held = 0
            for draft in drafts:
                batch.append(draft)
                held += len(draft.items)
                if held >= _BATCH:
                    self._finish_batch(batch)
                    batch, held = [], 0
            if batch:
                self._finish_batch(batch)

    def _finish_batch(self, drafts: list[_Draft]) -> None:
        """The drafts' files' digests in one call (hashed in parallel), then each item's record."""
        tree = self.tree
        digests = tree.file_digests([item.entry for draft in drafts for item in draft.items])
        for draft in drafts:
            blob: list[bytes] = []
            subs: list[_Sub] = []
            offset = kept = 0
            for item, name, left_out in draft.children():
                record = item_record(tree, item, digests.get(item.entry.path, b""))
                if left_out:
                    assert name is not None
                    subs.append((offset, name, record))
                    continue
                blob.append(record)
                offset += len(record)
                kept += 1
                if name is not None:
                    subs.append((offset, name, None))
            self.records[draft.rel] = (draft.fp, b"".join(blob), tuple(subs), draft.count, kept)
            if not draft.settled:
                self.records[draft.rel] = (b"", *self.records[draft.rel][1:])  # used now, never again
        del digests

    def _expand(self, rel: str) -> tuple[list[bytes | memoryview], int]:
        """The bytes below directory `rel` in walk order, and how many items they hold."""
        _, blob, subs, _, items = self.records[rel]
        view = memoryview(blob)  # pieces of it, not copies (a million files' are ~70 MB)
        pieces: list[bytes | memoryview] = []
        at = 0
        for offset, name, left_out in subs:
            if offset > at:
                pieces.append(view[at:offset])
                at = offset
            below, count = self._expand(f"{rel}/{name}" if rel else name)
            if left_out is not None:
                if not below:
                    continue  # a left-out directory with nothing kept below is not written
                pieces.append(left_out)
                count += 1
            pieces.extend(below)
            items += count
        if at < len(blob):
            pieces.append(view[at:])
        return pieces, items

    def _expand_items(self, rel: str) -> Iterator[CopyItem]:
        """The items below directory `rel` in walk order, from the drafts (as `_expand`);
        made one at a time (a first build's are packed into the selection as they come), each
        draft let go once expanded: the drafts and the selection are never whole at once."""
        self.tree.stat_cache.check_stop()
        draft = self.drafts.pop(rel)
        for item, name, left_out in draft.children():
            below = self._expand_items(f"{rel}/{name}" if rel else name) if name is not None else iter(())
            if left_out:  # written before its first kept descendant, if it has one
                first = next(below, None)
                if first is None:
                    continue
                yield item
                yield first
            else:
                yield item
            yield from below


def _sample() -> str:
    """One entry's bytes made now: a change to how entries are keyed changes every file name."""
    entry = TreeEntry("d/f", EntryType.SYMLINK, 0o640, 1, 2, 3, 4, "t", 5, b"", False, 1)
    return entry_record("dest/d/f", entry, 0o600, 6, 7, b"\1" * 32).hex()


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _load(path: Path, context: str) -> dict[str, _Record]:
    """The records of a keying context; empty when none, torn or of another format."""
    records: dict[str, _Record] = {}
    try:
        with open(path, "rb") as f:
            if marshal.load(f) != (FORMAT, context):
                return {}
            while (pair := marshal.load(f)) is not None:
                rel, record = pair
                records[rel] = record
    except (OSError, ValueError, EOFError, TypeError):
        return {}
    return records


def _save(path: Path, context: str, records: dict[str, _Record]) -> None:
    """Replace the file by rename (a reader sees the old one or the new one, whole); records
    made unsettled (no listing digest) are left out. Unwritable: keyed again next time.
    Written a record at a time, then None: a million files' records are ~60 MB, which one
    `marshal.dumps` of them all would hold again, at the build's peak."""
    import tempfile

    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-dirkeys-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                marshal.dump((FORMAT, context), f)
                for rel, record in records.items():
                    if record[0]:
                        marshal.dump((rel, record), f)
                marshal.dump(None, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _forget_old(path.parent)


def _forget_old(directory: Path) -> None:
    """Remove the records of keying contexts not used for `_DAYS` days (and crashed writes)."""
    cutoff = time.time() - _DAYS * 86400
    with os.scandir(directory) as it:
        for entry in it:
            if entry.stat().st_mtime < cutoff:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
