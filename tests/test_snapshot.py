"""Capturing a command's changes as a layer, with both snapshotters.

The layer must be the one a BuildKit build produces (whiteouts `.wh.NAME`,
opaque `.wh..wh..opq`, hard links, owners as the container saw them), and
applying it on the lower layers must reproduce the sandbox's final view,
file by file.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.engine import sandbox, snapshot
from lamina.engine.sandbox import IdMode, Network, SandboxSpec, Snapshotter, detect_ids
from lamina.engine.sandbox import remove_tree as sandbox_remove_tree
from lamina.engine.sandbox._rootfs import merge_copy
from lamina.engine.snapshot import capture
from lamina.oci.entry import EntryType, LayerEntry
from lamina.oci.extract import Whiteouts, extract_layer, iter_layer
from lamina.oci.layer import Compression, write_layer
from tests.support.sandbox import make_rootfs

pytestmark = pytest.mark.sandbox

# Every kind of change a RUN step makes.
CHANGES = textwrap.dedent(
    """
    set -e
    echo new > /newfile
    echo changed >> /data/a
    rm /data/sub/b
    rm -r /data/sub2
    rm -r /data/dir2file && echo f > /data/dir2file
    rm /data/file2dir && mkdir /data/file2dir && echo in > /data/file2dir/x
    mv /data/redo /data/redo-old && mkdir /data/redo && echo again > /data/redo/new && rm -r /data/redo-old
    chmod 700 /data/modes
    chmod 4755 /data/suid
    ln -s ../a /data/link
    ln /data/a /data/hard
    echo more > /data/opq/added
    rm /data/opq/kept
    mkdir -p /deep/er && echo d > /deep/er/f
    """
)
CHOWN = "chown 1000:2000 /data/owned\n"

EXPECTED = {
    "data": EntryType.DIR,
    "data/.wh.sub2": EntryType.FILE,
    "data/a": EntryType.FILE,
    "data/dir2file": EntryType.FILE,
    "data/file2dir": EntryType.DIR,
    "data/file2dir/x": EntryType.FILE,
    "data/hard": EntryType.HARDLINK,
    "data/link": EntryType.SYMLINK,
    "data/modes": EntryType.DIR,
    "data/opq": EntryType.DIR,
    "data/opq/.wh.kept": EntryType.FILE,
    "data/opq/added": EntryType.FILE,
    "data/redo": EntryType.DIR,
    "data/redo/.wh..wh..opq": EntryType.FILE,
    "data/redo/new": EntryType.FILE,
    "data/sub": EntryType.DIR,
    "data/sub/.wh.b": EntryType.FILE,
    "data/suid": EntryType.FILE,
    "deep": EntryType.DIR,
    "deep/er": EntryType.DIR,
    "deep/er/f": EntryType.FILE,
    "newfile": EntryType.FILE,
}


@pytest.fixture(params=["overlay", "copy"])
def snapshotter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LAMINA_SNAPSHOTTER", request.param)
    return request.param


@pytest.fixture(scope="module")
def lowers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    """Two layers in overlay form: a base, and a top layer with a whiteout and an opaque dir."""
    tmp = tmp_path_factory.mktemp("lowers")
    base = make_rootfs(tmp / "base")
    data = base / "data"
    (data / "sub2").mkdir()
    (data / "sub2/c").write_text("c\n")
    (data / "dir2file").mkdir()
    (data / "dir2file/d").write_text("d\n")
    (data / "file2dir").write_text("was a file\n")
    (data / "redo").mkdir()
    (data / "redo/old").write_text("old\n")
    (data / "modes").mkdir()
    (data / "suid").write_text("#!/bin/sh\n")
    (data / "owned").write_text("owned\n")
    (data / "gone").write_text("whited out above\n")
    (data / "opq").mkdir()
    (data / "opq/hidden").write_text("hidden by the opaque dir above\n")
    top = tmp / "top"
    (top / "data/opq").mkdir(parents=True)
    os.mknod(top / "data/gone", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(top / "data/opq", "user.overlay.opaque", b"y")
    (top / "data/opq/kept").write_text("from the top layer\n")
    return (top, base)


@pytest.fixture(autouse=True)
def _remove_files_of_other_ids(tmp_path: Path) -> Iterator[None]:
    # Files a sandbox chowned to subordinate ids: pytest could not delete them.
    yield
    sandbox_remove_tree(tmp_path, keep_root=True)


def _run(
    lower_dirs: tuple[Path, ...],
    script: str,
    tmp_path: Path,
    upper: Path | None = None,
    snapshotter: Snapshotter | None = None,
) -> str:
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        code = sandbox.run(
            SandboxSpec(
                argv=("/bin/sh", "-c", script),
                lower_dirs=lower_dirs,
                upper_dir=upper,
                network=Network.NONE,
                snapshotter=snapshotter,
                stdout=f,
                stderr=f,
                stdin=subprocess.DEVNULL,
                scratch_dir=tmp_path / "scratch",
            )
        )
    text = out.read_text()
    assert code == 0, text
    return text


# Every path with type, mode and owner (and for non-directories link count and
# target), then every file's md5. /proc and /dev are the sandbox's own mounts;
# a merged overlay directory's link count is not the real one.
_PATHS = "find . -xdev \\( -path ./proc -o -path ./dev \\) -prune -o"
_STAT = (
    'if [ -d "$p" ] && [ ! -L "$p" ]; then stat -c \'%n %f %u %g\' "$p"; '
    "else stat -c '%n %f %u %g %h %N' \"$p\"; fi"
)
LISTING = (
    f"cd / && {_PATHS} -print | sort | while read -r p; do {_STAT}; done; "
    f"{_PATHS} -type f -print | sort | xargs md5sum"
)


def _changes(tmp_path: Path, lowers: tuple[Path, ...]) -> Path:
    upper = tmp_path / "upper"
    script = CHANGES + ("" if detect_ids().mode is IdMode.SINGLE else CHOWN)
    _run(lowers, script, tmp_path, upper)
    return upper


def test_capture_is_the_buildkit_layer(snapshotter: str, lowers: tuple[Path, ...], tmp_path: Path) -> None:
    upper = _changes(tmp_path, lowers)
    entries = {e.path: e for e in capture(upper, detect_ids(), lowers)}
    expected = dict(EXPECTED)
    if detect_ids().mode is not IdMode.SINGLE:
        expected["data/owned"] = EntryType.FILE
    assert {p: e.type for p, e in entries.items()} == expected
    assert entries["data/hard"].linkname == "data/a"
    assert entries["data/link"].linkname == "../a"
    assert entries["data/modes"].mode == 0o700
    assert entries["data/suid"].mode == 0o4755
    assert entries["data/.wh.sub2"].mode == 0 and entries["data/.wh.sub2"].size == 0
    assert _read(entries["data/a"]) == b"a\nchanged\n"
    # Owners as the container saw them, whatever the host ids.
    assert (entries["newfile"].uid, entries["newfile"].gid) == (0, 0)
    if "data/owned" in entries:
        assert (entries["data/owned"].uid, entries["data/owned"].gid) == (1000, 2000)
    assert not any(
        name.startswith(("user.overlay", "trusted.overlay")) for e in entries.values() for name, _ in e.xattrs
    )


def test_layer_round_trip_reproduces_the_final_view(
    snapshotter: str, lowers: tuple[Path, ...], tmp_path: Path
) -> None:
    upper = _changes(tmp_path, lowers)
    final_view = _run((upper, *lowers), LISTING, tmp_path)
    # capture -> tar -> unpack in overlay form -> the same view, file by file.
    blob = tmp_path / "layer.tar.gz"
    with open(blob, "wb") as f:
        snapshot.write_upper(upper, f, Compression.GZIP, lowers=lowers)
    unpacked = tmp_path / "unpacked"
    sandbox.extract_layer(blob, unpacked)
    assert _run((unpacked, *lowers), LISTING, tmp_path) == final_view


def test_layer_applied_on_lowers_reproduces_the_final_view(
    snapshotter: str, lowers: tuple[Path, ...], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("applying a layer with its owners outside a user namespace needs root")
    upper = _changes(tmp_path, lowers)
    final_view = _run((upper, *lowers), LISTING, tmp_path)
    blob = io.BytesIO()
    write_layer(capture(upper, detect_ids(), lowers), blob, Compression.GZIP)
    applied = tmp_path / "applied"
    applied.mkdir()
    merge_copy([str(p) for p in lowers], str(applied))
    blob.seek(0)
    extract_layer(blob, applied, whiteouts=Whiteouts.APPLY)
    assert _run((applied,), LISTING, tmp_path) == final_view


def test_untouched_run_captures_nothing(snapshotter: str, lowers: tuple[Path, ...], tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    _run(lowers, "cat /data/a /etc/passwd >/dev/null; ls -R /data /etc /bin >/dev/null", tmp_path, upper)
    assert list(capture(upper, detect_ids(), lowers)) == []


def _read(entry: LayerEntry) -> bytes:
    assert entry.open is not None
    with entry.open() as f:
        return f.read()


def test_private_files_of_other_users_reach_the_layer(
    snapshotter: str, lowers: tuple[Path, ...], tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    script = "mkdir -p /home/app/.ssh && echo key > /home/app/.ssh/id && chmod 600 /home/app/.ssh/id"
    script += " && chmod 700 /home/app/.ssh"
    single = detect_ids().mode is IdMode.SINGLE
    if not single:
        script += " && chown -R 1000:1000 /home/app"
    _run(lowers, script, tmp_path, upper)
    blob = io.BytesIO()
    info = snapshot.write_upper(upper, blob, Compression.GZIP, lowers=lowers)
    blob.seek(0)
    found = {e.path: e for e in iter_layer(blob, digest=info.digest)}
    key = found["home/app/.ssh/id"]
    assert (key.size, key.mode) == (4, 0o600)
    assert (key.uid, key.gid) == ((0, 0) if single else (1000, 1000))
    assert found["home/app/.ssh"].mode == 0o700


_NAMES = ("data/a", "data/sub", "data/sub/b", "data/opq", "data/new", "data/new/x", "top", "data/sub2")
_OPS = (
    "echo {n} > /{p}",
    "echo more >> /{p}",
    "rm -rf /{p}",
    "mkdir -p /{p}",
    "chmod 70{m} /{p}",
    "ln -sf /{q} /{p}",
    "ln -f /{q} /{p}",
    "mv /{q} /{p}",
    "touch -d @{n} /{p}",
)


@settings(
    max_examples=15,
    deadline=None,
    database=None,  # the unprivileged runs cannot write .hypothesis/ in the project copy
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(_OPS),
            st.sampled_from(_NAMES),
            st.sampled_from(_NAMES),
            st.integers(0, 7),
            st.integers(1, 10**9),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_copy_snapshotter_gives_the_view_overlay_gives(
    steps: list[tuple[str, str, str, int, int]], lowers: tuple[Path, ...]
) -> None:
    script = "; ".join(op.format(p=p, q=q, m=m, n=n) + " 2>/dev/null" for op, p, q, m, n in steps) + "; true"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        views = []
        for snapshotter in (Snapshotter.OVERLAY, Snapshotter.COPY):
            upper = tmp_path / snapshotter.value
            _run(lowers, script, tmp_path, upper, snapshotter)
            views.append(_run((upper, *lowers), LISTING, tmp_path))
        assert views[0] == views[1], script
        sandbox_remove_tree(tmp_path, keep_root=True)
