"""One stat pass per build: the walk of the build context reuses what the memo's pass saw."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.cache.statcache import StatCache
from lamina.engine import statpass
from lamina.engine.context import open_build_context


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "ctx"
    for rel, text in {"a/x.txt": "x", "a/b/y.txt": "yy", "z": "zzz", "skip/s": "s"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "a" / "link").symlink_to("x.txt")
    (root / "empty").mkdir()
    os.chmod(root / "z", 0o751)
    (root / ".dockerignore").write_text("skip\n")
    yield root
    statpass.forget()


def _walk(root: Path) -> list[tuple[object, ...]]:
    tree = open_build_context(root, StatCache(None))
    return [
        (e.path, e.type, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.linkname, e.key) for e in tree.walk()
    ]


def test_the_walk_after_the_memo_pass_is_the_walk_without_it(ctx: Path) -> None:
    fresh = _walk(ctx)
    statpass.fingerprint(ctx, hashlib.sha256())
    assert _walk(ctx) == fresh
    assert statpass.take(os.path.realpath(ctx), "") is None  # every directory walked was taken


def test_the_memo_key_text_is_the_stat_identity_of_every_entry(ctx: Path) -> None:
    """The memo's fingerprint is what it was before the pass was shared: paths and stat
    fields, so that a touched file (new ctime) misses the memo."""
    first, second = hashlib.sha256(), hashlib.sha256()
    statpass.fingerprint(ctx, first)
    statpass.fingerprint(ctx, second)
    assert first.digest() == second.digest()
    (ctx / "a" / "x.txt").write_text("x")  # same bytes, new ctime
    third = hashlib.sha256()
    statpass.fingerprint(ctx, third)
    assert third.digest() != first.digest()


def test_a_directory_is_taken_from_the_pass_once_then_read_again(ctx: Path) -> None:
    statpass.fingerprint(ctx, hashlib.sha256())
    (ctx / "z").write_text("longer now")
    sizes = {path: size for path, _, _, _, _, size, *_ in _walk(ctx)}
    assert sizes["z"] == 3  # as the pass of this build saw it (the copy checks it again)
    sizes = {path: size for path, _, _, _, _, size, *_ in _walk(ctx)}
    assert sizes["z"] == len("longer now")


def test_a_forgotten_pass_is_never_used(ctx: Path) -> None:
    statpass.fingerprint(ctx, hashlib.sha256())
    statpass.forget()  # the end of the build that made it
    (ctx / "new").write_text("n")
    assert "new" in [row[0] for row in _walk(ctx)]
