"""Layer extraction: round trips, whiteouts in both forms, metadata order,
unprivileged behaviour."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.errors import LayerError
from lamina.oci.compression import Compression
from lamina.oci.entry import EntryType, LayerEntry
from lamina.oci.extract import Whiteouts, extract_layer, iter_layer
from lamina.oci.layer import write_layer
from lamina.oci.walk import entries_from_tree

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown to other ids, mknod, trusted xattrs)")
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw, effective


def tar_of(*members: tuple[str, bytes, bytes | None, dict[str, object]]) -> bytes:
    """A plain tar, members in the given order: (name, type, data, TarInfo fields)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, fields in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = len(data) if data else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def f(name: str, data: bytes = b"", **fields: object) -> tuple[str, bytes, bytes | None, dict[str, object]]:
    return name, tarfile.REGTYPE, data, fields


def d(name: str, **fields: object) -> tuple[str, bytes, bytes | None, dict[str, object]]:
    return name, tarfile.DIRTYPE, None, fields


def extract(data: bytes, dest: Path, **options: object) -> tuple[str, ...]:
    return extract_layer(io.BytesIO(data), dest, **options).warnings  # type: ignore[arg-type]


def listing(root: Path) -> dict[str, str]:
    """path -> 'dir' / file content / '-> target' / 'char M:N'."""
    seen = {}
    for entry in entries_from_tree(root):
        if entry.type is EntryType.FILE:
            assert entry.open is not None
            with entry.open() as content:
                seen[entry.path] = content.read().decode()
        elif entry.type is EntryType.CHAR:
            seen[entry.path] = f"char {entry.devmajor}:{entry.devminor}"
        else:
            seen[entry.path] = {EntryType.DIR: "dir", EntryType.SYMLINK: f"-> {entry.linkname}"}.get(
                entry.type, entry.type.value
            )
    return seen


# -- round trips -------------------------------------------------------------------

NAMES = st.text(alphabet=st.sampled_from("abz-_. ü€"), min_size=1, max_size=6).filter(
    lambda name: name not in (".", "..") and not name.startswith(".wh.")
)
MODES = [0o755, 0o700, 0o4755, 0o2755, 0o1777, 0o644, 0o600, 0o000, 0o6711]
NODES = st.lists(
    st.tuples(
        st.sampled_from(["file", "file", "dir", "dir", "symlink", "hardlink", "fifo"]),
        st.integers(0, 1000),  # picks a parent dir (and a link target)
        NAMES,
        st.binary(max_size=2000),
        st.sampled_from(MODES),
        st.integers(0, 2**32),  # mtime
        st.integers(0, 70_000),  # owner
        st.booleans(),  # with an xattr
    ),
    max_size=30,
)


def build_tree(root: Path, nodes: list[tuple[str, int, str, bytes, int, int, int, bool]]) -> None:
    dirs, files, made = [root], [], []
    for kind, pick, name, data, mode, mtime, owner, with_xattr in nodes:
        path = dirs[pick % len(dirs)] / name
        if os.path.lexists(path):
            continue
        if kind == "file":
            path.write_bytes(data)
            files.append(path)
        elif kind == "dir":
            path.mkdir()
            dirs.append(path)
        elif kind == "symlink":
            path.symlink_to(f"../{name}/x")
        elif kind == "hardlink":
            if not files:
                continue
            os.link(files[pick % len(files)], path)
        else:
            os.mkfifo(path)
        if IS_ROOT:
            os.chown(path, owner, owner + 1, follow_symlinks=False)
        if kind != "symlink":
            os.chmod(path, mode)
        if with_xattr and kind in ("file", "dir"):
            os.setxattr(path, "user.lamina", data[:40] or b"\xff")
        made.append((path, mtime))
    for path, mtime in made:
        os.utime(path, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nodes=NODES, compression=st.sampled_from(list(Compression)))
def test_round_trip_gives_the_same_tree(nodes: list, compression: Compression) -> None:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        source, dest = Path(tmp, "source"), Path(tmp, "dest")
        source.mkdir()
        build_tree(source, nodes)
        blob = io.BytesIO()
        info = write_layer(entries_from_tree(source), blob, compression)
        result = extract_layer(io.BytesIO(blob.getvalue()), dest, digest=info.digest)
        assert (result.digest, result.diff_id, result.size) == (info.digest, info.diff_id, info.size)
        before, after = list(entries_from_tree(source)), list(entries_from_tree(dest))
        assert after == before  # paths, types, modes, owners, mtimes, links, xattrs
        for entry in before:
            if entry.type is EntryType.FILE:
                assert (dest / entry.path).read_bytes() == (source / entry.path).read_bytes()
        # ...and the same layer again, byte for byte.
        again = write_layer(entries_from_tree(dest), io.BytesIO(), compression)
        assert again == info


def test_iter_layer_lists_what_was_written(tmp_path: Path) -> None:
    entries = [
        LayerEntry("a", EntryType.DIR, 0o750, uid=5, gid=6, mtime=77),
        LayerEntry("a/f", EntryType.FILE, 0o4755, size=3, xattrs=(("security.capability", CAPABILITY),)),
        LayerEntry("a/h", EntryType.HARDLINK, linkname="a/f"),
        LayerEntry("a/s", EntryType.SYMLINK, 0o777, linkname="/etc/x"),
        LayerEntry("a/.wh.gone", EntryType.FILE),
    ]
    entries[1] = LayerEntry(**{**_fields(entries[1]), "open": lambda: io.BytesIO(b"abc")})
    blob = io.BytesIO()
    write_layer(sorted(entries, key=lambda e: e.path), blob, Compression.ZSTD)
    listed = list(iter_layer(io.BytesIO(blob.getvalue())))
    assert listed == sorted(entries, key=lambda e: e.path)


def _fields(entry: LayerEntry) -> dict[str, object]:
    return {name: getattr(entry, name) for name in entry.__dataclass_fields__}


# -- whiteouts ----------------------------------------------------------------------

LOWER = tar_of(
    d("a"),
    f("a/x", b"x"),
    f("a/y", b"y"),
    d("a/sub"),
    f("a/sub/deep", b"deep"),
    d("b"),
    f("b/z", b"z"),
    f("keep", b"k"),
)


def test_layers_applied_in_order(tmp_path: Path) -> None:
    extract(LOWER, tmp_path)
    upper = tar_of(
        f(".wh.b"),
        d("a"),
        f("a/.wh..wh..opq"),
        f("a/new", b"n"),
        f("a/.wh.never-existed"),
    )
    extract(upper, tmp_path)
    assert listing(tmp_path) == {"a": "dir", "a/new": "n", "keep": "k"}


@pytest.mark.parametrize("mode", list(Whiteouts))
def test_whiteout_after_entry_same_layer(tmp_path: Path, mode: Whiteouts) -> None:
    extract(tar_of(f("f", b"lower")), tmp_path)
    warnings = extract(
        tar_of(f("f", b"upper"), f(".wh.f"), d("g"), f("g/x", b"gx"), f(".wh.g")), tmp_path, whiteouts=mode
    )
    assert warnings == ()
    assert listing(tmp_path) == {"f": "upper", "g": "dir", "g/x": "gx"}


def test_opaque_keeps_entries_of_the_same_layer(tmp_path: Path) -> None:
    extract(LOWER, tmp_path)
    upper = tar_of(
        d("a"), f("a/x", b"new x"), f("a/sub/other", b"o"), f("a/.wh..wh..opq"), f("a/later", b"l")
    )
    extract(upper, tmp_path)
    assert listing(tmp_path) == {
        "a": "dir",
        "a/later": "l",
        "a/sub": "dir",
        "a/sub/other": "o",  # a/sub/deep was the lower layer's: gone
        "a/x": "new x",
        "b": "dir",
        "b/z": "z",
        "keep": "k",
    }


@needs_root
@pytest.mark.parametrize(
    ("userxattr", "xattr"), [(False, "trusted.overlay.opaque"), (True, "user.overlay.opaque")]
)
def test_overlay_form(tmp_path: Path, userxattr: bool, xattr: str) -> None:
    layer = tar_of(f(".wh.gone"), d("o"), f("o/.wh..wh..opq"), f("o/kept", b"k"), f("p/.wh.q"))
    extract(layer, tmp_path, whiteouts=Whiteouts.OVERLAY, userxattr=userxattr)
    for name in ("gone", "p/q"):
        st_ = os.lstat(tmp_path / name)
        assert stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0
    assert os.getxattr(tmp_path / "o", xattr) == b"y"
    assert (tmp_path / "o" / "kept").read_bytes() == b"k"
    assert not (tmp_path / ".wh.gone").exists()
    # and the walk turns it back into the OCI form
    assert [e.path for e in entries_from_tree(tmp_path, overlay=True)] == [
        ".wh.gone",
        "o",
        "o/.wh..wh..opq",
        "o/kept",
        "p",
        "p/.wh.q",
    ]


@needs_root
def test_overlay_lower_dirs_mount(tmp_path: Path) -> None:
    lower1, lower2, work, upper, merged = (tmp_path / n for n in ("l1", "l2", "work", "upper", "merged"))
    for path in (work, upper, merged):
        path.mkdir()
    extract(LOWER, lower1, whiteouts=Whiteouts.OVERLAY)
    extract(
        tar_of(f(".wh.b"), d("a"), f("a/.wh..wh..opq"), f("a/new", b"n")), lower2, whiteouts=Whiteouts.OVERLAY
    )
    options = f"lowerdir={lower2}:{lower1},upperdir={upper},workdir={work}"
    mounted = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {mounted.stderr.decode().strip()}")
    try:
        assert listing(merged) == {"a": "dir", "a/new": "n", "keep": "k"}
    finally:
        subprocess.run(["umount", str(merged)], check=True)


# -- metadata -----------------------------------------------------------------------


@needs_root
def test_setuid_and_capability_survive_the_chown(tmp_path: Path) -> None:
    pax = {"SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8", "surrogateescape")}
    extract(tar_of(f("ping", b"elf", uid=1000, gid=1001, mode=0o4755, pax_headers=pax)), tmp_path)
    st_ = os.stat(tmp_path / "ping")
    assert (st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)) == (1000, 1001, 0o4755)
    assert os.getxattr(tmp_path / "ping", "security.capability") == CAPABILITY


def test_directory_modes_and_mtimes_are_set_last(tmp_path: Path) -> None:
    layer = tar_of(
        d("ro", mode=0o555, mtime=1234), d("ro/sub", mode=0o500, mtime=99), f("ro/sub/f", b"x", mtime=5)
    )
    extract(layer, tmp_path)
    assert (tmp_path / "ro" / "sub" / "f").read_bytes() == b"x"
    for path, mode, mtime in (("ro", 0o555, 1234), ("ro/sub", 0o500, 99), ("ro/sub/f", 0o644, 5)):
        st_ = os.stat(tmp_path / path)
        assert (stat.S_IMODE(st_.st_mode), st_.st_mtime) == (mode, mtime)


def test_existing_directory_is_merged_and_a_file_replaces_a_directory(tmp_path: Path) -> None:
    extract(tar_of(d("d"), f("d/old", b"o"), d("e"), f("e/inner", b"i")), tmp_path)
    extract(tar_of(d("d"), f("d/new", b"n"), f("e", b"now a file")), tmp_path)
    assert listing(tmp_path) == {"d": "dir", "d/new": "n", "d/old": "o", "e": "now a file"}


def test_hardlink_to_a_lower_layer_file(tmp_path: Path) -> None:
    extract(tar_of(f("base", b"shared")), tmp_path)
    extract(tar_of(("link", tarfile.LNKTYPE, None, {"linkname": "base"})), tmp_path)
    assert os.stat(tmp_path / "link").st_ino == os.stat(tmp_path / "base").st_ino


@needs_root
def test_device_nodes_as_root(tmp_path: Path) -> None:
    layer = tar_of(("null", tarfile.CHRTYPE, None, {"devmajor": 1, "devminor": 3, "mode": 0o666}))
    assert extract(layer, tmp_path) == ()
    st_ = os.lstat(tmp_path / "null")
    assert stat.S_ISCHR(st_.st_mode) and (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == (1, 3)
    assert stat.S_IMODE(st_.st_mode) == 0o666


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD])
def test_truncated_compressed_layer(tmp_path: Path, compression: Compression) -> None:
    blob = io.BytesIO()
    entries = [LayerEntry("f", EntryType.FILE, size=200_000, open=lambda: io.BytesIO(os.urandom(200_000)))]
    write_layer(entries, blob, compression)
    with pytest.raises(LayerError, match=compression.value):
        extract(blob.getvalue()[:-30], tmp_path)


# -- unprivileged --------------------------------------------------------------------

_UNPRIVILEGED = """
import io, json, sys
from pathlib import Path
from lamina.errors import LayerError
from lamina.oci.extract import Whiteouts, extract_layer
data, dest, options = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]), json.loads(sys.argv[3])
if "whiteouts" in options:
    options["whiteouts"] = Whiteouts(options["whiteouts"])
try:
    result = extract_layer(io.BytesIO(data), dest, **options)
    print(json.dumps({"warnings": list(result.warnings)}))
except LayerError as err:
    print(json.dumps({"error": str(err)}))
"""


@pytest.fixture
def as_nobody() -> Iterator[object]:
    if not IS_ROOT:
        pytest.skip("needs root to switch to an unprivileged user")
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o777)

        def run(layer: bytes, **options: object) -> tuple[dict[str, object], Path]:
            Path(tmp, "layer.tar").write_bytes(layer)
            dest = Path(tmp, "dest")
            args = [sys.executable, "-c", _UNPRIVILEGED, f"{tmp}/layer.tar", str(dest), json.dumps(options)]
            done = subprocess.run(
                args, user=65534, group=65534, extra_groups=[], capture_output=True, check=True
            )
            return json.loads(done.stdout), dest

        yield run


def test_device_node_unprivileged(as_nobody) -> None:  # type: ignore[no-untyped-def]
    layer = tar_of(
        ("dev/null", tarfile.CHRTYPE, None, {"devmajor": 1, "devminor": 3}),
        ("dev/sda", tarfile.BLKTYPE, None, {"devmajor": 8, "devminor": 0}),
        f("dev/ok", b"fine"),
    )
    out, dest = as_nobody(layer, ignore_owners=True)
    assert out["warnings"] == [
        "device nodes skipped (creating them needs privilege): 2 entries (first: dev/null)"
    ]
    assert sorted(os.listdir(dest / "dev")) == ["ok"]


def test_chown_refused_unprivileged_unless_owners_ignored(as_nobody) -> None:  # type: ignore[no-untyped-def]
    layer = tar_of(f("etc/shadow", b"s", uid=0, gid=42, mode=0o640))
    out, _ = as_nobody(layer)
    assert "cannot set owner 0:42" in out["error"]
    assert "etc/shadow" in out["error"]
    out, dest = as_nobody(layer, ignore_owners=True)
    assert out == {"warnings": []}
    assert (dest / "etc" / "shadow").stat().st_uid == 65534
    assert stat.S_IMODE((dest / "etc" / "shadow").stat().st_mode) == 0o640


def test_overlay_form_unprivileged(as_nobody) -> None:  # type: ignore[no-untyped-def]
    layer = tar_of(f(".wh.gone"), d("o"), f("o/.wh..wh..opq"))
    out, _ = as_nobody(layer, ignore_owners=True, whiteouts="overlay")
    assert "trusted.overlay.opaque" in out["error"]
    out, dest = as_nobody(layer, ignore_owners=True, whiteouts="overlay", userxattr=True)
    assert out == {"warnings": []}
    assert stat.S_ISCHR(os.lstat(dest / "gone").st_mode)
    assert os.getxattr(dest / "o", "user.overlay.opaque") == b"y"


def test_round_trip_of_non_utf8_names_and_binary_xattrs(tmp_path: Path) -> None:
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    name = os.fsdecode(b"latin1-caf\xe9")
    (source / name).write_bytes(b"x")
    os.setxattr(source / name, "user.blob", b"\x00\xff\xfe\n=")
    (source / "link").symlink_to(os.fsdecode(b"\xff" * 150))
    blob = io.BytesIO()
    write_layer(entries_from_tree(source), blob, Compression.GZIP)
    extract_layer(io.BytesIO(blob.getvalue()), dest)
    assert list(entries_from_tree(dest)) == list(entries_from_tree(source))
    assert os.getxattr(dest / name, "user.blob") == b"\x00\xff\xfe\n="


def test_a_layer_rewriting_its_own_paths(tmp_path: Path) -> None:
    # An entry that replaces, links or removes what an earlier entry of the same layer wrote.
    many = [f(f"d/f{i}", b"%d" % i) for i in range(200)]
    layer = tar_of(
        d("d"),
        *many,
        f("d/f0", b"again"),  # the same path twice: the last wins
        ("d/link", tarfile.LNKTYPE, None, {"linkname": "d/f1"}),  # a link to a file just written
        d("d/f2"),  # a file replaced by a directory
        f("d/f2/in", b"in"),
        ("d/f3", tarfile.SYMTYPE, None, {"linkname": "f4"}),  # a file replaced by a symlink
        f("e/x", b"x"),
        f("e", b"e is a file now"),  # a directory holding a file just written, replaced by a file
    )
    extract(layer, tmp_path)
    expected = {f"d/f{i}": str(i) for i in range(4, 200)}
    expected |= {"d": "dir", "d/f0": "again", "d/f1": "1", "d/link": "hardlink", "d/f2": "dir"}
    expected |= {"d/f2/in": "in", "d/f3": "-> f4", "e": "e is a file now"}
    assert listing(tmp_path) == expected
    assert os.stat(tmp_path / "d/link").st_ino == os.stat(tmp_path / "d/f1").st_ino
