"""Layer reader and extractor: every byte of a layer is hostile.

`extract_layer` unpacks one layer stream (gzip, zstd or plain, sniffed by
magic) into a directory. What it guarantees, and where:
- Names and hard-link targets pass through `safepath.clean` (no absolute
  paths, no `..`, no NUL) and are resolved by descriptor with O_NOFOLLOW
  (`safepath.Root`): no entry is ever written through a symlink, so nothing
  lands outside the target directory.
- The last component is never followed: an existing path is unlinked (or,
  for a directory, removed recursively without following links) before a
  new entry is created with O_EXCL, so a file hard-linked or symlinked to
  somewhere else is replaced, not written into.
- Content is copied in fixed chunks and counted against the header size;
  a truncated stream or a missing end-of-archive marker is an error.
- Owner before mode (chown clears setuid/setgid); xattrs after chown (it
  clears security.capability); directory modes and mtimes last, deepest
  first (creating a child changes its parent's mtime, and a read-only
  directory would stop the children).
- Whiteouts, in one of two forms (`Whiteouts`). A path this layer itself
  wrote is never removed by a whiteout or opaque marker of the same layer
  (`_touched`), as Docker and umoci also do.
- Hostile overlayfs xattrs (`trusted.overlay.*`, `user.overlay.*`) in the
  tar are dropped: they would let a layer fake whiteouts or redirects once
  the directory is used as an overlay lower dir.

Not privileged: a chown failure is an error unless `ignore_owners`, said
once in the returned warnings. A device node mknod refuses (a user
namespace, a plain uid) becomes a placeholder file with `record_devices`
(`lamina.oci.recorded`: a layer dir or an upper dir, which lamina reads
back as the device), else it is skipped and said once. With
`record_owners` (a plain uid with no user namespace) nothing is chowned:
owners other than 0:0 are recorded in `user.lamina.owner` xattrs and device
nodes are placeholders, so the layer dir still knows them; an owner a
symlink would need is an error.

On error the target directory is left half-written; callers unpack into a
temporary directory and rename it on success.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lamina.errors import DiskFull, LayerError, UnsafePath, is_disk_full
from lamina.oci.compression import CHUNK, HashingReader, drain, open_decompressed, sniff_stream
from lamina.oci.digest import Digest
from lamina.oci.entry import EntryType, LayerEntry
from lamina.oci.overlay import OPAQUE_MARKER, WHITEOUT_PREFIX
from lamina.oci.safepath import Root, clean, remove_tree, split

__all__ = ["BoundedTarInfo", "ExtractResult", "NeedsNamespace", "Whiteouts", "extract_layer", "iter_layer"]

_AUFS_META_PREFIX = ".wh..wh."  # aufs bookkeeping (.wh..wh.plnk...), not a whiteout
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_ZEROS = bytes(CHUNK)
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_PERMITTED = (errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


class NeedsNamespace(LayerError):
    """`extract_layer(as_namespace_root=True)` met an entry that only a user namespace's root
    can make as the layer says: unpack the layer there instead (into an empty directory)."""


class Whiteouts(enum.Enum):
    """What to do with `.wh.NAME` and `.wh..wh..opq` entries."""

    # Delete the whited-out path / the opaque directory's older content:
    # for applying layers in order onto one tree (type=local output).
    APPLY = "apply"
    # Write overlayfs's form, for a directory used as an overlay lower dir:
    # a char device 0/0 for `.wh.NAME`, the `overlay.opaque=y` xattr for
    # `.wh..wh..opq` (`user.` with `userxattr`, else `trusted.`).
    OVERLAY = "overlay"


@dataclasses.dataclass(frozen=True, slots=True)
class ExtractResult:
    digest: Digest  # of the stream as read (compressed)
    diff_id: Digest  # of the uncompressed tar
    size: int  # bytes read
    entries: int
    warnings: tuple[str, ...]  # each said once, e.g. skipped device nodes


def extract_layer(
    stream: BinaryIO,
    dest: Path,
    *,
    whiteouts: Whiteouts = Whiteouts.APPLY,
    userxattr: bool = False,
    ignore_owners: bool = False,
    digest: Digest | None = None,
    record_owners: bool = False,
    record_devices: bool = False,
    device_placeholders: bool = False,
    as_namespace_root: bool = False,
) -> ExtractResult:
    """Unpack the layer `stream` into the directory `dest` (made if missing).

    `digest`, when given, names the layer in errors and the stream must hash
    to it (checked at the end: on a mismatch `dest` must be discarded).
    `ignore_owners` lets a chown that the process may not do be skipped,
    for rootless unpacking where every file ends up owned by the caller.
    `device_placeholders`: device nodes as `lamina.oci.recorded` placeholders even
    where mknod works (root's layer dirs: a step's user namespace can copy a
    placeholder up to chmod it, never a real node).
    `as_namespace_root`: a plain caller unpacking what a user namespace's root
    (the caller's id) would, byte for byte: owners 0:0 are the caller's own;
    anything only that root can make as the layer says (another owner, an xattr
    outside `user.`, an overlay whiteout) raises `NeedsNamespace` at once.
    """
    label = f"unpack {digest.short if digest else 'layer'}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        root = Root(dest)  # O_NOFOLLOW: the target itself must be a real directory
    except OSError as err:
        raise LayerError(f"{label}: target directory {dest}: {err.strerror or err}") from err
    with root, _open_tar(stream, label) as (tar, compressed, uncompressed):
        records = (record_owners, record_devices, device_placeholders)
        unpacker = _Unpacker(root, label, whiteouts, userxattr, ignore_owners, *records, as_namespace_root)
        count = 0
        for member in _members(tar, label):
            unpacker.add(member, tar)
            count += 1
        _drain(uncompressed, label)
        _drain(compressed, label)
        unpacker.finish_dirs()
    result = ExtractResult(
        digest=compressed.digest,
        diff_id=uncompressed.digest,
        size=compressed.count,
        entries=count,
        warnings=unpacker.warnings.summary(),
    )
    if digest is not None and result.digest != digest:
        raise LayerError(f"{label}: stream hashes to {result.digest}, not {digest}")
    return result


def iter_layer(stream: BinaryIO, *, digest: Digest | None = None) -> Iterator[LayerEntry]:
    """List a layer's entries (paths cleaned, whiteouts as `.wh.` names,
    no content: `open` is None). Unsafe names raise LayerError."""
    label = f"read {digest.short if digest else 'layer'}"
    with _open_tar(stream, label) as (tar, _, _):
        for member in _members(tar, label):
            try:
                path = clean(member.name)
                linkname = clean(member.linkname) if member.islnk() else member.linkname
            except UnsafePath as err:
                raise LayerError(f"{label}: {show(member.name)}: {err}") from None
            if not path:
                continue
            yield LayerEntry(
                path,
                _entry_type(member, label),
                mode=member.mode & 0o7777,
                uid=member.uid,
                gid=member.gid,
                size=member.size if member.isreg() else 0,
                mtime=int(member.mtime),
                linkname=linkname,
                devmajor=member.devmajor if member.ischr() or member.isblk() else 0,
                devminor=member.devminor if member.ischr() or member.isblk() else 0,
                xattrs=tuple(sorted(_xattrs(member))),
            )


def show(name: str, limit: int = 120) -> str:
    """A tar name fit for a one-line message: odd bytes escaped, long names cut."""
    text = name if name.isprintable() else repr(name)[1:-1]
    if len(text) > limit:
        return f"{text[: limit // 2]}...{text[-limit // 2 :]} ({len(name)} characters)"
    return text


# -- reading the tar ------------------------------------------------------


# A PAX or GNU long-name header is read whole into memory by tarfile: a gzip
# bomb of one (a few MB compressed) would take gigabytes. Go's archive/tar
# (BuildKit, containerd) refuses such headers over 1 MiB (maxSpecialFileSize).
MAX_SPECIAL_HEADER = 1 << 20
_SPECIAL_HEADERS = {
    tarfile.XHDTYPE: "PAX",
    tarfile.XGLTYPE: "PAX global",
    tarfile.SOLARIS_XHDTYPE: "PAX",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link",
}


def special_header_too_large(info: tarfile.TarInfo) -> str:
    """Why `info`'s PAX or GNU long-name header is refused unread ("" when it is not)."""
    kind = _SPECIAL_HEADERS.get(info.type)
    if kind is None or info.size <= MAX_SPECIAL_HEADER:
        return ""
    return (
        f"a {kind} header of {info.size} bytes at byte {info.offset} "
        f"(lamina's limit, as Go's archive/tar: {MAX_SPECIAL_HEADER} bytes)"
    )


class BoundedTarInfo(tarfile.TarInfo):
    """For any tarfile reading hostile input (`tarinfo=BoundedTarInfo`): a special
    header over MAX_SPECIAL_HEADER is a tarfile.ReadError, never read into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        why = special_header_too_large(self)
        if why:
            raise tarfile.SubsequentHeaderError(why)  # tarfile turns it into a ReadError
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends an archive silently at a damaged or missing header once
    past the first member; a layer must end with a zero block instead. Its
    special headers are bounded (MAX_SPECIAL_HEADER) before they are read."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.EmptyHeaderError:
            raise LayerError("truncated: the stream ends without an end-of-archive marker") from None
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as err:
            raise LayerError(f"damaged tar header at byte {tarfile_.offset}: {err}") from None

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        why = special_header_too_large(self)
        if why:
            raise LayerError(why)
        return super()._proc_member(tarfile_)  # type: ignore[misc]


@contextlib.contextmanager
def _open_tar(stream: BinaryIO, label: str) -> Iterator[tuple[tarfile.TarFile, HashingReader, HashingReader]]:
    compressed = HashingReader(stream)
    try:
        compression, raw = sniff_stream(compressed)  # type: ignore[arg-type]
        uncompressed = HashingReader(open_decompressed(raw, compression))
        # Not tarfile's stream mode ("r|"): its buffer is re-sliced, a copy of up to
        # bufsize bytes, on every read of a header or a file. "r:" over a C buffered reader
        # slices in C; tarfile only ever seeks forward, which _Forward does by reading.
        tar = tarfile.open(  # noqa: SIM115 - closed by the with below
            fileobj=io.BufferedReader(_Forward(uncompressed), CHUNK),
            mode="r:",
            encoding="utf-8",
            errors="surrogateescape",
            tarinfo=_StrictTarInfo,
        )
    except LayerError as err:
        raise LayerError(f"{label}: {err}") from err
    except (tarfile.TarError, OSError, EOFError) as err:
        raise LayerError(f"{label}: not a tar stream: {err}") from err
    with tar:
        yield tar, compressed, uncompressed


class _Forward(io.RawIOBase):
    """A forward-only stream as a raw file that tarfile may seek in: forward, by reading."""

    def __init__(self, source: HashingReader) -> None:
        self._source = source
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset + (self._position if whence == os.SEEK_CUR else 0)
        if whence == os.SEEK_END or target < self._position:
            raise io.UnsupportedOperation("a layer stream is read forward only")
        while self._position < target:
            skipped = len(self._source.read(min(CHUNK, target - self._position)))
            if not skipped:
                break  # past the end: the next read says so
            self._position += skipped
        return self._position


def _members(tar: tarfile.TarFile, label: str) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            member = tar.next()
        except LayerError as err:
            raise LayerError(f"{label}: {err}") from err
        except (tarfile.TarError, OSError, EOFError, UnicodeError) as err:
            raise LayerError(f"{label}: broken tar stream: {err}") from err
        if member is None:
            return
        tar.members.clear()  # stream mode still keeps every TarInfo otherwise
        yield member


def _drain(reader: HashingReader, label: str) -> None:
    """Read to the end: the digests cover all bytes, and a compressed stream
    is only known to be intact once its end is decoded."""
    try:
        drain(reader)  # type: ignore[arg-type]
    except LayerError as err:
        raise LayerError(f"{label}: {err}") from err
    except (OSError, EOFError) as err:
        raise LayerError(f"{label}: broken stream: {err}") from err


def _entry_type(member: tarfile.TarInfo, label: str) -> EntryType:
    if member.isreg():
        return EntryType.FILE
    if member.isdir():
        return EntryType.DIR
    if member.issym():
        return EntryType.SYMLINK
    if member.islnk():
        return EntryType.HARDLINK
    if member.ischr():
        return EntryType.CHAR
    if member.isblk():
        return EntryType.BLOCK
    if member.isfifo():
        return EntryType.FIFO
    raise LayerError(f"{label}: {show(member.name)}: unsupported tar entry type {member.type!r}")


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The entry's mtime in nanoseconds: a PAX `mtime` record exactly (tarfile's float
    keeps about a microsecond of a 2020s time), else the header's whole seconds."""
    record = member.pax_headers.get("mtime", "")
    sign = -1 if record.startswith("-") else 1
    whole, _, fraction = record.lstrip("-").partition(".")
    if whole.isdigit() and (fraction.isdigit() or not fraction):
        return sign * (int(whole) * 1_000_000_000 + int(fraction[:9].ljust(9, "0")))
    return int(member.mtime * 1_000_000_000)


def _xattrs(member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    for key, value in member.pax_headers.items():
        if key.startswith(_XATTR_PAX_PREFIX):
            yield key[len(_XATTR_PAX_PREFIX) :], value.encode("utf-8", "surrogateescape")


# -- writing the tree -----------------------------------------------------


class _Warnings:
    """Problems worth saying once, with a count and a first example."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, str]] = {}

    def add(self, what: str, path: str) -> None:
        count, first = self._seen.get(what, (0, path))
        self._seen[what] = (count + 1, first)

    def summary(self) -> tuple[str, ...]:
        return tuple(
            f"{what}: {count} {'entry' if count == 1 else 'entries'} (first: {first})"
            for what, (count, first) in self._seen.items()
        )


class _Unpacker:
    def __init__(
        self,
        root: Root,
        label: str,
        whiteouts: Whiteouts,
        userxattr: bool,
        ignore_owners: bool,
        record_owners: bool = False,
        record_devices: bool = False,
        device_placeholders: bool = False,
        as_namespace_root: bool = False,
    ) -> None:
        self._root = root
        self._as_namespace_root = as_namespace_root
        self._label = label
        self._whiteouts = whiteouts
        self._opaque_xattr = ("user" if userxattr else "trusted") + ".overlay.opaque"
        self._ignore_owners = ignore_owners
        self._record = record_owners
        self._record_devices = record_devices or record_owners
        self._placeholders = device_placeholders or record_owners
        # Paths written by this layer, with all their ancestors: a whiteout
        # or opaque marker of the same layer must leave them alone.
        self._touched: set[str] = set()
        self._dirs: dict[str, tuple[int, int]] = {}  # path -> (mode, mtime_ns), set last
        self.warnings = _Warnings()
        self._buffer = memoryview(bytearray(CHUNK))  # one copy buffer for every file

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        rel = ""
        try:
            rel = clean(member.name)
            self._add(rel, member, tar)
        except NeedsNamespace:
            raise
        except LayerError as err:
            raise LayerError(f"{self._label}: {show(member.name)}: {err}") from err
        except OSError as err:
            if is_disk_full(err):  # not the layer's fault: say where it was going
                path = os.path.join(self._root.path, rel)
                raise DiskFull.writing(path, err).within(self._label) from err
            raise LayerError(f"{self._label}: {show(member.name)}: {err.strerror or err}") from err
        except (tarfile.TarError, EOFError) as err:
            raise LayerError(f"{self._label}: {show(member.name)}: broken tar stream: {err}") from err
        except RecursionError:  # an opaque marker above this layer's own very deep tree
            raise LayerError(f"{self._label}: {show(member.name)}: directory tree too deep") from None

    def _add(self, rel: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        kind = _entry_type(member, self._label)
        parent, base = split(rel)
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base, rel)
            return
        if not rel:
            if kind is not EntryType.DIR:
                raise UnsafePath("entry would replace the root directory")
            return  # the target directory's own metadata is the caller's
        with self._root.parent(rel, create=True) as found:
            assert found is not None  # create=True
            parent_fd, name = found
            self._make_room(parent_fd, name, kind is EntryType.DIR)
            self._create(parent_fd, name, rel, kind, member, tar)
        self._touch(rel)

    def _touch(self, rel: str) -> None:
        while rel and rel not in self._touched:
            self._touched.add(rel)
            rel = split(rel)[0]

    def _make_room(self, parent_fd: int, name: str, is_dir: bool) -> None:
        """Remove what is at `name` unless both it and the new entry are directories."""
        try:
            mode = os.lstat(name, dir_fd=parent_fd).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            if not is_dir:
                self._root.forget()  # never inside this tree (its parent was resolved last); cheap insurance
                remove_tree(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)

    def _create(
        self,
        parent_fd: int,
        name: str,
        rel: str,
        kind: EntryType,
        member: tarfile.TarInfo,
        tar: tarfile.TarFile,
    ) -> None:
        mode = member.mode & 0o7777
        mtime_ns = _mtime_ns(member)
        if kind is EntryType.DIR:
            with contextlib.suppress(FileExistsError):  # merging into an existing directory
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            try:
                self._chown(lambda: os.fchown(fd, member.uid, member.gid), member, fd)
                self._set_xattrs(fd, member, rel)
            finally:
                os.close(fd)
            self._dirs[rel] = (mode, mtime_ns)
        elif kind is EntryType.FILE:
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent_fd)
            try:
                self._copy_content(fd, member, tar)
                self._chown(lambda: os.fchown(fd, member.uid, member.gid), member, fd)
                self._set_xattrs(fd, member, rel)
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
        elif kind is EntryType.HARDLINK:
            self._link(parent_fd, name, member.linkname)
        elif kind is EntryType.SYMLINK:
            if "\0" in member.linkname:
                raise UnsafePath("symlink target contains a NUL byte")
            os.symlink(member.linkname, name, dir_fd=parent_fd)
            self._chown(
                lambda: os.chown(name, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False),
                member,
                -1,
            )
            if any(True for _ in _xattrs(member)):
                self.warnings.add("xattrs on symlinks are not restored", rel)
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
        else:
            self._node(parent_fd, name, rel, kind, member, mode, mtime_ns)

    def _copy_content(self, fd: int, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        source = tar.extractfile(member)
        assert source is not None  # a regular file
        view = self._buffer
        copied = 0
        hole = False
        while copied < member.size:
            try:
                n = source.readinto(view[: min(CHUNK, member.size - copied)])
            except tarfile.ReadError:
                raise LayerError(f"short file: the stream ends inside its {member.size} bytes") from None
            if not n:
                break
            copied += n
            hole = n == CHUNK and _ZEROS.startswith(view)
            if hole:  # a sparse file stays sparse
                os.lseek(fd, n, os.SEEK_CUR)
                continue
            written = 0
            while written < n:
                written += os.write(fd, view[written:n])
        if copied != member.size:
            raise LayerError(f"short file, {copied} of {member.size} bytes")
        if hole:
            os.ftruncate(fd, copied)  # it ended in a hole: the size is set by hand

    def _link(self, parent_fd: int, name: str, linkname: str) -> None:
        try:
            target = clean(linkname)
        except UnsafePath as err:
            raise UnsafePath(f"hard link target {linkname!r}: {err}") from None
        if not target:
            raise UnsafePath("hard link to the root directory")
        try:
            with self._root.parent(target, create=False) as found:
                if found is None:
                    raise FileNotFoundError(errno.ENOENT, "no such file")
                target_fd, target_name = found
                os.link(target_name, name, src_dir_fd=target_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise LayerError(f"hard link target {linkname!r} does not exist") from None
        except UnsafePath as err:
            raise UnsafePath(f"hard link target {linkname!r}: {err}") from None
        except PermissionError as err:  # e.g. a directory
            raise LayerError(f"cannot hard-link to {linkname!r}: {err.strerror}") from None

    def _node(
        self,
        parent_fd: int,
        name: str,
        rel: str,
        kind: EntryType,
        member: tarfile.TarInfo,
        mode: int,
        mtime_ns: int,
    ) -> None:
        if self._placeholders and kind is not EntryType.FIFO:
            self._placeholder(parent_fd, name, kind, member, mode, mtime_ns)
            return
        try:
            if kind is EntryType.FIFO:
                os.mkfifo(name, 0o600, dir_fd=parent_fd)
            else:
                fmt = stat.S_IFCHR if kind is EntryType.CHAR else stat.S_IFBLK
                os.mknod(name, fmt | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent_fd)
        except PermissionError:
            if kind is EntryType.FIFO or not self._record_devices:
                self.warnings.add("device nodes skipped (creating them needs privilege)", rel)
                return
            # A user namespace may not mknod: the placeholder is read back as the device.
            try:
                self._placeholder(parent_fd, name, kind, member, mode, mtime_ns)
            except OSError as err:
                if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self.warnings.add("device nodes skipped (no privilege, no user xattrs to record them)", rel)
            return
        self._chown(lambda: os.chown(name, member.uid, member.gid, dir_fd=parent_fd), member, -1)
        # Just created by us, not a symlink: following is safe, and Linux
        # cannot chmod without following anyway.
        os.chmod(name, mode, dir_fd=parent_fd)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)

    def _placeholder(
        self, parent_fd: int, name: str, kind: EntryType, member: tarfile.TarInfo, mode: int, mtime_ns: int
    ) -> None:
        """An empty file recording the device node (`lamina.oci.recorded`), with its owner and mode."""
        from lamina.oci import recorded

        which = "c" if kind is EntryType.CHAR else "b"
        recorded.make_device(name, which, member.devmajor, member.devminor, 0o600, dir_fd=parent_fd)
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            self._chown(lambda: os.fchown(fd, member.uid, member.gid), member, fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)

    def _chown(self, do: Callable[[], None], member: tarfile.TarInfo, fd: int) -> None:
        """`do` the chown; recording owners, set the xattr on `fd` instead (-1: none can be set)."""
        if self._as_namespace_root:
            if (member.uid, member.gid) != (0, 0):
                raise NeedsNamespace(f"owner {member.uid}:{member.gid}")
            return  # the caller's own id is the namespace's root
        if self._record:
            if (member.uid, member.gid) == (0, 0):
                return
            if fd < 0:
                raise LayerError(
                    f"cannot record owner {member.uid}:{member.gid} of a symlink or FIFO without "
                    "chown privilege (unpack as root or where user namespaces work)"
                )
            from lamina.oci import recorded

            recorded.set_owner_fd(fd, member.uid, member.gid)
            return
        try:
            do()
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EINVAL):  # EINVAL: id not mapped in this namespace
                raise
            if self._ignore_owners:
                return
            raise LayerError(
                f"cannot set owner {member.uid}:{member.gid} ({err.strerror}); "
                "unpack as root, in a user namespace that maps it, or ignore owners"
            ) from None

    def _set_xattrs(self, fd: int, member: tarfile.TarInfo, rel: str) -> None:
        for name, value in _xattrs(member):
            if name.startswith(_OVERLAY_XATTR_PREFIXES):
                self.warnings.add("overlayfs xattrs in the layer dropped", rel)
                continue
            if name.startswith("user.lamina."):  # would fake lamina's own records of owners
                self.warnings.add("lamina's own xattrs in the layer dropped", rel)
                continue
            if self._as_namespace_root and not name.startswith("user."):
                raise NeedsNamespace(f"xattr {name}")  # set as it is only by the namespace's root
            try:
                os.setxattr(fd, name, value)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.E2BIG):
                    # ext4 says ENOSPC for a value larger than its xattr block, on a roomy disk.
                    raise LayerError(
                        f"xattr {name} of {len(value)} bytes: {err.strerror} (this file system "
                        "is full, or takes no xattr that large)"
                    ) from None
                if err.errno not in _NOT_PERMITTED:
                    raise
                if not name.startswith("user."):
                    # Kept as lamina's record (security.capability as a plain uid): the
                    # layer capture and COPY read it back as NAME (lamina.oci.xattrs).
                    from lamina.oci.xattrs import RECORDED_PREFIX

                    with contextlib.suppress(OSError):  # no user xattrs here: say it, below
                        os.setxattr(fd, RECORDED_PREFIX + name, value)
                        continue
                self.warnings.add(f"xattr {name} not restored ({err.strerror})", rel)

    # -- whiteouts --------------------------------------------------------

    def _whiteout(self, parent: str, base: str, rel: str) -> None:
        if base == OPAQUE_MARKER:
            self._opaque(parent)
            return
        if base.startswith(_AUFS_META_PREFIX):
            self.warnings.add("aufs metadata entries ignored", rel)
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise UnsafePath(f"whiteout of {target!r}")
        path = f"{parent}/{target}" if parent else target
        if path in self._touched:
            return  # written by this same layer: the whiteout is for the layers below
        if self._whiteouts is Whiteouts.APPLY:
            with self._root.parent(path, create=False) as found:
                if found is not None:
                    parent_fd, name = found
                    with contextlib.suppress(FileNotFoundError):
                        self._make_room(parent_fd, name, False)
            return
        with self._root.parent(path, create=True) as found:
            assert found is not None
            parent_fd, name = found
            self._make_room(parent_fd, name, False)
            try:
                os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent_fd)
            except PermissionError as err:
                if self._as_namespace_root:
                    raise NeedsNamespace("an overlay whiteout") from None
                raise LayerError(f"cannot create an overlay whiteout device: {err.strerror}") from None

    def _opaque(self, parent: str) -> None:
        if self._whiteouts is Whiteouts.APPLY:
            fd = self._root.open_dir(parent, create=False)
            if fd is not None:
                try:
                    self._clear_untouched(fd, parent)
                finally:
                    os.close(fd)
            return
        fd = self._root.open_dir(parent, create=True)
        assert fd is not None
        try:
            # An O_PATH descriptor cannot take xattrs; its /proc link can.
            os.setxattr(f"/proc/self/fd/{fd}", self._opaque_xattr, b"y")
        except OSError as err:
            raise LayerError(
                f"cannot mark {parent or '/'} opaque ({self._opaque_xattr}): {err.strerror}"
            ) from None
        finally:
            os.close(fd)

    def _clear_untouched(self, dir_fd: int, prefix: str) -> None:
        """Remove everything under `dir_fd` that this layer did not write."""
        listing_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            names = os.listdir(listing_fd)
        finally:
            os.close(listing_fd)
        for name in names:
            path = f"{prefix}/{name}" if prefix else name
            if path not in self._touched:
                self._make_room(dir_fd, name, False)
                continue
            if stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
                child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self._clear_untouched(child, path)
                finally:
                    os.close(child)

    # -- last -------------------------------------------------------------

    def finish_dirs(self) -> None:
        """Directory modes and mtimes, deepest first."""
        for rel in sorted(self._dirs, key=lambda path: path.count("/"), reverse=True):
            mode, mtime_ns = self._dirs[rel]
            try:
                with self._root.parent(rel, create=False) as found:
                    if found is None:
                        continue
                    parent_fd, name = found
                    if not stat.S_ISDIR(os.lstat(name, dir_fd=parent_fd).st_mode):
                        continue  # replaced by a later entry
                    os.chmod(name, mode, dir_fd=parent_fd)
                    os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed by a later whiteout
            except (OSError, UnsafePath) as err:
                raise LayerError(f"{self._label}: {rel}: setting directory metadata: {err}") from err
