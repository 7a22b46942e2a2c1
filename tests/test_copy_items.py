"""A COPY's items packed (issue 22): iterating gives back exactly what was appended."""

from __future__ import annotations

import os
from pathlib import Path

from lamina.cache.statcache import StatCache, stat_key
from lamina.engine.context import TreeEntry, open_build_context
from lamina.engine.steps.copyadd.items import CopyItem, Items
from lamina.engine.steps.copyadd.selection import CopyOptions, select_sources
from lamina.oci.entry import EntryType


def test_a_walks_items_come_back_equal_and_in_order(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    for d in ("a", "a/b", "c"):
        (ctx / d).mkdir(parents=True)
    for name in ("a/1", "a/b/2", "a/z", "c/3", "top"):
        (ctx / name).write_text(name)
    os.symlink("top", ctx / "a/link")
    os.link(ctx / "top", ctx / "c/hard")
    tree = open_build_context(ctx, StatCache(None))
    selection = select_sources(tree, ["."], "/out/", CopyOptions(chown=(70000, 5)))
    assert isinstance(selection.items, Items)
    walked = [e.path for e in tree.walk()]
    items = list(selection.items)
    assert [item.entry.path for item in items] == walked
    assert items == list(selection.items)  # made anew each time, equal
    link = next(item for item in items if item.entry.type is EntryType.SYMLINK)
    assert (link.dest, link.entry.linkname, link.mode) == ("out/a/link", "top", 0o777)
    hard = next(item for item in items if item.entry.path == "c/hard")
    assert hard.entry.nlink == 2 and (hard.uid, hard.gid) == (70000, 5)
    assert len(selection.items) == len(walked)


def test_items_that_fit_no_record_are_kept_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("x")
    st = os.lstat(path)
    key = stat_key(st)
    plain = TreeEntry("d/f", EntryType.FILE, 0o644, 1, 2, st.st_size, st.st_mtime_ns, key=key)
    odd = [
        CopyItem("d/other-name", plain, 0o644, 0, 0),  # renamed on the way (a file source to dest)
        CopyItem(
            "d/f", TreeEntry("d/f", EntryType.FILE, 0o644, 1, 2, 0, 0, key=key, socket=True), 0o644, 0, 0
        ),
        CopyItem(
            "d/f", TreeEntry("d/f", EntryType.FIFO, 0o600, 1, 2, 0, st.st_mtime_ns, key=key), 0o600, 0, 0
        ),
        CopyItem(
            "d/f",
            TreeEntry("d/f", EntryType.FILE, 0o644, 2**33, 2, st.st_size, st.st_mtime_ns, key=key),
            0o644,
            0,
            0,
        ),
        CopyItem("d/f", TreeEntry("d/f", EntryType.FILE, 0o644, 1, 2, st.st_size, 5, key=key), 0o644, 0, 0),
    ]
    items = Items()
    for item in [CopyItem("d/f", plain, 0o600, 3, 4), *odd, CopyItem("e/f", plain, 0o644, 0, 0)]:
        items.append(item)
    items.seal()
    assert list(items) == [CopyItem("d/f", plain, 0o600, 3, 4), *odd, CopyItem("e/f", plain, 0o644, 0, 0)]
