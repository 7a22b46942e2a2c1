"""Layer writer, compression and tree walk: deterministic, standard streams."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from lamina.errors import LayerError
from lamina.oci import compression as compression_module
from lamina.oci.compression import Compression, open_decompressed
from lamina.oci.entry import EntryType, LayerEntry, Verbatim
from lamina.oci.layer import LayerInfo, describe_layer, entry_key, recompress, sorted_entries, write_layer
from lamina.oci.walk import entries_from_tree

# A valid VFS_CAP_REVISION_2 value granting cap_net_raw (bit 13), effective.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _content(data: bytes):  # type: ignore[no-untyped-def]
    return lambda: io.BytesIO(data)


def sample_entries() -> list[LayerEntry]:
    big = random.Random(7).randbytes(300_000) * 3
    return sorted_entries(
        [
            LayerEntry("bin", EntryType.DIR, 0o755, mtime=1_000),
            LayerEntry(
                "bin/ping",
                EntryType.FILE,
                0o4755,
                uid=0,
                gid=0,
                size=len(big),
                mtime=2_000_000_000,
                xattrs=(("security.capability", CAPABILITY), ("user.note", "ünï".encode())),
                open=_content(big),
            ),
            LayerEntry("bin/ping6", EntryType.HARDLINK, linkname="bin/ping"),
            LayerEntry("bin/sh", EntryType.SYMLINK, 0o777, linkname="/bin/busybox"),
            LayerEntry("dev/null", EntryType.CHAR, 0o666, devmajor=1, devminor=3),
            LayerEntry("dev/sda", EntryType.BLOCK, 0o660, gid=6, devmajor=8, devminor=0),
            LayerEntry("run/fifo", EntryType.FIFO, 0o600, uid=1000, gid=1000),
            LayerEntry("etc/.wh.gone", EntryType.FILE),
            LayerEntry("etc/.wh..wh..opq", EntryType.FILE),
            LayerEntry("home/" + "long-name-" * 20, EntryType.FILE, size=3, open=_content(b"abc")),
            LayerEntry("home/ünïcode", EntryType.FILE, uid=1234, gid=5678, size=1, open=_content(b"u")),
        ]
    )


def write(entries: list[LayerEntry], compression: Compression, **kw: object) -> tuple[bytes, LayerInfo]:
    out = io.BytesIO()
    info = write_layer(entries, out, compression, **kw)  # type: ignore[arg-type]
    return out.getvalue(), info


def read_tar(blob: bytes) -> list[tarfile.TarInfo]:
    tar_bytes = open_decompressed(io.BytesIO(blob)).read()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:", encoding="utf-8") as tar:
        return tar.getmembers()


@pytest.mark.parametrize("compression", list(Compression))
def test_same_entries_same_bytes(compression: Compression) -> None:
    first, info1 = write(sample_entries(), compression, source_date_epoch=1_700_000_000)
    second, info2 = write(sample_entries(), compression, source_date_epoch=1_700_000_000)
    assert first == second
    assert info1 == info2
    assert info1.media_type == compression.media_type


def test_zstd_bytes_do_not_depend_on_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several of zstd's 1 MB jobs, so that the workers really share the stream.
    words = [b"lamina", b"layer", b"zstd", b"\n", b"0123", b"worker"]
    text = b" ".join(random.Random(3).choices(words, k=1_200_000))
    entries = sorted_entries(
        [*sample_entries(), LayerEntry("big.txt", EntryType.FILE, size=len(text), open=_content(text))]
    )
    digests = set()
    for workers in (1, 2, 4, 8):
        monkeypatch.setattr(compression_module, "ZSTD_WORKERS", workers)
        digests.add(write(entries, Compression.ZSTD)[1].digest)
    assert len(digests) == 1


@pytest.mark.parametrize("compression", list(Compression))
def test_info_matches_the_bytes(compression: Compression) -> None:
    blob, info = write(sample_entries(), compression)
    assert info.size == len(blob)
    assert info.digest.hex == hashlib.sha256(blob).hexdigest()
    tar_bytes = open_decompressed(io.BytesIO(blob), compression).read()
    assert info.diff_id.hex == hashlib.sha256(tar_bytes).hexdigest()
    assert describe_layer(io.BytesIO(blob)) == info
    assert describe_layer(io.BytesIO(blob), compression) == info


def test_gzip_header_has_no_timestamp_or_name() -> None:
    blob, _ = write(sample_entries(), Compression.GZIP)
    assert blob[:3] == b"\x1f\x8b\x08"
    flags, mtime = blob[3], blob[4:8]
    assert flags & 0x08 == 0  # FNAME
    assert mtime == b"\0\0\0\0"


@pytest.mark.parametrize(("compression", "tool"), [(Compression.GZIP, "gzip"), (Compression.ZSTD, "zstd")])
def test_streams_decode_with_standard_tools(compression: Compression, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    blob, info = write(sample_entries(), compression)
    decoded = subprocess.run([tool, "-dc"], input=blob, capture_output=True, check=True).stdout
    assert hashlib.sha256(decoded).hexdigest() == info.diff_id.hex
    if compression is Compression.GZIP:
        assert hashlib.sha256(gzip.decompress(blob)).hexdigest() == info.diff_id.hex


def test_gnu_tar_lists_every_entry() -> None:
    if shutil.which("tar") is None:
        pytest.skip("tar is not installed")
    blob, _ = write(sample_entries(), Compression.NONE)
    listing = subprocess.run(["tar", "-tf", "-"], input=blob, capture_output=True, check=True).stdout
    names = [line.rstrip("/") for line in listing.decode().splitlines()]
    assert names == [entry.path for entry in sample_entries()]


def test_headers_are_normalised() -> None:
    blob, _ = write(sample_entries(), Compression.GZIP, source_date_epoch=1_700_000_000)
    members = {member.name.rstrip("/"): member for member in read_tar(blob)}
    assert all(member.uname == "" and member.gname == "" for member in members.values())
    ping = members["bin/ping"]
    assert ping.mode == 0o4755
    assert ping.mtime == 1_700_000_000  # clamped
    assert members["bin"].mtime == 1_000  # older than the epoch: kept
    assert (
        ping.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == CAPABILITY
    )
    assert members["bin/ping6"].islnk() and members["bin/ping6"].linkname == "bin/ping"
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "/bin/busybox"
    assert (members["dev/null"].devmajor, members["dev/null"].devminor) == (1, 3)
    assert members["dev/sda"].isblk() and members["run/fifo"].isfifo()
    assert (members["home/ünïcode"].uid, members["home/ünïcode"].gid) == (1234, 5678)
    assert "home/" + "long-name-" * 20 in members
    assert members["etc/.wh.gone"].isreg() and members["etc/.wh..wh..opq"].size == 0


def test_mtimes_kept_without_source_date_epoch() -> None:
    blob, _ = write(sample_entries(), Compression.NONE)
    members = {member.name: member for member in read_tar(blob)}
    assert members["bin/ping"].mtime == 2_000_000_000


def test_entries_out_of_order_are_refused() -> None:
    entries = [LayerEntry("b", EntryType.DIR), LayerEntry("a", EntryType.DIR)]
    with pytest.raises(LayerError, match="out of order"):
        write(entries, Compression.NONE)


def test_duplicate_paths_are_refused() -> None:
    entries = [LayerEntry("a", EntryType.DIR), LayerEntry("a", EntryType.DIR)]
    with pytest.raises(LayerError, match="duplicate"):
        write(entries, Compression.NONE)


@pytest.mark.parametrize("path", ["/abs", "a/../b", "a//b", "./a", ""])
def test_unclean_paths_are_refused(path: str) -> None:
    with pytest.raises(LayerError, match="not a clean relative path"):
        write([LayerEntry(path, EntryType.DIR)], Compression.NONE)


def test_hardlink_must_point_at_an_earlier_file() -> None:
    entries = [LayerEntry("a", EntryType.HARDLINK, linkname="b"), LayerEntry("b", EntryType.FILE)]
    with pytest.raises(LayerError, match="not an earlier file"):
        write(entries, Compression.NONE)


def test_file_shorter_than_its_size_is_refused() -> None:
    entries = [LayerEntry("f", EntryType.FILE, size=10, open=_content(b"short"))]
    with pytest.raises(LayerError, match="f: file shorter than its 10 bytes"):
        write(entries, Compression.GZIP)


def test_sort_key_puts_directories_before_their_contents() -> None:
    paths = ["a-b", "a/b", "a", "a.c", "a/b/c", "B"]
    assert sorted(paths, key=entry_key) == ["B", "a", "a/b", "a/b/c", "a-b", "a.c"]


@pytest.mark.parametrize("source", list(Compression))
@pytest.mark.parametrize("target", list(Compression))
def test_recompress_keeps_the_diff_id(source: Compression, target: Compression) -> None:
    blob, info = write(sample_entries(), source)
    out = io.BytesIO()
    new = recompress(io.BytesIO(blob), None, target, out)
    assert new.diff_id == info.diff_id
    assert new.media_type == target.media_type
    assert describe_layer(io.BytesIO(out.getvalue())) == new
    if target is source:
        assert out.getvalue() == blob


def test_compression_names() -> None:
    assert Compression.parse("GZIP") is Compression.GZIP
    assert Compression.parse("uncompressed") is Compression.NONE
    assert (
        Compression.from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip") is Compression.GZIP
    )
    assert Compression.from_media_type("application/vnd.oci.image.layer.v1.tar+zstd") is Compression.ZSTD
    assert Compression.from_media_type("application/vnd.oci.image.layer.v1.tar") is Compression.NONE
    with pytest.raises(LayerError, match="unknown compression 'lz4'"):
        Compression.parse("lz4")


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD])
def test_truncated_compressed_stream_is_an_error(compression: Compression) -> None:
    blob, _ = write(sample_entries(), compression)
    with pytest.raises(LayerError, match=f"corrupt {compression.value}|{compression.value}"):
        describe_layer(io.BytesIO(blob[: len(blob) // 2]))


# -- walk -----------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "sub" / "f").write_bytes(b"hello")
    (root / "a-b").write_bytes(b"x" * 10_000)
    os.link(root / "a-b", root / "z-link")
    os.link(root / "a-b", root / "d" / "link")
    (root / "s").symlink_to("d/sub/f")
    os.mkfifo(root / "fifo")
    os.chmod(root / "a-b", 0o4750)
    os.setxattr(root / "d" / "sub" / "f", "user.keep", b"1")
    os.setxattr(root / "d" / "sub" / "f", "user.overlay.origin", b"x")
    os.setxattr(root / "d", "trusted.overlay.opaque", b"y")


def test_walk_is_sorted_and_complete(tmp_path: Path) -> None:
    make_tree(tmp_path)
    entries = list(entries_from_tree(tmp_path))
    paths = [entry.path for entry in entries]
    assert paths == sorted(paths, key=entry_key)
    assert paths == ["a-b", "d", "d/link", "d/sub", "d/sub/f", "fifo", "s", "z-link"]
    kinds = {entry.path: entry.type for entry in entries}
    assert kinds["d"] is EntryType.DIR and kinds["s"] is EntryType.SYMLINK and kinds["fifo"] is EntryType.FIFO


def test_walk_finds_hard_links(tmp_path: Path) -> None:
    make_tree(tmp_path)
    entries = {entry.path: entry for entry in entries_from_tree(tmp_path)}
    assert entries["a-b"].type is EntryType.FILE and entries["a-b"].size == 10_000
    assert entries["a-b"].mode == 0o4750
    assert entries["d/link"].type is EntryType.HARDLINK and entries["d/link"].linkname == "a-b"
    assert entries["z-link"].linkname == "a-b"


def test_walk_reads_xattrs_but_not_overlays(tmp_path: Path) -> None:
    make_tree(tmp_path)
    entries = {entry.path: entry for entry in entries_from_tree(tmp_path)}
    assert entries["d/sub/f"].xattrs == (("user.keep", b"1"),)
    assert entries["d"].xattrs == ()


def test_walk_content_is_opened_lazily(tmp_path: Path) -> None:
    make_tree(tmp_path)
    entry = next(e for e in entries_from_tree(tmp_path) if e.path == "d/sub/f")
    assert entry.open is not None
    with entry.open() as f:
        assert f.read() == b"hello"


def test_walk_maps_owners_and_skips_sockets(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    os.chown(tmp_path / "f", 100_000, 100_005)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        entries = list(entries_from_tree(tmp_path, uid_map=lambda uid, gid: (uid - 100_000, gid - 100_000)))
    assert [(e.path, e.uid, e.gid) for e in entries] == [("f", 0, 5)]


def test_walk_overlay_upper_dir_gives_oci_whiteouts(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "opaque").mkdir(parents=True)
    (upper / "opaque" / "new").write_bytes(b"n")
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    os.mknod(upper / "gone", stat.S_IFCHR, os.makedev(0, 0))
    os.link(upper / "gone", upper / "gone-too")  # the kernel shares one whiteout inode
    entries = list(entries_from_tree(upper, overlay=True))
    assert [(e.path, e.type) for e in entries] == [
        (".wh.gone", EntryType.FILE),
        (".wh.gone-too", EntryType.FILE),
        ("opaque", EntryType.DIR),
        ("opaque/.wh..wh..opq", EntryType.FILE),
        ("opaque/new", EntryType.FILE),
    ]
    write(entries, Compression.NONE)  # in writer order


def test_walk_then_write_a_tree(tmp_path: Path) -> None:
    make_tree(tmp_path)
    blob1, info1 = write(list(entries_from_tree(tmp_path)), Compression.ZSTD)
    _, info2 = write(list(entries_from_tree(tmp_path)), Compression.ZSTD)
    assert info1 == info2
    names = [member.name for member in read_tar(blob1)]
    assert names == ["a-b", "d", "d/link", "d/sub", "d/sub/f", "fifo", "s", "z-link"]


def test_walk_of_a_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match=r"walk .*missing"):
        list(entries_from_tree(tmp_path / "missing"))


def test_pax_records_of_every_length_read_back() -> None:
    # A pax record's length counts its own digits: lengths around 10**n are the trap.
    entries = [
        LayerEntry(f"{n:04d}" + "p" * n, EntryType.SYMLINK, linkname="t" * (n + 3)) for n in range(80, 1010)
    ]
    blob, _ = write(sorted_entries(entries), Compression.NONE)
    members = read_tar(blob)
    assert [(m.name, m.linkname) for m in members] == [(e.path, e.linkname) for e in sorted_entries(entries)]


def test_fields_beyond_ustar_go_to_pax_records() -> None:
    name = b"caf\xe9-\xff".decode("utf-8", "surrogateescape")  # not UTF-8
    entries = [
        LayerEntry(name, EntryType.FILE, uid=3_000_000, gid=2**31, mtime=-5, size=1, open=_content(b"z")),
    ]
    blob, info = write(entries, Compression.NONE)
    (member,) = read_tar(blob)
    assert (member.name, member.uid, member.gid, member.mtime) == (name, 3_000_000, 2**31, -5)
    assert len(blob) == 512 * 6  # pax header, records, ustar header, content, two zero blocks
    assert describe_layer(io.BytesIO(blob)) == info


@pytest.mark.parametrize("compression", list(Compression))
def test_empty_layer_has_dockers_well_known_diff_id(compression: Compression) -> None:
    # Docker and BuildKit write the same 1024 zero bytes for an empty layer.
    _, info = write([], compression)
    assert str(info.diff_id) == "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"


def test_zstd_cut_anywhere_in_the_last_frame_is_an_error() -> None:
    blob, _ = write(sample_entries(), Compression.ZSTD)
    for cut in (1, 4, 5, 17, len(blob) // 2):
        with pytest.raises(LayerError, match="zstd"):
            describe_layer(io.BytesIO(blob[:-cut]), Compression.ZSTD)


def test_zstd_concatenated_and_skippable_frames_decode() -> None:
    if shutil.which("zstd") is None:
        pytest.skip("zstd is not installed")
    blob, info = write(sample_entries(), Compression.NONE)
    half = len(blob) // 2
    frames = [
        subprocess.run(["zstd", "-c"], input=part, capture_output=True, check=True).stdout
        for part in (blob[:half], blob[half:])
    ]
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"pad"
    described = describe_layer(io.BytesIO(frames[0] + skippable + frames[1]))
    assert described.diff_id == info.diff_id
    with pytest.raises(LayerError, match="bad frame magic"):
        describe_layer(io.BytesIO(frames[0] + b"trailing garbage"))


def test_a_hardlink_may_name_a_file_of_an_earlier_verbatim_run_and_nothing_else() -> None:
    plain, _ = write([LayerEntry("d/a", EntryType.FILE), LayerEntry("d/b", EntryType.FILE)], Compression.NONE)
    members = plain[: 2 * 512]  # two empty files: a header each
    after = LayerEntry("e", EntryType.HARDLINK, linkname="d/b")
    tar, _ = write(
        [LayerEntry("d", EntryType.DIR), Verbatim("d/a", "d/b", "d/a\0d/b", members), after], Compression.NONE
    )
    assert tar[512 : 3 * 512] == members
    with tarfile.open(fileobj=io.BytesIO(tar)) as read:
        assert [(m.name, m.linkname) for m in read] == [("d", ""), ("d/a", ""), ("d/b", ""), ("e", "d/b")]
    unnamed = Verbatim("d/a", "d/b", "d/a", members)  # d/b is not one a link may name
    with pytest.raises(LayerError, match="'d/b' is not an earlier file"):
        write([LayerEntry("d", EntryType.DIR), unnamed, after], Compression.NONE)
