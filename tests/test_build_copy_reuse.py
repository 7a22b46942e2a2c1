"""A COPY that re-runs after a small change links unchanged files from its last layer.

The layers must stay what their keys say: the old layer keeps its bytes and
metadata, the new one holds exactly what a full copy would have written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.build import BASE, build, make_cache, rootfs, write_context

pytestmark = pytest.mark.sandbox

DOCKERFILE = f"""\
FROM {BASE}
COPY . /data/
"""


def _layer_files(cache: Path, rel: str) -> dict[Path, os.stat_result]:
    """Every built layer directory's copy of /data/<rel>, by directory."""
    found = {}
    for layer in (cache / "unpacked").iterdir():
        path = layer / "data" / rel
        if not layer.name.startswith(".") and path.is_file():
            found[layer] = path.stat()
    return found


def test_unchanged_files_share_the_last_layers_inodes(cache: Path, tmp_path: Path) -> None:
    files = {f"src/f{i}.txt": f"file {i}\n" for i in range(40)}
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, files)
    first = build(cache, ctx)
    (ctx / "src/f7.txt").write_text("changed\n")
    second = build(cache, ctx)
    assert second.image_digest != first.image_digest

    same = _layer_files(cache, "src/f3.txt")
    assert len(same) == 2 and len({st.st_ino for st in same.values()}) == 1
    changed = _layer_files(cache, "src/f7.txt")
    assert len({st.st_ino for st in changed.values()}) == 2
    assert sorted(path.read_text() for path in (layer / "data/src/f7.txt" for layer in changed)) == [
        "changed\n",
        "file 7\n",
    ]


def test_a_file_whose_mode_changed_is_copied_and_the_old_layer_keeps_its_mode(
    cache: Path, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, {"tool.sh": "echo hi\n", "other": "x\n"})
    (ctx / "tool.sh").chmod(0o644)
    build(cache, ctx)
    (ctx / "tool.sh").chmod(0o755)
    out = tmp_path / "out"
    rootfs(cache, ctx, out)
    assert (out / "data/tool.sh").stat().st_mode & 0o777 == 0o755
    modes = sorted(st.st_mode & 0o777 for st in _layer_files(cache, "tool.sh").values())
    assert modes == [0o644, 0o755]


def test_rebuild_equals_a_build_from_an_empty_cache(cache: Path, tmp_path: Path, busybox_image: Path) -> None:
    files = {f"d{i % 3}/f{i}": f"{i}\n" * i for i in range(30)}
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, files)
    # SOURCE_DATE_EPOCH: directories the copy makes would otherwise carry the build's time.
    build(cache, ctx, source_date_epoch=1700000000)
    (ctx / "d1/f4").write_text("new\n")
    (ctx / "d2/f5").unlink()
    (ctx / "d0/new").write_text("added\n")
    linked = build(cache, ctx, source_date_epoch=1700000000)
    assert not linked.steps[-1].cached
    fresh = build(make_cache(tmp_path / "fresh", busybox_image), ctx, source_date_epoch=1700000000)
    assert linked.image_digest == fresh.image_digest


def test_heredoc_over_a_copied_symlink_does_not_write_through_it(cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("host file\n")
    text = f"""\
FROM {BASE}
COPY src/ <<EOF /d/
from the heredoc
EOF
"""
    ctx = write_context(tmp_path / "ctx", text)
    (ctx / "src").mkdir()
    (ctx / "src/EOF").symlink_to(outside)  # inside a copied directory: copied as a symlink
    out = tmp_path / "out"
    rootfs(cache, ctx, out)
    assert outside.read_text() == "host file\n"
    assert (out / "d/EOF").read_text() == "from the heredoc\n"


def test_rename_mode_and_xattr_changes_equal_a_build_from_an_empty_cache(
    cache: Path, tmp_path: Path, busybox_image: Path
) -> None:
    """What the last run linked is only what a full copy would write: a renamed file, a
    file whose mode changed and one that gained an xattr (same content, same mtime)
    give the image a build from an empty cache gives, digest for digest."""
    files = {f"d{i % 3}/f{i}": f"{i}\n" * i for i in range(30)}
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, files)
    build(cache, ctx, source_date_epoch=1700000000)
    (ctx / "d0/f3").rename(ctx / "d1/renamed")
    (ctx / "d2/f5").chmod(0o700)
    stamp = os.stat(ctx / "d1/f4")
    try:
        os.setxattr(ctx / "d1/f4", "user.note", b"kept")
    except OSError as err:
        pytest.skip(f"this file system has no user xattrs ({err.strerror})")
    os.utime(ctx / "d1/f4", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    linked = build(cache, ctx, source_date_epoch=1700000000)
    assert not linked.steps[-1].cached
    fresh = build(make_cache(tmp_path / "fresh", busybox_image), ctx, source_date_epoch=1700000000)
    assert linked.image_digest == fresh.image_digest
    assert len(_layer_files(cache, "d0/f6")) == 2  # an unchanged file: in both layers ...
    assert len({st.st_ino for st in _layer_files(cache, "d0/f6").values()}) == 1  # ... linked


def test_the_rerun_layer_blob_takes_unchanged_files_from_the_last_blob(
    cache: Path, tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rerun's layer blob is written from the last run's blob for every file it linked
    (not read again from disk) and is byte for byte a cold build's: renames, a deletion,
    a mode change, a changed file in the middle and a new one."""
    from lamina.engine.sandbox.idmap import IdMode, detect_ids
    from lamina.oci import walk

    files = {f"d{i % 3}/f{i:02d}": f"{i}\n" * i for i in range(1, 40)}
    files["d1/" + "long" * 40] = "a pax path record\n"
    files["d2/ünïcödé"] = "a pax path record too\n"
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, files)
    build(cache, ctx, source_date_epoch=1700000000)
    (ctx / "d0/f03").rename(ctx / "d1/renamed")
    (ctx / "d2/f05").unlink()
    (ctx / "d2/f08").chmod(0o700)
    (ctx / "d1/f19").write_text("changed in the middle\n")
    (ctx / "d0/new").write_text("added\n")
    opened: list[str] = []
    real_open = walk._open_file

    def spy(host_path: str) -> object:
        opened.append(host_path)
        return real_open(host_path)

    monkeypatch.setattr(walk, "_open_file", spy)
    linked = build(cache, ctx, source_date_epoch=1700000000)
    monkeypatch.undo()
    assert not linked.steps[-1].cached
    fresh = build(make_cache(tmp_path / "fresh", busybox_image), ctx, source_date_epoch=1700000000)
    assert linked.image_digest == fresh.image_digest  # every blob and diff_id the same
    read = sorted(path.split("/data/", 1)[1] for path in opened if "/data/" in path)
    if detect_ids().mode is IdMode.SUBORDINATE:
        pytest.skip("with subordinate ids a helper in the user namespace writes the blob, reading every file")
    # the files it linked come from the old blob, those it wrote from the bytes it copied
    assert read == []


def test_a_cold_copy_layer_is_written_from_the_bytes_it_copied(
    cache: Path, tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first build reads each context file once: the layer's tar takes the bytes the copy
    wrote (oci.fresh) rather than opening the new files again, and is the blob reading
    them from disk gives."""
    from lamina.engine.sandbox.idmap import IdMode, detect_ids
    from lamina.oci import fresh, walk

    files = {f"d{i % 3}/f{i:02d}": f"{i}\n" * i for i in range(1, 30)}
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, files)
    opened: list[str] = []
    real_open = walk._open_file

    def spy(host_path: str) -> object:
        opened.append(host_path)
        return real_open(host_path)

    monkeypatch.setattr(walk, "_open_file", spy)
    first = build(cache, ctx, source_date_epoch=1700000000)
    monkeypatch.setattr(fresh, "opener", lambda path, st: None)
    from_disk = build(make_cache(tmp_path / "disk", busybox_image), ctx, source_date_epoch=1700000000)
    assert first.image_digest == from_disk.image_digest
    if detect_ids().mode is IdMode.SUBORDINATE:
        pytest.skip("with subordinate ids a helper in the user namespace writes the blob, reading every file")
    read_first = [path for path in opened if "/data/" in path and str(cache) in path]
    assert read_first == []
    in_context = sum(1 for path in ctx.rglob("*") if path.is_file())  # the Dockerfile too
    assert len([path for path in opened if "/data/" in path]) == in_context  # the disk build read them
