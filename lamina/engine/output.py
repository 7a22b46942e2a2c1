"""Build outputs: make the image and write the `-o` outputs (lamina.engine.outputspec parses them).

`make_image` makes each layer's blob once (`layer_blob`, memoised in the
store's index) and commits the image with cache.images.commit_image, the one
place an image's config and manifest are written.

Writing is done by the OCI writers (lamina.oci.layout / dockerarchive) and
by `write_rootfs()` here, which merges a stack of overlay-form layer
directories into one tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from lamina.cache.images import CommittedImage
from lamina.engine.outputspec import OutputSpec, OutputType, check_dest
from lamina.errors import BuildError, DiskFull, OutputError, is_disk_full
from lamina.oci import filecopy, opened, recorded, xattrs
from lamina.oci.digest import Digest
from lamina.oci.layout import shown_path
from lamina.oci.overlay import is_opaque, is_whiteout

if TYPE_CHECKING:
    from lamina.cache.store import BlobInfo, BlobWriter, Store
    from lamina.engine.snapshot import Donor
    from lamina.oci.entry import LayerEntry
    from lamina.oci.image import Descriptor, ImageConfig, Platform
    from lamina.oci.layer import LayerInfo


# --- root filesystem from overlay-form layer directories ----------------------------------


def _remove(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    try:
        shutil.rmtree(path)
    except PermissionError:
        # Rootless: an earlier export kept directories the image shut to their owner (0000,
        # 0124, as BuildKit's rootless local exporter does); ours to open up and remove.
        _open_up(path)
        shutil.rmtree(path)


def _open_up(top: Path) -> None:
    """u+rwx on `top` and every directory below it, top-down (each opened before it is listed)."""
    os.chmod(top, 0o700)
    for root, dirs, _ in os.walk(top):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)


@dataclasses.dataclass
class NotKept:
    """What a rootless export could not write as itself (device nodes, file capabilities,
    other privileged xattrs), to be set another way or said in one line each."""

    devices: list[str] = dataclasses.field(default_factory=list)
    capabilities: list[tuple[Path, bytes]] = dataclasses.field(default_factory=list)
    xattrs: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # name -> paths


def _copy_entry(
    src: Path,
    dst: Path,
    st: os.stat_result,
    links: dict[tuple[int, int], Path],
    record: bool = False,
    missed: NotKept | None = None,
    owners: ContainerOwners | None = None,
) -> None:
    mode = st.st_mode
    device = None
    if stat.S_ISDIR(mode):
        if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
            _remove(dst)
        if not dst.exists():
            dst.mkdir()
    else:
        _remove(dst)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            os.link(links[key], dst)
            if owners is not None:
                owners.note(src, dst, st)
            return
        # A device node rootless unpacking kept as a placeholder (lamina.oci.recorded).
        device = recorded.device_of(os.fspath(src)) if stat.S_ISREG(mode) and not st.st_size else None
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif device is not None and record:
            filecopy.copy_path(os.fspath(src), os.fspath(dst))
            recorded.copy_device(os.fspath(src), os.fspath(dst))  # the tar is written with the device
        elif stat.S_ISREG(mode) and device is None:
            filecopy.copy_path(os.fspath(src), os.fspath(dst))  # holes stay holes
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst)
        else:
            rdev = st.st_rdev if device is None else os.makedev(device[1], device[2])
            kind = (
                stat.S_IFMT(mode) if device is None else (stat.S_IFCHR if device[0] == "c" else stat.S_IFBLK)
            )
            try:
                os.mknod(dst, kind | stat.S_IMODE(mode), rdev)
            except PermissionError:
                if missed is not None:  # device nodes need privilege: said once, after
                    missed.devices.append(os.fspath(dst))
                return
        if st.st_nlink > 1:
            links[key] = dst
    # Unprivileged export: files end up owned by the caller.
    with contextlib.suppress(PermissionError):
        os.lchown(dst, st.st_uid, st.st_gid)
    if owners is not None:
        owners.note(src, dst, st)
    # After chown (it clears security.capability); `record`: a scratch tree the tar is read from.
    found = xattrs.read(os.fspath(src))
    if found:
        lost = xattrs.write(os.fspath(dst), found, symlink=stat.S_ISLNK(mode), record=record)
        if lost and missed is not None:
            for name, value in found:
                if name == xattrs.CAPABILITY and name in lost:
                    missed.capabilities.append((dst, value))
                elif name in lost:
                    missed.xattrs.setdefault(name, []).append(os.fspath(dst))
    if not stat.S_ISLNK(mode):
        os.chmod(dst, stat.S_IMODE(mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def merge_layers(
    layer_dirs: Sequence[Path],
    dest: Path,
    record: bool = False,
    missed: NotKept | None = None,
    owners: ContainerOwners | None = None,
) -> None:
    """Apply overlay-form layer dirs (bottom first) onto `dest`, honouring whiteouts.

    Files keep their xattrs where this process may set them; with `record`,
    the others are kept as lamina's records (`lamina.oci.xattrs`), for a
    tree that is read back into a tar; without, they go to `missed`, as do
    device nodes this process may not make. `owners` (rootless, for a tar)
    is told every path's container owner, which the tree cannot hold.

    A 0/0 char device deletes the path below it; an opaque dir hides the
    lower dir's contents. Directory modes and times are set after their
    contents, so a read-only directory can still be filled.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with opened.opened(layer_dirs):  # rootless: dirs shut to their owner (COPY --chmod=0644 dir)
        for layer in layer_dirs:
            _merge_layer(layer, dest, record, missed, owners)


def _merge_layer(
    layer: Path, dest: Path, record: bool, missed: NotKept | None, owners: ContainerOwners | None
) -> None:
    links: dict[tuple[int, int], Path] = {}
    dir_stats: list[tuple[Path, os.stat_result]] = []
    for root, dirs, files in os.walk(layer):
        rel = Path(root).relative_to(layer)
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if Path(root, d).is_symlink()]:
            src = Path(root, name)
            st = opened.true_stat(src.lstat())  # the mode without merge_layers' grant
            target = dest / rel / name
            if is_whiteout(st):
                _remove(target)
            else:
                _copy_entry(src, target, st, links, record, missed, owners)
        for name in list(dirs):
            src = Path(root, name)
            if src.is_symlink():
                dirs.remove(name)
                continue
            st = opened.true_stat(src.lstat())  # the mode without merge_layers' grant
            target = dest / rel / name
            if is_opaque(src):
                _remove(target)
            _copy_entry(src, target, st, links, record, missed, owners)
            os.chmod(target, 0o700 | stat.S_IMODE(st.st_mode))
            dir_stats.append((target, st))
    for target, st in reversed(dir_stats):
        os.chmod(target, stat.S_IMODE(st.st_mode))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


class ContainerOwners:
    """Rootless, a merged tree is all the caller's: each path's container owner, kept aside
    (the layer dir's owner as the sandbox shows it, or the owner recorded in an xattr)."""

    def __init__(self) -> None:
        from lamina.engine.sandbox.idmap import detect_ids

        self._ids = detect_ids()
        self.found: dict[str, tuple[int, int]] = {}

    def inside(self, uid: int, gid: int) -> tuple[int, int]:
        return self._ids.uid_inside(uid), self._ids.gid_inside(gid)

    def note(self, src: Path, dst: Path, st: os.stat_result) -> None:
        owner = recorded.owner_of(os.fspath(src), self.inside(st.st_uid, st.st_gid))
        self.found[os.fspath(dst)] = owner

    def apply(self, root: Path, entry: LayerEntry) -> LayerEntry:
        owner = self.found.get(os.fspath(root / entry.path))
        if owner is None or owner == (entry.uid, entry.gid):
            return entry
        return dataclasses.replace(entry, uid=owner[0], gid=owner[1])


def write_rootfs(layer_dirs: Sequence[Path], dest: Path, epoch: int | None = None) -> tuple[str, ...]:
    """type=local: the merged root filesystem in `dest` (created if missing); the warnings.

    With `epoch` (SOURCE_DATE_EPOCH), every file written has that time, as BuildKit's local
    exporter gives them.

    The tree is written in full under a temporary name first, then moved into
    place, so a failure (a full disk) leaves `dest` as it was: a new `dest` is
    made beside it and renamed; into an existing one (perhaps a mount point)
    the tree is written in a hidden directory inside and its entries renamed
    over what is there, as a merge onto `dest` would have left them.
    Rootless, what the tree could not keep is named in one warning line each.
    """
    what = f"--output type=local,dest={dest}"
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"{what}: {dest} exists and is not a directory")
    made = _make_parents(dest.parent)
    existed = dest.is_dir()
    tmp: Path | None = None
    try:
        tmp = _temp_dir(
            dest if existed else dest.parent, f".{dest.name}.tmp-" if not existed else ".lamina-tmp-"
        )
        warnings = _merge_keeping(layer_dirs, tmp, what)
        if epoch is not None:
            with opened.opened([tmp]):  # rootless: the tree's dirs shut to their owner reached too
                _set_times(tmp, epoch)
        if existed:
            _move_entries(tmp, dest)
            os.rmdir(tmp)
        else:
            os.rename(tmp, dest)
    except BaseException as err:
        if tmp is not None:
            _discard(tmp)
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()
        if not isinstance(err, OSError):
            raise
        # Name what the user asked for, not the temporary name it had (or was to have).
        shown = shown_path(err.filename2 or err.filename, tmp, dest) if tmp is not None else str(dest)
        if is_disk_full(err):
            raise OutputError(f"{what}: {DiskFull.writing(shown, err)}") from err
        # Rootless, a file the container made private to one of its users
        # cannot be read from outside the user namespace.
        raise OutputError(f"{what}: {shown}: {err.strerror or err}") from err
    return warnings


def _set_times(root: Path, epoch: int) -> None:
    """Every entry under `root` (and `root`) timed `epoch`, links themselves not followed."""
    for top, dirs, files in os.walk(root, topdown=False):
        for name in (*files, *dirs):
            os.utime(os.path.join(top, name), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def _merge_keeping(layer_dirs: Sequence[Path], root: Path, what: str) -> tuple[str, ...]:
    """merge_layers into `root`, then what a rootless process could not write as itself:
    file capabilities are set in a user namespace whose root is the caller (the kernel keeps
    them as v3, naming the caller: they work where that uid is a namespace's root, as in a
    rootless container); what is still not kept is one line each."""
    missed = NotKept()
    merge_layers(layer_dirs, root, missed=missed)
    lines = []

    def first(paths: Sequence[str | Path]) -> str:
        shown = "/" + os.path.relpath(paths[0], root)
        return f"{len(paths)} {'file' if len(paths) == 1 else 'files'} (first: {shown})"

    if missed.devices:
        lines.append(f"{what}: device nodes not made (creating them needs root): {first(missed.devices)}")
    if missed.capabilities:
        failed = _set_capabilities(missed.capabilities)
        if failed:
            paths, reason = failed
            lines.append(
                f"{what}: file capabilities (security.capability) not kept: {first(paths)}: {reason}"
            )
    for name, paths in sorted(missed.xattrs.items()):
        lines.append(f"{what}: xattr {name} not kept (setting it needs root): {first(paths)}")
    return tuple(lines)


def _set_capabilities(found: list[tuple[Path, bytes]]) -> tuple[list[Path], str] | None:
    """Set each file capability inside a user namespace; None, or (the files not set, why)."""
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    ids = detect_ids()
    if ids.mode not in (IdMode.SUBORDINATE, IdMode.SINGLE):
        return [path for path, _ in found], "no user namespace to set them in"
    from lamina.engine.sandbox.runner import set_xattrs_inside
    from lamina.errors import SandboxError

    try:
        failed = set_xattrs_inside([(path, xattrs.CAPABILITY, value) for path, value in found], ids)
    except SandboxError as err:  # no namespace after all: the tree is whole, said in the warning
        return [path for path, _ in found], str(err)
    if not failed:
        return None
    return [path for path, _ in failed], failed[0][1]


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p `path`; the directories it made, outermost first (to remove on failure)."""
    missing: list[Path] = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
    return list(reversed(missing))


def _temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory in `parent`, made with the umask's mode (as `mkdir` would make `dest`)."""
    import secrets

    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path


def _move_entries(src: Path, dest: Path) -> None:
    """Rename every entry of `src` into `dest`: a directory onto a directory merges, anything
    else replaces what is there. Renames need no space, so this cannot find the disk full."""
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        target = dest / entry.name
        if entry.is_dir(follow_symlinks=False) and target.is_dir() and not target.is_symlink():
            st = entry.stat(follow_symlinks=False)
            # Both may be read-only (the image's mode): open them up, set the mode after.
            os.chmod(entry.path, 0o700)
            os.chmod(target, 0o700 | stat.S_IMODE(target.lstat().st_mode))
            _move_entries(Path(entry.path), target)
            os.rmdir(entry.path)
            with contextlib.suppress(PermissionError):
                os.lchown(target, st.st_uid, st.st_gid)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            continue
        _remove(target)
        if entry.is_dir(follow_symlinks=False):
            # Moving a directory rewrites its `..`: it must be writable for that.
            st = entry.stat(follow_symlinks=False)
            os.chmod(entry.path, 0o700 | stat.S_IMODE(st.st_mode))
            os.rename(entry.path, target)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        else:
            os.rename(entry.path, target)


def _discard(path: Path) -> None:
    """Remove a partly written tree, read-only directories included."""
    from lamina.oci.safepath import remove_tree

    try:
        remove_tree(path)
    except PermissionError:  # unprivileged: a directory of the image made read-only
        for root, dirs, _ in os.walk(path):
            for name in [root, *(os.path.join(root, d) for d in dirs)]:
                if not os.path.islink(name):
                    with contextlib.suppress(OSError):
                        os.chmod(name, 0o700)
        with contextlib.suppress(OSError):
            remove_tree(path)
    except OSError:
        pass


# --- committing an image to the store ------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ImageLayer:
    """One layer of a built image: where its files are, and what is known of its blob.

    Base-image layers arrive with their blob descriptor and diff_id; layers
    the build made have only a directory (`dir_id` names it in the store) and
    are compressed the first time an output needs them.
    """

    path: Path  # unpacked, overlay form
    dir_id: str = ""  # hex naming a built layer's directory
    diff_id: Digest | None = None
    blob: Descriptor | None = None
    step: str = ""  # the step that made it (`Dockerfile:3: stage s: RUN ...`), for errors
    ran: bool = False  # made by a RUN: the container's files (rootless, read in its user namespace)


REWRITTEN_TIMESTAMP = "buildkit/rewritten-timestamp"


def epoch_annotations(layer: ImageLayer, epoch: int | None) -> dict[str, str]:
    """BuildKit's annotation on a layer whose file times were clamped to SOURCE_DATE_EPOCH: every
    layer this build wrote (a base image's layers stay as they came, unannotated)."""
    return {REWRITTEN_TIMESTAMP: str(epoch)} if epoch is not None and layer.blob is None else {}


def layer_blob(
    store: Store, layer: ImageLayer, compression: str, epoch: int | None, lowers: Sequence[Path] = ()
) -> tuple[Descriptor, Digest]:
    """The blob of `layer` in `compression` (made once, then found in the store's index)."""
    return layer_blobs(store, [(layer, lowers)], compression, epoch)[0]


def layer_blobs(
    store: Store,
    layers: Sequence[tuple[ImageLayer, Sequence[Path]]],
    compression: str,
    epoch: int | None,
    failed: list[int] | None = None,
) -> list[tuple[Descriptor, Digest]]:
    """`layer_blob` for each (layer, lowers): the missing blobs made together.

    They are compressed on threads; rootless, one helper process writes those
    this process cannot read (snapshot.write_uppers). A blob's bytes do not
    depend on how many are made at once, nor on which process wrote them. On
    an error, the index of the layer being written is appended to `failed`.
    """
    from lamina.oci.compression import Compression

    found = [_known_blob(store, layer, compression, epoch) for layer, _ in layers]
    missing = [i for i, hit in enumerate(found) if hit is None]
    if not missing:
        return found  # type: ignore[return-value]
    # snapshot.write_uppers maps a rootless sandbox's ids back to the container's
    # and reads files private to subordinate ids inside the user namespace.
    from lamina.engine.snapshot import write_uppers

    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(_Noted(store)) for _ in missing]
        jobs = [(layers[i][0].path, layers[i][1]) for i in missing]
        donors = [_donor(store, layers[i][0], epoch) for i in missing]
        try:
            infos = write_uppers(
                jobs,
                outs,  # type: ignore[arg-type]
                Compression.parse(compression),
                source_date_epoch=epoch,
                donors=donors,
                ran=[layers[i][0].ran for i in missing],
            )
        except BaseException:
            if failed is not None:
                failed.append(
                    next((i for i, out in zip(missing, outs, strict=True) if out.failed), missing[0])
                )
            raise
        for i, out, info in zip(missing, outs, infos, strict=True):
            try:
                blob = out.out.commit(info.digest)
            except BaseException:
                if failed is not None:
                    failed.append(i)
                raise
            found[i] = _record_blob(store, layers[i][0], blob, info, compression, epoch)
    return found  # type: ignore[return-value]


def _donor(store: Store, layer: ImageLayer, epoch: int | None) -> Donor | None:
    """The layer dir a COPY rerun linked `layer`'s unchanged files from, with a reader of
    its tar (a blob of it in any compression, same SOURCE_DATE_EPOCH), if both are there."""
    import json

    from lamina.engine.cachekey import layer_donor_key
    from lamina.oci.compression import Compression, open_decompressed

    text = store.cache_get(layer_donor_key(layer.dir_id)) if layer.dir_id else None
    if text is None:
        return None
    try:
        dir_id = str(json.loads(text)["dir"])
    except (ValueError, KeyError, TypeError):
        return None
    donor = ImageLayer(store.unpacked_path(Digest("sha256", dir_id)), dir_id)
    if not donor.path.is_dir():
        return None
    for compression in Compression:  # "none" first: a pending image's tar reads fastest
        known = _known_blob(store, donor, compression.value, epoch)
        if known is not None:
            blob = known[0].digest
            return donor.path, lambda: open_decompressed(store.open_blob(blob), compression)  # noqa: B023 (returned at once)
    return None


def _known_blob(
    store: Store, layer: ImageLayer, compression: str, epoch: int | None
) -> tuple[Descriptor, Digest] | None:
    """`layer`'s blob and diff_id if it has them or the store's index remembers them (blob present)."""
    import json

    from lamina.engine.cachekey import layer_blob_key
    from lamina.oci.image import Descriptor

    if layer.blob is not None and layer.diff_id is not None:
        return (layer.blob, layer.diff_id)
    memo = store.cache_get(layer_blob_key(layer.dir_id, compression, epoch))
    hit = None
    if memo is not None:
        record = json.loads(memo)
        digest = Digest.parse(record["digest"])
        if store.has_blob(digest):
            hit = (
                Descriptor(record["media_type"], digest, record["size"]),
                Digest.parse(record["diff_id"]),
            )
    return hit


def _record_blob(
    store: Store, layer: ImageLayer, blob: BlobInfo, info: LayerInfo, compression: str, epoch: int | None
) -> tuple[Descriptor, Digest]:
    """Record `layer`'s just-committed blob in the store's layer index and memo; its (descriptor, diff_id)."""
    import json

    from lamina.cache.store import LayerRecord
    from lamina.engine.cachekey import layer_blob_key
    from lamina.oci.compression import Compression
    from lamina.oci.image import Descriptor

    store.record_layer(LayerRecord(blob.digest, info.diff_id, info.media_type, blob.size))
    record = {
        "digest": str(blob.digest),
        "diff_id": str(info.diff_id),
        "size": blob.size,
        "media_type": info.media_type,
    }
    # An uncompressed tar (a pending image's, cache.store) is not kept by its memo: the
    # compressed blob is what stays, and the tar goes at the next prune once nothing names it.
    kept = [] if info.media_type == Compression.NONE.media_type else [blob.digest]
    refs = [*kept, Digest("sha256", layer.dir_id)] if layer.dir_id else kept
    store.cache_put(layer_blob_key(layer.dir_id, compression, epoch), json.dumps(record), refs=refs)
    return Descriptor(info.media_type, blob.digest, blob.size), info.diff_id


class _Noted:
    """A store blob writer that remembers whether a write to it failed (which layer a full disk
    hit) and can start over (`discard`: snapshot.Restartable); the one in use is aborted on
    leaving the `with` block uncommitted."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.out: BlobWriter = store.blob_writer()
        self.failed = False

    def __enter__(self) -> _Noted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.out.__exit__(*exc)

    def discard(self) -> None:
        """Drop every byte written so far: a new temporary blob."""
        self.out.abort()
        self.out = self._store.blob_writer()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self.out.write(data)
        except BaseException:
            self.failed = True
            raise


def make_image(
    store: Store,
    config: ImageConfig,
    layers: Sequence[ImageLayer],
    compression: str,
    epoch: int | None,
    lazy: bool = False,
) -> CommittedImage:
    """Make every layer blob (`layer_blob`), then commit the image (cache.images.commit_image).

    `lazy` (only the store needs the image): the layers without a `compression` blob yet are
    stored as uncompressed tars and the image is left pending (Store.add_pending), compressed
    by its first reader into the very blobs and manifest an eager commit makes; the config,
    hence the image ID, is the same either way.
    """
    from lamina.cache.images import commit_image
    from lamina.cache.store import LayerRecord, Store
    from lamina.oci.compression import Compression

    jobs = [(layer, [below.path for below in reversed(layers[:i])]) for i, layer in enumerate(layers)]
    later: list[int] = []
    if lazy and Compression.parse(compression) is not Compression.NONE:
        later = [
            i for i, (layer, _) in enumerate(jobs) if _known_blob(store, layer, compression, epoch) is None
        ]
    now = [i for i in range(len(jobs)) if i not in later]
    failed: list[int] = []
    target = Compression.parse(compression)
    doing = "write the layer tar" if target is Compression.NONE else f"compress the layer ({target.value})"
    try:
        blobs = layer_blobs(store, [jobs[i] for i in now], compression, epoch, failed)
        failed.clear()
        now = later  # failed[] counts in the second list now
        doing = "write the layer tar (uncompressed until the image is first read)"
        tars = layer_blobs(store, [jobs[i] for i in later], "none", epoch, failed) if later else []
    except DiskFull as err:
        # The layer was made by a step (maybe cached from an earlier build): name it,
        # as a failure while the step ran would.
        i = now[failed[0]] if failed and now else 0
        raise BuildError(f"{layers[i].step or f'layer {i + 1}'}: {doing}: {err}") from err
    made, uncompressed = iter(blobs), iter(tars)
    records = [
        LayerRecord(d.digest, diff_id, d.media_type, d.size)
        for d, diff_id in (next(uncompressed) if i in later else next(made) for i in range(len(layers)))
    ]
    codec = Compression.parse(compression).value
    try:
        image = commit_image(
            store,
            config,
            records,
            annotations=[epoch_annotations(x, epoch) for x in layers],
            manifest_annotations={Store.PENDING_ANNOTATION: codec} if later else None,
        )
    except DiskFull as err:
        raise BuildError(f"store the image's config and manifest: {err}") from err
    if not later:
        return image
    from lamina.engine.cachekey import layer_blob_key

    # each blob, once made, is remembered as layer_blobs remembers it (by its layer dir)
    pending = [
        (i, layer_blob_key(d, compression, epoch), Digest("sha256", d)) if d else (i, "", None)
        for i, d in ((i, layers[i].dir_id) for i in later)
    ]
    store.add_pending(image.manifest.digest, codec, pending)
    return dataclasses.replace(image, pending=True)


# --- writing outputs -------------------------------------------------------------------


def _open_dest(output: OutputSpec) -> contextlib.AbstractContextManager[BinaryIO]:
    import sys

    if output.to_stdout:
        return contextlib.nullcontext(sys.stdout.buffer)
    check_dest(output)  # again: the build may have taken a while
    from lamina.oci.layout import atomic_output

    return atomic_output(Path(output.dest))


def write_output(
    output: OutputSpec,
    store: Store,
    image: ImageToWrite,
    layer_dirs: Sequence[Path],
    names: Sequence[str],
    epoch: int | None,
    add_files: Callable[[Path], None] | None = None,
    trees: Sequence[tuple[Platform, Sequence[Path]]] | None = None,
) -> tuple[str, ...]:
    """Write one non-store output of an image; a full disk names the output and the path.

    `image` is what the output's attributes made of the committed image
    (engine.imageexport), or the committed image itself. Files are written
    under a temporary name beside `dest` and renamed when complete, so a
    failure leaves nothing under the output's name. `add_files` adds to a
    type=local/tar tree before it is final (attestations, as BuildKit's
    local and tar exporters write `provenance.json`). Returns warnings (what a
    rootless type=local export could not keep), one line each.
    """
    what = f"--output type={output.type.value},dest={output.dest}"
    try:
        return _write_output(output, store, image, layer_dirs, names, epoch, add_files, trees)
    except OutputError:
        raise
    except DiskFull as err:
        raise OutputError(f"{what}: {err}") from err
    except OSError as err:
        if is_disk_full(err):  # stdout (-o -) has no file name to give
            raise OutputError(
                f"{what}: {DiskFull.writing('stdout' if output.to_stdout else None, err)}"
            ) from err
        where = f"{os.fsdecode(err.filename)}: " if isinstance(err.filename, str | bytes) else ""
        raise OutputError(f"{what}: {where}{err.strerror or err}") from err


def _write_output(
    output: OutputSpec,
    store: Store,
    image: ImageToWrite,
    layer_dirs: Sequence[Path],
    names: Sequence[str],
    epoch: int | None,
    add_files: Callable[[Path], None] | None = None,
    trees: Sequence[tuple[Platform, Sequence[Path]]] | None = None,
) -> tuple[str, ...]:
    if output.type is OutputType.LOCAL:
        dest = Path(output.dest)
        root = dest / _platform_dir() if output.platform_split else dest
        warnings = write_rootfs(layer_dirs, root, epoch)
        if add_files is not None:
            add_files(root)
        return warnings
    if output.type is OutputType.TAR:
        _write_rootfs_tar(output, store, layer_dirs, epoch, add_files, trees)
        return ()
    if output.type in (OutputType.OCI, OutputType.DOCKER):
        # BuildKit's docker exporter writes the same tarball as its oci one (an OCI
        # layout with docker's manifest.json), in docker's media types by default.
        from lamina.oci.layout import ExportImage, write_oci_archive, write_oci_layout

        index = getattr(image, "index", None)
        extra = getattr(image, "extra", ())
        manifest, index = _with_created(store, image.config, image.manifest, index)
        from lamina.oci.reference import parse_reference

        # name= values as BuildKit's exporter reads them (ParseNormalizedNamed): org/r -> docker.io/org/r.
        wanted = [str(parse_reference(name)) for name in output.names]
        image_names = list(dict.fromkeys([*wanted, *names])) or [None]
        images = [
            ExportImage(name, manifest, image.config, image.layers, index, extra) for name in image_names
        ]
        if not output.tar:
            write_oci_layout(Path(output.dest), images, store)
            return ()
        with _open_dest(output) as out:
            write_oci_archive(out, images, store)
        return ()
    raise OutputError(f"output type {output.type.value} is written by the executor")  # IMAGE


class ImageToWrite(Protocol):
    """What an image output writes: the committed image or what an output's attributes made
    of it (engine.imageexport.ExportedImage, which may add `index` and `extra` blobs)."""

    @property
    def manifest(self) -> Descriptor: ...

    @property
    def config(self) -> Descriptor: ...

    @property
    def layers(self) -> tuple[Descriptor, ...]: ...


def _with_created(
    store: Store, config: Descriptor, manifest: Descriptor, index: Descriptor | None
) -> tuple[Descriptor, Descriptor | None]:
    """The index.json entry annotated `org.opencontainers.image.created`, as BuildKit's oci and
    docker exporters do: the image's own `created` (SOURCE_DATE_EPOCH when set), in whole
    seconds, so a no-op rebuild writes the same index.json (BuildKit uses the time of export)."""
    import json

    from lamina.oci.image import MAX_DOCUMENT

    top = index if index is not None else manifest
    created = json.loads(store.read_blob(config.digest, MAX_DOCUMENT)).get("created")
    if not isinstance(created, str) or len(created) < 19 or top.annotation(CREATED) is not None:
        return manifest, index
    top = top.replace_annotations({**dict(top.annotations), CREATED: created[:19] + "Z"})
    return (manifest, top) if index is not None else (top, None)


CREATED = "org.opencontainers.image.created"


def _platform_dir(platform: Platform | None = None) -> str:
    """platform-split=true: BuildKit's directory for a platform (`linux_arm_v7`; None: the host's)."""
    from lamina.oci.image import host_platform

    return str(platform or host_platform()).replace("/", "_")


def _write_rootfs_tar(
    output: OutputSpec,
    store: Store,
    layer_dirs: Sequence[Path],
    epoch: int | None,
    add_files: Callable[[Path], None] | None = None,
    trees: Sequence[tuple[Platform, Sequence[Path]]] | None = None,
) -> None:
    """type=tar: the merged root filesystem as one uncompressed tar; `trees` (a multi-platform
    build's layer dirs per platform): each platform's under its directory, as BuildKit's."""
    import tempfile

    from lamina.oci.compression import Compression
    from lamina.oci.layer import write_layer
    from lamina.oci.walk import entries_from_tree

    scratch = Path(tempfile.mkdtemp(prefix=".tmp-rootfs-", dir=store.root))
    # Rootless, the tree is the caller's (root in the container); the owners are kept aside.
    owners = ContainerOwners() if os.geteuid() != 0 else None
    try:
        if trees is not None:  # several platforms: linux_amd64/, linux_arm64/, ...
            (scratch / "root").mkdir(mode=0o755)
            for platform, dirs in trees:
                merge_layers(dirs, scratch / "root" / _platform_dir(platform), record=True, owners=owners)
                os.chmod(scratch / "root" / _platform_dir(platform), 0o755)
        elif output.platform_split:  # the tree under linux_amd64/, as BuildKit splits it
            (scratch / "root").mkdir(mode=0o755)
            merge_layers(layer_dirs, scratch / "root" / _platform_dir(), record=True, owners=owners)
            os.chmod(scratch / "root" / _platform_dir(), 0o755)
        else:
            merge_layers(layer_dirs, scratch / "root", record=True, owners=owners)
        if add_files is not None:
            add_files(scratch / "root" / _platform_dir() if output.platform_split else scratch / "root")
        with _open_dest(output) as out:
            # lamina's records (an xattr it could not set on the scratch tree) leave as themselves.
            # Device placeholders (a rootless build's device nodes) leave as the devices.
            walked = entries_from_tree(scratch / "root", uid_map=owners.inside if owners else None)
            if owners is not None:
                walked = (owners.apply(scratch / "root", e) for e in walked)
            entries = (
                dataclasses.replace(e, xattrs=xattrs.from_disk(e.xattrs)) if e.xattrs else e
                for e in map(recorded.restore, walked)
            )
            if epoch is not None:  # BuildKit's tar exporter times every file by SOURCE_DATE_EPOCH
                entries = (dataclasses.replace(e, mtime=epoch) for e in entries)
            write_layer(entries, out, Compression.NONE, source_date_epoch=epoch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
