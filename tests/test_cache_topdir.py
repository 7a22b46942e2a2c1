"""The store's layer directories are spread over the file system (chattr +T on unpacked/)."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import tarfile
from pathlib import Path

import pytest

from lamina.cache.store import Store
from lamina.cache.topdir import mark_top_dir
from lamina.oci.digest import Digest

_FS_IOC_GETFLAGS = 0x80086601
_FS_TOPDIR_FL = 0x00020000


def _flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
    finally:
        os.close(fd)
    return struct.unpack_from("I", buf)[0]


def _supported(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    return mark_top_dir(probe) and bool(_flags(probe) & _FS_TOPDIR_FL)


def test_store_marks_its_layer_dirs_as_unrelated_trees(tmp_path: Path) -> None:
    if not _supported(tmp_path):
        pytest.skip("the temporary directory's file system has no top-dir flag (chattr +T): ext2/3/4 only")
    with Store(tmp_path / "store") as store:
        assert _flags(store.root / "unpacked") & _FS_TOPDIR_FL
        # files made in a layer dir still work as ever
        tmp = store.new_unpack_dir()
        (tmp / "f").write_text("x")
        assert (tmp / "f").read_text() == "x"


def test_mark_top_dir_leaves_other_file_systems_alone(tmp_path: Path) -> None:
    assert mark_top_dir(tmp_path / "missing") is False
    (tmp_path / "file").write_text("")
    assert mark_top_dir(tmp_path / "file") is False


def test_a_base_layer_unpacked_into_the_store_spreads_its_top_directories(tmp_path: Path) -> None:
    if not _supported(tmp_path):
        pytest.skip("the temporary directory's file system has no top-dir flag (chattr +T): ext2/3/4 only")
    from lamina.engine.unpack import unpacked_layer

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("usr/bin/tool")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"tool"))
    data = out.getvalue()
    with Store(tmp_path / "store") as store:
        blob = store.put_blob(io.BytesIO(data)).digest
        layer = unpacked_layer(store, blob, Digest.of_bytes(data))
        # Its usr/, var/, etc/ each go to a block group of their own (engine.unpack).
        assert _flags(layer) & _FS_TOPDIR_FL
        assert (layer / "usr" / "bin" / "tool").read_bytes() == b"tool"
