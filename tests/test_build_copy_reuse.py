"""A COPY that re-runs after a small change links unchanged files from its last layer.

The layers must stay what their keys say: the old layer keeps its bytes and
metadata, the new one holds exactly what a full copy would have written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.support.build import BASE, build, make_cache, oci_manifest, rootfs, write_context
from tests.support.plainuser import plain_user_missing

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
    opened = _spy_opens(monkeypatch)
    linked = build(cache, ctx, source_date_epoch=1700000000)
    monkeypatch.undo()
    assert not linked.steps[-1].cached
    fresh = build(make_cache(tmp_path / "fresh", busybox_image), ctx, source_date_epoch=1700000000)
    assert linked.image_digest == fresh.image_digest  # every blob and diff_id the same
    read = sorted(path.split("/data/", 1)[1] for path in opened if "/data/" in path)
    # the files it linked come from the old blob, those it wrote from the bytes it copied
    assert read == []


def test_a_cold_copy_layer_is_written_from_the_bytes_it_copied(
    cache: Path, tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first build reads each context file once: the layer's tar takes the bytes the copy
    wrote (oci.fresh) rather than opening the new files again, and is the blob reading
    them from disk gives."""
    from lamina.oci import fresh

    files = {f"d{i % 3}/f{i:02d}": f"{i}\n" * i for i in range(1, 30)}
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, files)
    opened = _spy_opens(monkeypatch)
    first = build(cache, ctx, source_date_epoch=1700000000)
    monkeypatch.setattr(fresh, "opener", lambda path, st: None)
    from_disk = build(make_cache(tmp_path / "disk", busybox_image), ctx, source_date_epoch=1700000000)
    assert first.image_digest == from_disk.image_digest
    read_first = [path for path in opened if "/data/" in path and str(cache) in path]
    assert read_first == []
    in_context = sum(1 for path in ctx.rglob("*") if path.is_file())  # the Dockerfile too
    assert len([path for path in opened if "/data/" in path]) == in_context  # the disk build read them


def _spy_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The host paths the layer walk opens to read a file from disk, as it opens them."""
    from lamina.oci import walk

    opened: list[str] = []
    real_open = walk._open_file

    def spy(host_path: str) -> object:
        opened.append(host_path)
        return real_open(host_path)

    monkeypatch.setattr(walk, "_open_file", spy)
    return opened


def _splice_context(ctx: Path) -> Path:
    """Two directories of small files, and in them: a subdirectory whose name sorts between
    files, names that need pax path records, a file of more than a run's bytes, an xattr,
    and hard links within a directory and across two."""
    files: dict[str, str | bytes] = {}
    for top in ("d1", "d2"):
        for i in range(12):
            files[f"{top}/f{i:02d}"] = f"{top} {i}\n" * (i * 40)  # empty to a few blocks
    files["d1/f05x/inner"] = "between f05 and f06\n"
    files["d1/f05x/deeper/leaf"] = "below it\n"
    files["d1/" + "long" * 40] = "a pax path record\n"
    files["d1/ünïcödé"] = "a pax path record too\n"
    files["d2/big"] = bytes(range(256)) * 6000  # 1.5 MB
    write_context(ctx, DOCKERFILE, files)
    os.link(ctx / "d2/f01", ctx / "d2/f09link")
    os.link(ctx / "d1/f02", ctx / "d2/from-d1")
    try:
        os.setxattr(ctx / "d1/f03", "user.note", b"kept")
    except OSError as err:
        pytest.skip(f"this file system has no user xattrs ({err.strerror})")
    return ctx


def _keep_mtime(path: Path, change: object) -> None:
    stamp = os.stat(path)
    assert callable(change)
    change()
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


_CHANGES = {
    "one file of a directory": lambda ctx: (ctx / "d1/f07").write_text("changed\n"),
    "a mode only": lambda ctx: (ctx / "d1/f04").chmod(0o700),
    "a file in the subdirectory between files": lambda ctx: (ctx / "d1/f05x/inner").write_text("new\n"),
    "the file with a pax path": lambda ctx: (ctx / "d1" / ("long" * 40)).write_text("changed\n"),
    "a file with an xattr": lambda ctx: (ctx / "d1/f03").write_text("changed\n"),
    "an xattr only": lambda ctx: _keep_mtime(
        ctx / "d1/f03", lambda: os.setxattr(ctx / "d1/f03", "user.note", b"other")
    ),
    "a new hard link before an unchanged file": lambda ctx: os.link(ctx / "d1/f08", ctx / "d1/a-link"),
    "a new hard link after an unchanged file": lambda ctx: os.link(ctx / "d1/f01", ctx / "d2/z-link"),
    "the first of a hard-linked pair removed": lambda ctx: (ctx / "d2/f01").unlink(),
    "the big file": lambda ctx: (ctx / "d2/big").write_bytes(b"smaller\n"),
    "a file removed": lambda ctx: (ctx / "d1/f06").unlink(),
}


@pytest.mark.parametrize("change", list(_CHANGES))
def test_the_rerun_blob_takes_whole_members_of_the_last_blob(
    change: str, cache: Path, tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun's blob takes the runs of unchanged files' tar members from the last run's blob
    as they are (headers with their pax records, content, padding), and is byte for byte a
    cold build's, with SOURCE_DATE_EPOCH set, whatever changed around them."""
    from lamina.oci.donor import DonorTar

    ctx = _splice_context(tmp_path / "ctx")
    build(cache, ctx, source_date_epoch=1700000000)
    _CHANGES[change](ctx)
    taken: list[int] = []
    real_take = DonorTar.take

    def spy(self: DonorTar, paths: list[str], links: list[str], start: int) -> tuple[int, bytes]:
        count, data = real_take(self, paths, links, start)
        taken.append(count)
        return count, data

    monkeypatch.setattr(DonorTar, "take", spy)
    linked = build(cache, ctx, source_date_epoch=1700000000)
    monkeypatch.undo()
    assert not linked.steps[-1].cached
    fresh = build(make_cache(tmp_path / "fresh", busybox_image), ctx, source_date_epoch=1700000000)
    assert linked.image_digest == fresh.image_digest  # every blob and diff_id the same
    assert sum(taken) >= 20  # of the 31 files, most went as they were


# -- hard-link groups that change between runs --------------------------------------------
#
# A rerun links each unchanged file from the last run's layer dir by its path, and the last
# run may have written several paths as one inode. Where the context's link groups changed
# while every path kept its bytes, mode and times (`cp -p a b.new && mv b.new b`), the new
# layer must still link exactly the paths a cold build links.

_GROUP_TIME = 1_600_000_000_000_000_000


def _group_context(ctx: Path) -> Path:
    """g/a, g/b, g/c one inode; g/d, g/e, g/f separate files with the same bytes, mode and
    mtime; a few other files around them."""
    files: dict[str, str | bytes] = {f"g/{name}": "the same bytes\n" for name in "adef"}
    files.update({f"g/m{i}": f"other {i}\n" for i in range(6)})
    write_context(ctx, DOCKERFILE, files)
    for name in "bc":
        os.link(ctx / "g/a", ctx / "g" / name)
    for name in "adef":
        os.utime(ctx / "g" / name, ns=(_GROUP_TIME, _GROUP_TIME))
    return ctx


def _unlink_from_group(path: Path) -> None:
    """`cp -p path path.new && mv path.new path`: its own inode, same bytes, mode and times."""
    spare = path.with_name(path.name + ".new")
    shutil.copy2(path, spare)
    spare.rename(path)


def _join(first: Path, *others: Path) -> None:
    """Make `others` hard links of `first` (all had its bytes, mode and times)."""
    for other in others:
        other.unlink()
        os.link(first, other)


_GROUP_CHANGES = {
    "a link broken, same bytes and times": lambda g: _unlink_from_group(g / "b"),
    "the first path's link broken": lambda g: _unlink_from_group(g / "a"),
    "a 3-way group split into three": lambda g: [_unlink_from_group(g / n) for n in "bc"],
    "a 3-way group split into a pair and one": lambda g: _unlink_from_group(g / "c"),
    "a 3-way group split, the one joining another file": lambda g: (
        _unlink_from_group(g / "c"),
        _join(g / "c", g / "d"),
    ),
    "two separate files hard-linked": lambda g: _join(g / "d", g / "e"),
    "three separate files hard-linked": lambda g: _join(g / "d", g / "e", g / "f"),
    "a separate file joining a group": lambda g: _join(g / "a", g / "e"),
    "a pair's second path removed": lambda g: (g / "c").unlink() or (g / "b").unlink(),
    "a group's first path removed": lambda g: (g / "a").unlink(),
    "a group's first path removed, another broken out": lambda g: (
        (g / "a").unlink(),
        _unlink_from_group(g / "c"),
    ),
}


def _copy_layer(cache: Path, ctx: Path, out: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """Build with an OCI export to `out`: the image digest and the COPY layer's tar members
    (path, kind: a file or a hard link, the link's target)."""
    import io
    import tarfile

    from lamina.oci.compression import open_decompressed

    result = build(cache, ctx, source_date_epoch=1700000000, outputs=[f"type=oci,dest={out}"])
    assert not result.steps[-1].cached
    digest = oci_manifest(out)["layers"][-1]["digest"].split(":")[1]
    with tarfile.open(out) as outer:
        blob = outer.extractfile(f"blobs/sha256/{digest}")
        assert blob is not None
        members = []
        with tarfile.open(fileobj=open_decompressed(io.BytesIO(blob.read())), mode="r|") as tar:
            for info in tar:
                kind = "link" if info.islnk() else "file" if info.isfile() else "other"
                members.append((info.name, kind, info.linkname))
    return result.image_digest, members


@pytest.mark.parametrize("change", list(_GROUP_CHANGES))
def test_a_rerun_links_the_paths_a_cold_build_links(
    change: str, cache: Path, tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths the last run wrote as one inode are not linked from it as one unless the
    context still links them; paths it wrote apart are linked when the context links
    them: the rerun's layer holds the cold build's hard links, member for member, and
    its blob, taking the last blob's members where they are what the walk writes, is
    the cold build's."""
    from lamina.engine.sandbox.idmap import IdMode, detect_ids
    from lamina.oci.donor import DonorTar

    ctx = _group_context(tmp_path / "ctx")
    _copy_layer(cache, ctx, tmp_path / "first.tar")
    _GROUP_CHANGES[change](ctx / "g")
    taken: list[int] = []
    real_take = DonorTar.take

    def spy(self: DonorTar, paths: list[str], links: list[str], start: int) -> tuple[int, bytes]:
        count, data = real_take(self, paths, links, start)
        taken.append(count)
        return count, data

    monkeypatch.setattr(DonorTar, "take", spy)
    rerun, members = _copy_layer(cache, ctx, tmp_path / "rerun.tar")
    monkeypatch.undo()
    fresh = make_cache(tmp_path / "fresh", busybox_image)
    cold, cold_members = _copy_layer(fresh, ctx, tmp_path / "cold.tar")
    assert [m for m in members if m[0].startswith("data/g/")] == [
        m for m in cold_members if m[0].startswith("data/g/")
    ]
    assert rerun == cold
    reused = {st.st_ino for st in _layer_files(cache, "g/m3").values()}
    assert len(reused) == 1  # an unchanged file is still linked from the last run
    if detect_ids().mode is not IdMode.SUBORDINATE:  # else a helper writes the blob, no donor
        assert sum(taken) >= 6  # the other files' members, at least, came from the last blob


def test_a_file_copied_to_two_places_and_no_longer_hard_linked_is_two_files(
    cache: Path, tmp_path: Path, busybox_image: Path
) -> None:
    """A hard-linked file that two sources copy to two destinations is one inode there; once
    its other link is gone a cold build writes it twice, and so does a rerun."""
    text = f"FROM {BASE}\nCOPY g g/sub /data/\n"
    ctx = write_context(tmp_path / "ctx", text, {"g/sub/x": "shared\n", "g/y": "other\n"})
    os.link(ctx / "g/sub/x", ctx / "elsewhere")  # outside the sources
    _copy_layer(cache, ctx, tmp_path / "first.tar")
    (ctx / "elsewhere").unlink()
    rerun, members = _copy_layer(cache, ctx, tmp_path / "rerun.tar")
    cold, cold_members = _copy_layer(
        make_cache(tmp_path / "fresh", busybox_image), ctx, tmp_path / "cold.tar"
    )
    assert members == cold_members
    assert rerun == cold


def test_a_rerun_never_clears_the_setuid_bit_of_the_last_layers_hard_linked_file(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hard-linked pair's second path is a link of the first, which the rerun linked from
    the last run's layer: giving it its owner again would clear that published inode's
    setuid bit (chown does, even to the same owner) until its mode is set back, so a
    Ctrl-C there, or a build reading that layer meanwhile, would see it gone."""
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, {"bin/tool": "#!/bin/sh\n", "other": "x\n"})
    (ctx / "bin/tool").chmod(0o4755)
    os.link(ctx / "bin/tool", ctx / "bin/tool-alias")
    build(cache, ctx)
    (old,) = _layer_files(cache, "bin/tool")
    (ctx / "other").write_text("changed\n")
    real_chmod = os.chmod

    def interrupted(path: object, mode: int, *args: object, **kwargs: object) -> None:
        if os.stat(path).st_ino == (old / "data/bin/tool").stat().st_ino:  # type: ignore[arg-type]
            raise KeyboardInterrupt  # a Ctrl-C between its chown and its chmod
        real_chmod(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "chmod", interrupted)
    with contextlib.suppress(KeyboardInterrupt):  # the build stops there; the question is the old layer
        build(cache, ctx)
    monkeypatch.undo()
    assert stat.S_IMODE((old / "data/bin/tool").stat().st_mode) == 0o4755
    assert len({st.st_ino for st in _layer_files(cache, "bin/tool-alias").values()}) == 1  # linked


def test_records_of_an_older_lamina_are_not_used(cache: Path, tmp_path: Path, busybox_image: Path) -> None:
    """A last run's records written before they said which files were hard-linked (an
    older lamina's) cannot tell a broken link: that run's files are not linked, they
    are copied."""
    import json
    import sqlite3
    import zlib

    from lamina.engine.steps.copyadd.priorcopy import IN_GROUP, WRITTEN, encode

    ctx = _group_context(tmp_path / "ctx")
    _copy_layer(cache, ctx, tmp_path / "first.tar")
    # What an older lamina kept: the same records, none saying its file was hard-linked ...
    (spooled,) = (cache / "copies").glob("*.bin")
    data, stream = zlib.decompress(spooled.read_bytes()), b""
    while data:
        length = int.from_bytes(data[:2], "little")
        dest, record = data[2 : 2 + length].decode(), data[2 + length : 2 + length + WRITTEN.size]
        stream += encode(dest, record[:-1] + bytes((record[-1] & ~IN_GROUP,)))
        data = data[2 + length + WRITTEN.size :]
    spooled.write_bytes(zlib.compress(stream))
    # ... under the step's older cache record
    with contextlib.closing(sqlite3.connect(cache / "index.db")) as db, db:
        rows = db.execute("SELECT key, result FROM cache WHERE key LIKE 'copy-files:%'").fetchall()
        assert len(rows) == 1
        older = json.dumps({"dir": json.loads(rows[0][1])["dir"], "spooled": True})
        db.execute("UPDATE cache SET result = ? WHERE key = ?", (older, rows[0][0]))
    _unlink_from_group(ctx / "g/b")
    rerun, members = _copy_layer(cache, ctx, tmp_path / "rerun.tar")
    cold, cold_members = _copy_layer(
        make_cache(tmp_path / "fresh", busybox_image), ctx, tmp_path / "cold.tar"
    )
    assert (rerun, members) == (cold, cold_members)
    assert len({st.st_ino for st in _layer_files(cache, "g/m3").values()}) == 2  # copied, not linked


# -- the splice against hand-made layer dirs --------------------------------------------
#
# A COPY rerun makes only some of the hard-link layouts the walk must get right; these
# make the others directly: an old layer dir, its tar, and a new dir that hard-links its
# files as a rerun does, then changes some. The new dir's tar written with the old tar as
# donor must be the one written from disk alone.

_EPOCH = 1700000000


def _old_layer(old: Path) -> None:
    files: dict[str, str | bytes] = {f"d1/f{i:02d}": f"{i}\n" * (i * 30) for i in range(12)}
    files.update({"d1/f05x/inner": "between f05 and f06\n", "d1/" + "long" * 40: "pax\n"})
    files.update({"d1/ünïcödé": "pax too\n", "d2/big": bytes(range(256)) * 6000, "d2/h1": "linked\n"})
    write_context(old, "", files)
    (old / "Dockerfile").unlink()
    os.link(old / "d2/h1", old / "d2/h2")
    os.link(old / "d1/f02", old / "d2/x")
    (old / "d1/s-link").symlink_to("f01")
    os.chmod(old / "d1/f09", 0o4755)
    if os.geteuid() == 0:
        os.chown(old / "d1/f10", 1000, 1000)
    try:
        os.setxattr(old / "d1/f03", "user.note", b"kept")
    except OSError as err:
        pytest.skip(f"this file system has no user xattrs ({err.strerror})")


def _linked_copy(old: Path, new: Path) -> None:
    """What a COPY rerun with nothing changed leaves: new directories, the same files."""
    for here, dirs, names in os.walk(old):
        rel = Path(here).relative_to(old)
        (new / rel).mkdir(exist_ok=True)
        for name in sorted(dirs):
            (new / rel / name).mkdir()
        for name in names:
            if (old / rel / name).is_symlink():
                (new / rel / name).symlink_to(os.readlink(old / rel / name))
            else:
                os.link(old / rel / name, new / rel / name)


def _rewrite(path: Path, data: str | None = None, mode: int | None = None) -> None:
    """A fresh inode at `path` (what the copy writes for a changed file)."""
    text = path.read_text() if data is None else data
    path.unlink()
    path.write_text(text)
    if mode is not None:
        path.chmod(mode)


def _opaque_and_whiteout(new: Path) -> None:
    os.setxattr(new / "d1", "user.overlay.opaque", b"y")
    with contextlib.suppress(PermissionError):  # no whiteout without CAP_MKNOD: the marker alone
        os.mknod(new / "d1/gone", 0o600 | stat.S_IFCHR, os.makedev(0, 0))


_LAYOUTS = {
    "nothing changed": lambda new: None,
    "one file rewritten": lambda new: _rewrite(new / "d1/f07", "changed\n"),
    "a mode changed (a new file)": lambda new: _rewrite(new / "d1/f04", mode=0o700),
    "a file in the subdirectory between files": lambda new: _rewrite(new / "d1/f05x/inner", "new\n"),
    "the pax-named file rewritten": lambda new: _rewrite(new / "d1" / ("long" * 40), "changed\n"),
    "an earlier new path shares a taken file's inode": lambda new: os.link(new / "d1/f08", new / "d1/a-new"),
    "a later new path shares a taken file's inode": lambda new: os.link(new / "d1/f01", new / "d2/z-new"),
    "an earlier new path shares a linked pair's inode": lambda new: os.link(new / "d2/h1", new / "d2/a-new"),
    "a hard link's old target rewritten": lambda new: _rewrite(new / "d2/h1"),
    "a cross-directory link's target rewritten": lambda new: _rewrite(new / "d1/f02"),
    "an opaque directory and a whiteout": _opaque_and_whiteout,
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("cut", [False, True], ids=["whole donor", "donor cut short"])
def test_a_tar_taking_the_donors_members_is_the_tar_read_from_disk(
    layout: str, cut: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from lamina.engine.sandbox.idmap import IdMode, detect_ids
    from lamina.engine.snapshot import write_upper
    from lamina.oci.compression import Compression
    from lamina.oci.donor import DonorTar

    if detect_ids().mode is IdMode.SUBORDINATE:
        pytest.skip("with subordinate ids a helper in the user namespace writes the blob, with no donor")
    old, new = tmp_path / "old", tmp_path / "new"
    _old_layer(old)
    _linked_copy(old, new)
    _LAYOUTS[layout](new)

    def tar(upper: Path, donor: bytes | None = None) -> bytes:
        out = io.BytesIO()
        given = None if donor is None else (old, lambda: io.BytesIO(donor))
        write_upper(upper, out, Compression.NONE, source_date_epoch=_EPOCH, donor=given)  # type: ignore[arg-type]
        return out.getvalue()

    old_tar = tar(old)
    taken: list[int] = []
    real_take = DonorTar.take

    def spy(self: DonorTar, paths: list[str], links: list[str], start: int) -> tuple[int, bytes]:
        count, data = real_take(self, paths, links, start)
        taken.append(count)
        return count, data

    monkeypatch.setattr(DonorTar, "take", spy)
    spliced = tar(new, old_tar[: len(old_tar) // 2] if cut else old_tar)
    monkeypatch.undo()
    assert spliced == tar(new)
    assert sum(taken) >= (5 if cut else 15)  # of 20 files, those the donor still held went as they were


@pytest.mark.skipif(bool(plain_user_missing()), reason=plain_user_missing() or "ready")
def test_as_a_plain_user_the_rerun_blob_is_a_cold_builds(busybox_image: Path) -> None:
    """Without root or subordinate ids (owners read through lamina's id mapping, proot for
    RUN), a rerun still takes the last blob's members, and its image is a cold build's."""
    import json
    import shutil

    from tests.support.plainuser import plain_user

    with plain_user("lamina-splice-") as user:
        ctx = _splice_context(user.base / "ctx")
        shutil.copy(busybox_image, user.base / "base.tar")
        user.give()
        env = {"SOURCE_DATE_EPOCH": "1700000000"}

        def build_in(cache: str) -> str:
            full = {"LAMINA_CACHE": str(user.base / cache), **env}
            if not (user.base / cache).exists():
                assert user.lamina("load", str(user.base / "base.tar"), env=full).returncode == 0
            meta = user.base / "meta.json"
            done = user.lamina("build", "--progress=plain", "--metadata-file", str(meta), str(ctx), env=full)
            assert done.returncode == 0, done.stderr
            return str(json.loads(meta.read_text())["containerimage.digest"])

        first = build_in("cache")
        (ctx / "d1/f07").write_text("changed\n")
        rerun = build_in("cache")
        assert rerun != first
        assert rerun == build_in("fresh")
