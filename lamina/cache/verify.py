"""`lamina cache verify`: check the whole store from its bytes, and repair what a crash tore.

What is checked (each problem is one line naming the path or index row):
- the index: SQLite's quick_check and foreign keys;
- every blob under blobs/sha256/: its bytes hash to its name; a blob recorded
  as a layer also decompresses as its media type says, to the recorded
  diff_id, with the recorded size;
- every layer record names a blob that is there;
- every image name: its manifest (and an index's manifests), config and
  layers are stored with the sizes the descriptors give;
- every build-cache entry: each blob or unpacked layer it refers to is
  there, and a step result's layer directory exists;
- torn files: what a killed process leaves (`.tmp-*` blobs and unpack dirs,
  scratch under tmp/, a half-saved archive's dir, stat cache and history
  temporaries, a kept failure without its failure.json). These are only
  judged when no other lamina process has the store open (the store lock,
  as gc takes it): while one has, a temporary may be a write in flight.

`--repair` (needs the store to itself) removes torn files, stray entries
and corrupt blobs, and deletes layer records and cache entries whose
content is gone (the step runs again next time). It never removes a blob,
layer directory or name that something still refers to and that is intact:
an image whose blob is missing or corrupt stays named and is reported, to
be loaded or pulled again.

Unpacked layer directories are complete by construction (filled under a
temporary name, then renamed) and are not re-hashed: a step's directory is
named by its cache key, not by a digest of its files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from lamina.cache.store import LayerRecord, Store
from lamina.errors import LaminaError, StoreBusy
from lamina.oci import opened
from lamina.oci.digest import Digest

_HEX = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong: `where` (a path under the store, or an index row), `what`, and
    whether --repair can fix it by removing what `where` names."""

    where: str
    what: str
    repairable: bool

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyReport:
    root: Path
    blobs: int  # checked
    images: int
    entries: int  # build-cache entries
    unpacked: int  # layer directories
    problems: tuple[Problem, ...]  # what is wrong (after --repair: what is still wrong)
    repaired: tuple[Problem, ...]  # what --repair fixed
    torn_judged: bool  # False: another process had the store open, temporaries not judged

    @property
    def clean(self) -> bool:
        return not self.problems


def verify(
    store: Store, *, repair: bool = False, remove_tree: Callable[[Path], None] | None = None
) -> VerifyReport:
    """Check `store` (see the module docstring); with `repair`, fix what can be fixed.

    `remove_tree` removes one directory tree (rootless builds leave files of
    subordinate ids, which only the sandbox's remover can delete).
    Raises StoreBusy for `repair` while another lamina process has the store open.
    """
    with store.alone() as alone:
        if repair and not alone:
            raise StoreBusy(f"cache verify --repair {store.root}: another lamina process is using the store")
        return _Verifier(store, repair, remove_tree, alone).run()


class _Verifier:
    def __init__(
        self, store: Store, repair: bool, remove_tree: Callable[[Path], None] | None, alone: bool
    ) -> None:
        self.store = store
        self.root = store.root
        self.repair = repair
        self.remove_tree = remove_tree
        self.alone = alone
        self.problems: list[Problem] = []
        self.repaired: list[Problem] = []
        self.blobs: set[Digest] = set()  # intact blobs
        self.counts = {"blobs": 0, "images": 0, "entries": 0, "unpacked": 0}

    def run(self) -> VerifyReport:
        if self._index():
            layers = {record.blob: record for record in self._layer_records()}
            self._blob_files(layers)
            self._dangling_layers(layers)
            self._images()
            self._entries()
        self._unpacked_dirs()
        if self.alone:
            self._torn()
        return VerifyReport(
            self.root,
            self.counts["blobs"],
            self.counts["images"],
            self.counts["entries"],
            self.counts["unpacked"],
            tuple(self.problems),
            tuple(self.repaired),
            self.alone,
        )

    # --- recording problems --------------------------------------------------------------

    def _rel(self, path: Path | str) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def _found(self, where: str, what: str, fix: Callable[[], None] | None = None) -> None:
        problem = Problem(where, what, fix is not None)
        if self.repair and fix is not None:
            try:
                fix()
            except (OSError, LaminaError) as err:
                self.problems.append(Problem(where, f"{what}; repair failed: {err}", False))
                return
            self.repaired.append(problem)
            return
        self.problems.append(problem)

    def _remove_path(self, path: Path) -> Callable[[], None]:
        def fix() -> None:
            if path.is_dir() and not path.is_symlink():
                if self.remove_tree is not None:
                    self.remove_tree(path)
                else:
                    from lamina.oci.safepath import remove_tree

                    remove_tree(path)
                if os.path.lexists(path):
                    raise OSError(f"{path} could not be removed")
            else:
                path.unlink(missing_ok=True)

        return fix

    def _sql(self, statement: str, args: tuple[str, ...]) -> Callable[[], None]:
        def fix() -> None:
            with self.store._sql() as db:
                db.execute(statement, args)

        return fix

    # --- the index -----------------------------------------------------------------------

    def _index(self) -> bool:
        """quick_check and foreign keys; False when the index cannot be read at all."""
        try:
            with self.store._sql() as db:
                rows = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
                orphans = db.execute("PRAGMA foreign_key_check").fetchall()
        except LaminaError as err:
            self._found("index.db", f"unreadable: {err}")
            return False
        if rows != ["ok"]:
            self._found("index.db", "damaged: " + "; ".join(map(str, rows[:5])))
            return False
        if orphans:
            self._found(
                "index.db",
                f"{len(orphans)} cache_refs rows of no cache entry",
                self._sql("DELETE FROM cache_refs WHERE key NOT IN (SELECT key FROM cache)", ()),
            )
        return True

    def _layer_records(self) -> list[LayerRecord]:
        with self.store._sql() as db:
            rows = db.execute("SELECT blob, diff_id, media_type, size FROM layers").fetchall()
        records = []
        for blob, diff_id, media_type, size in rows:
            try:
                records.append(LayerRecord(Digest.parse(blob), Digest.parse(diff_id), media_type, size))
            except LaminaError:
                self._found(
                    f"index layers {blob}",
                    "not a digest",
                    self._sql("DELETE FROM layers WHERE blob = ?", (blob,)),
                )
        return records

    # --- blobs -----------------------------------------------------------------------------

    def _blob_files(self, layers: dict[Digest, LayerRecord]) -> None:
        directory = self.root / "blobs" / "sha256"
        for entry in sorted(os.scandir(directory), key=lambda e: e.name) if directory.is_dir() else ():
            path = Path(entry.path)
            where = self._rel(path)
            if entry.name.startswith(".tmp-"):
                if self.alone:
                    self._found(
                        where, "a blob torn by a killed process (never named)", self._remove_path(path)
                    )
                continue
            if not _HEX.fullmatch(entry.name):
                self._found(where, "not a blob (its name is no sha256 digest)", self._remove_path(path))
                continue
            if not entry.is_file(follow_symlinks=False):
                self._found(where, "not a regular file", self._remove_path(path))
                continue
            self.counts["blobs"] += 1
            digest = Digest("sha256", entry.name)
            problem = self._blob_problem(path, digest, layers.get(digest))
            if problem is None:
                self.blobs.add(digest)
            elif problem.startswith("layer record:"):
                self.blobs.add(digest)  # the bytes are right, the record about them is not
                self._found(where, problem, self._sql("DELETE FROM layers WHERE blob = ?", (str(digest),)))
            else:
                self._found(where, problem, self._remove_path(path))

    @staticmethod
    def _blob_problem(path: Path, digest: Digest, layer: LayerRecord | None) -> str | None:
        from lamina.oci.compression import CHUNK, Compression, HashingReader, hash_decoded

        try:
            with open(path, "rb") as f:
                raw = HashingReader(f)  # type: ignore[arg-type]
                diff_id = None
                if layer is not None and layer.media_type:
                    try:
                        compression = Compression.from_media_type(layer.media_type)
                        diff_id, _ = hash_decoded(raw, compression)  # type: ignore[arg-type]
                    except (LaminaError, OSError, EOFError, ValueError) as err:
                        while raw.read(CHUNK):
                            pass
                        if raw.digest == digest:
                            return f"layer record: does not decompress as {layer.media_type}: {err}"
                while raw.read(CHUNK):
                    pass
        except OSError as err:
            return f"unreadable: {err.strerror or err}"
        if raw.digest != digest:
            return f"corrupt: the bytes hash to {raw.digest} ({raw.count} bytes)"
        if layer is not None:
            if layer.size != raw.count:
                return f"layer record: size {layer.size}, the blob has {raw.count} bytes"
            if diff_id is not None and diff_id != layer.diff_id:
                return f"layer record: diff_id {layer.diff_id}, the tar hashes to {diff_id}"
        return None

    def _dangling_layers(self, layers: dict[Digest, LayerRecord]) -> None:
        for blob in sorted(layers, key=str):
            if not (self.root / "blobs" / "sha256" / blob.hex).exists():
                self._found(
                    f"index layers {blob}",
                    "the blob is not stored",
                    self._sql("DELETE FROM layers WHERE blob = ?", (str(blob),)),
                )

    # --- image names ---------------------------------------------------------------------

    def _images(self) -> None:
        from lamina.oci.image import MAX_DOCUMENT, ImageFormatError, Index, Manifest, parse_document

        for record in self.store.names():  # as tagged: a pending image is checked as it is
            self.counts["images"] += 1
            where = f"image {record.name}"
            pending = [(record.manifest, None, "manifest")]
            seen: set[Digest] = set()
            while pending:
                digest, size, what = pending.pop()
                if digest in seen:
                    continue
                seen.add(digest)
                if (
                    digest not in self.blobs
                    and what == "platform manifest"
                    and not self._was_repaired(digest)
                ):
                    continue  # a pulled index holds the platforms pulled, not every one it lists
                if digest not in self.blobs:
                    gone = "corrupt (removed)" if self._was_repaired(digest) else "missing"
                    self._found(where, f"{what} {digest} is {gone}: load, pull or build the image again")
                    continue
                have = self.store.blob_size(digest)
                if size is not None and have != size:
                    self._found(where, f"{what} {digest} has {have} bytes, its descriptor says {size}")
                    continue
                if what not in ("manifest", "platform manifest"):
                    continue
                try:
                    data = self.store.read_blob(digest, MAX_DOCUMENT)
                    media_type = parse_document(data, str(digest)).get("mediaType", "")
                    if "index" in media_type or "list" in media_type:
                        pending += [
                            (m.digest, m.size, "platform manifest") for m in Index.from_bytes(data).manifests
                        ]
                    else:
                        manifest = Manifest.from_bytes(data)
                        pending.append((manifest.config.digest, manifest.config.size, "config"))
                        pending += [(layer.digest, layer.size, "layer") for layer in manifest.layers]
                except (ImageFormatError, LaminaError) as err:
                    self._found(where, f"manifest {digest}: {err}")

    def _was_repaired(self, digest: Digest) -> bool:
        return any(p.where.endswith(digest.hex) for p in self.repaired)

    # --- build-cache entries ---------------------------------------------------------------

    def _entries(self) -> None:
        with self.store._sql() as db:
            rows = db.execute("SELECT key, result FROM cache ORDER BY key").fetchall()
            refs: dict[str, list[str]] = {}
            for key, digest in db.execute("SELECT key, digest FROM cache_refs"):
                refs.setdefault(key, []).append(digest)
        unpacked = self.root / "unpacked"
        for key, result in rows:
            self.counts["entries"] += 1
            missing = []
            for ref in sorted(refs.get(key, ())):
                try:
                    digest = Digest.parse(ref)
                except LaminaError:
                    missing.append(ref)
                    continue
                if digest not in self.blobs and not (unpacked / digest.hex).is_dir():
                    missing.append(ref)
            if key.startswith("sha256:"):  # a step's result: its layer dir (or no layer)
                layer = _step_layer(result)
                if layer is False:
                    missing.append("its result (not JSON)")
                elif layer and not (unpacked / str(layer)).is_dir():
                    missing.append(f"unpacked/{layer}")
            if missing:
                self._found(
                    f"cache entry {key}",
                    "refers to what is gone: "
                    + ", ".join(dict.fromkeys(missing))
                    + " (dropped: the step runs again)",
                    self._sql("DELETE FROM cache WHERE key = ?", (key,)),
                )

    # --- unpacked layers and torn files ------------------------------------------------------

    def _unpacked_dirs(self) -> None:
        directory = self.root / "unpacked"
        for entry in sorted(os.scandir(directory), key=lambda e: e.name) if directory.is_dir() else ():
            path = Path(entry.path)
            if entry.name.startswith("."):  # .tmp-* (uppers, unpacks), .lamina-work-* (overlay's)
                if self.alone and entry.name in (opened.TABLE, opened.READERS):
                    if entry.name == opened.TABLE or not (directory / opened.TABLE).exists():
                        what = "modes a killed rootless reader left raised (given back, its table removed)"
                        self._found(self._rel(path), what, lambda: _give_back(directory))
                    continue
                if self.alone:
                    what = "a step's or unpack's directory left by a killed process (never named)"
                    self._found(self._rel(path), what, self._remove_path(path))
                continue
            if not _HEX.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
                self._found(self._rel(path), "not an unpacked layer (a stray entry)", self._remove_path(path))
                continue
            self.counts["unpacked"] += 1

    def _torn(self) -> None:
        """What a killed process leaves outside blobs/ and unpacked/ (only called when alone)."""
        killed = "left by a killed process"
        scratch = self.root / "tmp"
        for entry in sorted(os.scandir(scratch), key=lambda e: e.name) if scratch.is_dir() else ():
            self._found(self._rel(entry.path), f"build scratch {killed}", self._remove_path(Path(entry.path)))
        for path in sorted(self.root.glob(".tmp-*")):
            self._found(self._rel(path), f"a half-saved image's scratch {killed}", self._remove_path(path))
        for path in sorted((self.root / "statcache").glob(".tmp-statcache-*")):
            self._found(self._rel(path), f"a stat cache write {killed}", self._remove_path(path))
        for path in sorted((self.root / "dirkeys").glob(".tmp-dirkeys-*")):  # steps.copyadd.dirkeys
            self._found(self._rel(path), f"a COPY's key records write {killed}", self._remove_path(path))
        for path in sorted((self.root / "copies").glob(".tmp-copy-*")):  # steps.copyadd.priorcopy
            self._found(self._rel(path), f"a COPY's written-files record {killed}", self._remove_path(path))
        for path in sorted((self.root / "builds").glob("*.tmp")):
            self._found(self._rel(path), f"a build history write {killed}", self._remove_path(path))
        for path in sorted((self.root / "checks").glob(".*")):
            self._found(self._rel(path), f"a build-check memo write {killed}", self._remove_path(path))
        failures = self.root / "failures"
        for path in sorted(failures.iterdir()) if failures.is_dir() else ():
            if path.is_dir() and not _readable_json(path / "failure.json"):
                self._found(
                    self._rel(path), f"a failed step kept half-way ({killed})", self._remove_path(path)
                )


def _step_layer(result: str) -> str | bool | None:
    """A step result's layer dir id, None for no layer, False for a result that is not JSON."""
    try:
        value = json.loads(result)
    except ValueError:
        return False
    if not isinstance(value, dict):
        return False
    layer = value.get("layer")
    return layer if isinstance(layer, str) and layer else None


def _readable_json(path: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        json.loads(path.read_text())
        return True
    return False


def describe(report: VerifyReport) -> list[str]:
    """The report as `lamina cache verify` prints it: a summary line, then one line per problem."""
    lines = []
    checked = (
        f"{report.blobs} blobs, {report.images} images, {report.entries} build results, "
        f"{report.unpacked} unpacked layers checked"
    )
    for problem in report.repaired:
        lines.append(f"repaired: {problem}")
    for problem in report.problems:
        hint = " (--repair fixes it)" if problem.repairable else ""
        lines.append(f"problem: {problem}{hint}")
    if report.problems:
        summary = f"cache {report.root}: {checked}; {len(report.problems)} problem(s)"
    elif report.repaired:
        summary = f"cache {report.root}: {checked}; repaired {len(report.repaired)}, now clean"
    else:
        summary = f"cache {report.root}: {checked}; clean"
    if not report.torn_judged:
        summary += " (another lamina process has the store open: temporary files not judged)"
    return [*lines, summary]


def _give_back(directory: Path) -> None:
    opened.give_back(directory)
