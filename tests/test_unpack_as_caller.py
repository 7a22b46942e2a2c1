"""Rootless with subordinate ids, a base layer whose every entry is root's is unpacked in the
build's own process (lamina.engine.unpack), not by a helper in the user namespace; the layer
dir is the helper's, entry for entry. Anything only the namespace's root can make as the layer
says (another owner, a security xattr, an overlay whiteout) goes to the helper.

Run as root and, by tests/test_unprivileged.py, as lamina-sb-sub (subordinate ids) and
lamina-sb-nosub (one id): the trees must match everywhere; the helper is skipped only with
subordinate ids.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.cache.store import Store
from lamina.engine import unpack
from lamina.engine.sandbox import runner
from lamina.engine.sandbox.idmap import IdMode, detect_ids
from lamina.oci.digest import Digest

pytestmark = pytest.mark.sandbox


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = kind, 1_600_000_000, 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _roots_layer() -> list[tuple[tarfile.TarInfo, bytes]]:
    """Every kind of entry a root-owned base has, and the modes a plain caller could trip on."""
    return [
        (_member("bin", tarfile.DIRTYPE), b""),
        (_member("bin/sh", mode=0o4755, size=3), b"elf"),
        (_member("bin/ro", mode=0o444, size=2), b"ro"),
        (_member("bin/none", mode=0o000, size=4), b"none"),
        (_member("bin/ash", tarfile.SYMTYPE, linkname="sh"), b""),
        (_member("bin/link", tarfile.LNKTYPE, linkname="bin/sh"), b""),
        (_member("dev", tarfile.DIRTYPE, mode=0o555), b""),
        (_member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
        (_member("dev/fifo", tarfile.FIFOTYPE, mode=0o600), b""),
        (_member("etc", tarfile.DIRTYPE, mode=0o700), b""),
        (_member("etc/.wh..wh..opq"), b""),
        (_member("etc/tagged", size=1, pax_headers={"SCHILY.xattr.user.note": "kept"}), b"x"),
        (_member("tmp", tarfile.DIRTYPE, mode=0o1777), b""),
        (_member("var", tarfile.DIRTYPE), b""),
        (_member("var/.wh.gone"), b""),  # an overlay whiteout: a plain user may make one (Linux 5.8)
    ]


_CAPABILITY = "\x01\x00\x00\x02" + "\0" * 16  # v2, cap_net_raw permitted and effective

_NEEDS_NAMESPACE = {
    # Each with its parent listed: a directory the unpack makes by itself gets the time of day.
    "another owner": [
        (_member("home", tarfile.DIRTYPE), b""),
        (_member("home/file", uid=1000, gid=1000, size=1), b"u"),
    ],
    "a file capability": [
        (_member("bin/ping", size=1, pax_headers={"SCHILY.xattr.security.capability": _CAPABILITY}), b"p")
    ],
}


def _layer(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def _tree(root: Path) -> Iterator[tuple[object, ...]]:
    """Everything a lower dir shows of each entry: type, mode, owner, size, mtime, target,
    device, xattrs and content."""
    for base, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted([*dirs, *files]):
            path = Path(base, name)
            st = os.lstat(path)
            names = sorted(os.listxattr(path, follow_symlinks=False)) if not stat.S_ISLNK(st.st_mode) else []
            xattrs = [(n, os.getxattr(path, n, follow_symlinks=False)) for n in names]
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            content = b""
            if stat.S_ISREG(st.st_mode):
                shut = not os.access(path, os.R_OK)  # the caller's own 0000 file
                if shut:
                    os.chmod(path, 0o400)
                content = hashlib.sha256(path.read_bytes()).digest()
                if shut:
                    os.chmod(path, stat.S_IMODE(st.st_mode))
            yield (
                path.relative_to(root).as_posix(),
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                None
                if stat.S_ISCHR(st.st_mode) and not st.st_rdev
                else st.st_mtime_ns,  # a whiteout: made now
                st.st_rdev,
                target,
                xattrs,
                content,
            )


def _unpack_both(
    tmp_path: Path, blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> tuple[list, list, list[str]]:  # type: ignore[type-arg]
    """The layer unpacked by `unpack.unpacked_layer` and by the helper alone; the helper's calls."""
    with Store(tmp_path / "cache") as store:
        info = store.put_blob(io.BytesIO(blob))
        direct = tmp_path / "helper"
        direct.mkdir()
        runner.extract_layer(store.blob_path(info.digest), direct, digest=info.digest)
        calls: list[str] = []
        through = runner.extract_layer

        def spied(*args: object, **kwargs: object) -> object:
            calls.append("helper")
            return through(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr("lamina.engine.sandbox.extract_layer", spied)
        name = Digest("sha256", hashlib.sha256(blob).hexdigest())
        made = unpack.unpacked_layer(store, info.digest, name)
        mine, theirs = list(_tree(made)), list(_tree(direct))
        runner.remove_tree(direct)
    return mine, theirs, calls


def test_a_layer_of_roots_files_unpacks_as_the_helper_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, theirs, calls = _unpack_both(tmp_path, _layer(_roots_layer()), monkeypatch)
    assert mine == theirs
    paths = {"bin/sh", "bin/link", "bin/none", "dev/null", "dev/fifo", "etc/tagged", "var/gone"}
    assert paths <= {e[0] for e in mine}
    if detect_ids().mode is IdMode.SUBORDINATE:
        assert calls == ([] if _whiteouts_allowed(tmp_path) else ["helper"])  # no helper process


def _whiteouts_allowed(tmp_path: Path) -> bool:
    """Whether this kernel lets a plain user make an overlay whiteout (Linux 5.8 and later)."""
    try:
        os.mknod(tmp_path / "probe", stat.S_IFCHR, os.makedev(0, 0))
    except PermissionError:
        return False
    return True


@pytest.mark.parametrize("what", sorted(_NEEDS_NAMESPACE))
def test_what_only_the_namespaces_root_can_make_goes_to_the_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    layer = _layer([*_roots_layer(), *_NEEDS_NAMESPACE[what]])
    mine, theirs, calls = _unpack_both(tmp_path, layer, monkeypatch)
    assert mine == theirs
    if detect_ids().mode is IdMode.SUBORDINATE:
        assert calls == ["helper"]
