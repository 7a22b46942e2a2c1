"""COPY writes the items one by one, in order: a later source wins, hard links
stay hard links, and a file that changed after it was keyed stops the copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.cache.statcache import StatCache
from lamina.engine.context import SourceTree, open_build_context
from lamina.engine.steps.copyadd.placement import write_selection
from lamina.engine.steps.copyadd.selection import CopyOptions, select_sources
from lamina.errors import ContextError


def _context(root: Path) -> SourceTree:
    """Several batches of files, nested dirs, symlinks, hard links far apart,
    and two directories holding the same names."""
    for i in range(300):
        path = root / "src" / f"d{i % 7}" / f"f{i:03}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {i}\n" * (i % 13))
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    os.link(root / "src" / "d0" / "f000.txt", root / "src" / "d6" / "zz-link")
    os.symlink("d1/f001.txt", root / "src" / "sym")
    for side in ("one", "two"):
        (root / side / "same").mkdir(parents=True)
        for i in range(80):
            (root / side / "same" / f"n{i:02}").write_text(f"{side} {i}\n")
    return open_build_context(root, StatCache(None))


def _write(tree: SourceTree, sources: list[str], out: Path, **options: object) -> int:
    selection = select_sources(tree, sources, "/dest/", CopyOptions(**options))  # type: ignore[arg-type]
    out.mkdir()
    return write_selection(tree, selection, out)


def test_later_source_wins_and_hard_links_stay(tmp_path: Path) -> None:
    tree = _context(tmp_path / "ctx")
    written = _write(tree, ["src", "one/", "two/"], tmp_path / "out")
    dest = tmp_path / "out" / "dest"
    assert (dest / "same" / "n07").read_text() == "two 7\n"
    assert (dest / "d6" / "zz-link").stat().st_ino == (dest / "d0" / "f000.txt").stat().st_ino
    assert os.readlink(dest / "sym") == "d1/f001.txt"
    assert (dest / "d3" / "f010.txt").stat().st_mtime_ns == 10**18 + 10
    sizes = sum(p.stat().st_size for p in (tmp_path / "ctx").rglob("*") if p.is_file() and not p.is_symlink())
    assert written == sizes - (dest / "d6" / "zz-link").stat().st_size  # a hard link copies nothing


def test_a_file_changed_after_selection_fails_the_copy_there(tmp_path: Path) -> None:
    tree = _context(tmp_path / "ctx")
    selection = select_sources(tree, ["src"], "/dest/", CopyOptions())
    changed = tmp_path / "ctx" / "src" / "d4" / "f200.txt"
    changed.write_text("changed after the key was made\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ContextError, match=r"d4/f200\.txt changed while the build was reading it"):
        write_selection(tree, selection, out)
    assert (out / "dest" / "d4" / "f193.txt").exists()  # what came before it was written
    assert not (out / "dest" / "d4" / "f207.txt").exists()  # nothing after it
