"""Build outputs: parse `-o/--output` specs as buildx does, and write them.

    -o type=oci,dest=img.tar         OCI archive (also carries manifest.json)
    -o type=docker,dest=img.tar      docker-archive, for `docker load`
    -o type=local,dest=DIR           the target's root filesystem
    -o type=tar,dest=rootfs.tar      the root filesystem as one tar
    -o type=image[,name=a:b]         the local image store (the default)
    -o DIR                           shorthand for type=local,dest=DIR
    -o -                             shorthand for type=tar to stdout

`dest=-` writes the archive to stdout. Writing is done by the OCI writers
(lamina.oci.layout / dockerarchive) and by `write_rootfs()` here, which
merges a stack of overlay-form layer directories into one tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from lamina.errors import OutputError


class OutputType(enum.Enum):
    IMAGE = "image"
    OCI = "oci"
    DOCKER = "docker"
    LOCAL = "local"
    TAR = "tar"


@dataclasses.dataclass(frozen=True, slots=True)
class OutputSpec:
    type: OutputType
    dest: str = ""  # a path, or "-" for stdout; "" for type=image
    names: tuple[str, ...] = ()  # name=... (comma-joined in buildx; quoted form not supported)
    compression: str = ""  # "" means the build's --compression
    tar: bool = True  # type=oci,tar=false writes a layout directory

    @property
    def to_stdout(self) -> bool:
        return self.dest == "-"


_KNOWN_KEYS = {"type", "dest", "name", "compression", "tar", "oci-mediatypes", "force-compression"}


def parse_output(spec: str) -> OutputSpec:
    """One `-o` value: `type=...,dest=...`, or buildx's `DIR` / `-` shorthands."""
    text = spec.strip()
    if not text:
        raise OutputError("empty --output value")
    if text == "-":
        return OutputSpec(OutputType.TAR, dest="-")
    if "=" not in text:
        return OutputSpec(OutputType.LOCAL, dest=text)
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise OutputError(f"invalid --output {spec!r}: {part!r} is not key=value")
        if key not in _KNOWN_KEYS:
            raise OutputError(f"invalid --output {spec!r}: unknown key {key!r}")
        if key == "name" and "name" in fields:
            fields["name"] += "," + value
        else:
            fields[key] = value
    kind = fields.get("type", "")
    if not kind:
        raise OutputError(f"invalid --output {spec!r}: missing type=")
    if kind == "registry":
        raise OutputError("--output type=registry is not supported: build, then `lamina push`")
    try:
        output_type = OutputType(kind)
    except ValueError:
        choices = ", ".join(t.value for t in OutputType)
        raise OutputError(f"invalid --output {spec!r}: unknown type {kind!r} (use {choices})") from None
    dest = fields.get("dest", "")
    if output_type is not OutputType.IMAGE and not dest:
        raise OutputError(f"invalid --output {spec!r}: type={kind} needs dest=")
    compression = fields.get("compression", "")
    if compression and compression not in ("gzip", "zstd", "uncompressed", "none"):
        raise OutputError(f"invalid --output {spec!r}: compression must be gzip, zstd or uncompressed")
    if compression == "uncompressed":
        compression = "none"
    tar_value = fields.get("tar", "true").lower()
    if tar_value not in ("true", "false"):
        raise OutputError(f"invalid --output {spec!r}: tar must be true or false")
    names = tuple(name for name in fields.get("name", "").split(",") if name)
    return OutputSpec(output_type, dest, names, compression, tar_value == "true")


def parse_outputs(specs: Sequence[str]) -> tuple[OutputSpec, ...]:
    outputs = tuple(parse_output(spec) for spec in specs)
    if sum(1 for output in outputs if output.to_stdout) > 1:
        raise OutputError("only one --output can write to stdout")
    return outputs


# --- root filesystem from overlay-form layer directories ----------------------------------

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: Path) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _remove(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _copy_entry(src: Path, dst: Path, st: os.stat_result, links: dict[tuple[int, int], Path]) -> None:
    mode = st.st_mode
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
            return
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(mode):
            shutil.copyfile(src, dst, follow_symlinks=False)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst)
        else:
            try:
                os.mknod(dst, mode, st.st_rdev)
            except PermissionError:
                return  # device nodes need privilege; a rootfs export skips them
        if st.st_nlink > 1:
            links[key] = dst
    # Unprivileged export: files end up owned by the caller.
    with contextlib.suppress(PermissionError):
        os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(mode):
        os.chmod(dst, stat.S_IMODE(mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def merge_layers(layer_dirs: Sequence[Path], dest: Path) -> None:
    """Apply overlay-form layer dirs (bottom first) onto `dest`, honouring whiteouts.

    A 0/0 char device deletes the path below it; an opaque dir hides the
    lower dir's contents. Directory modes and times are set after their
    contents, so a read-only directory can still be filled.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for layer in layer_dirs:
        links: dict[tuple[int, int], Path] = {}
        dir_stats: list[tuple[Path, os.stat_result]] = []
        for root, dirs, files in os.walk(layer):
            rel = Path(root).relative_to(layer)
            dirs.sort()
            for name in sorted(files) + [d for d in dirs if Path(root, d).is_symlink()]:
                src = Path(root, name)
                st = src.lstat()
                target = dest / rel / name
                if _is_whiteout(st):
                    _remove(target)
                else:
                    _copy_entry(src, target, st, links)
            for name in list(dirs):
                src = Path(root, name)
                if src.is_symlink():
                    dirs.remove(name)
                    continue
                st = src.lstat()
                target = dest / rel / name
                if _is_opaque(src):
                    _remove(target)
                _copy_entry(src, target, st, links)
                os.chmod(target, 0o700 | stat.S_IMODE(st.st_mode))
                dir_stats.append((target, st))
        for target, st in reversed(dir_stats):
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def write_rootfs(layer_dirs: Sequence[Path], dest: Path) -> None:
    """type=local: the merged root filesystem in `dest` (created if missing)."""
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"--output type=local: {dest} exists and is not a directory")
    merge_layers(layer_dirs, dest)
