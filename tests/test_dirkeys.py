"""A COPY of the build context keyed from per-directory records (steps.copyadd.dirkeys).

The key from records must be the key `selection_key` gives the same tree
keyed from nothing, after any change: a stale record is never used. Each
case keys a tree once (records stored), changes it, and compares the key
from records with the key of a fresh walk; the key must also have moved.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.cache.statcache import StatCache
from lamina.engine import statpass
from lamina.engine.context import open_build_context
from lamina.engine.steps.copyadd import dirkeys
from lamina.engine.steps.copyadd.chmod import parse_chmod
from lamina.engine.steps.copyadd.selection import CopyOptions, select_sources, selection_key

PLAIN = CopyOptions()
FILES = {
    "a/x.txt": "x",
    "a/b/y.txt": "yy",
    "a/b/c/deep.txt": "deep",
    "z.txt": "zzz",
    "keep/k1": "k1",
    "keep/sub/k2": "k2",
    "skip/s": "s",
    "skip/inner/back.txt": "back",
    "logs/1.log": "one",
    "logs/keep.log": "kept",
}


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "ctx"
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "a" / "link").symlink_to("x.txt")
    (root / "empty").mkdir()
    os.chmod(root / "z.txt", 0o751)
    (root / ".dockerignore").write_text("skip\n!skip/inner/back.txt\nlogs/*.log\n!logs/keep.log\n")
    _settle()
    yield root
    statpass.forget()


def _settle() -> None:
    """Let the tree's timestamps age past the racy window, or no record is stored."""
    time.sleep(dirkeys._SETTLE_NS / 1e9 + 0.05)


class Keys:
    """Keys one tree the way a build does: from records (with a memo stat pass or not),
    and from nothing (the ordinary walk and selection_key)."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root = root
        self.cache = cache
        self.drafted: list[str] = []

    def from_records(
        self, sources: list[str], dest: str = "/out/", options: CopyOptions = PLAIN, memo: bool = True
    ) -> str:
        statpass.forget()
        if memo:
            statpass.fingerprint(self.root, hashlib.sha256())
        with StatCache(self.cache) as stat_cache:
            tree = open_build_context(self.root, stat_cache)
            keyed = dirkeys.context_key(tree, sources, dest, options, None, self.cache)
        statpass.forget()
        assert keyed is not None
        return str(keyed.digest)

    def fresh(self, sources: list[str], dest: str = "/out/", options: CopyOptions = PLAIN) -> str:
        statpass.forget()
        tree = open_build_context(self.root, StatCache(None))
        return str(selection_key(tree, select_sources(tree, sources, dest, options, None)))


@pytest.fixture
def keys(ctx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Keys:
    made = Keys(ctx, tmp_path / "cache")
    original = dirkeys._Walk._draft

    def spy(self: dirkeys._Walk, rel: str, *args: object) -> object:
        made.drafted.append(rel)
        return original(self, rel, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(dirkeys._Walk, "_draft", spy)
    return made


def test_the_key_from_records_is_the_ordinary_key(keys: Keys) -> None:
    first = keys.from_records(["."])
    assert first == keys.fresh(["."])
    assert "" in keys.drafted and "a/b/c" in keys.drafted
    keys.drafted.clear()
    assert keys.from_records(["."]) == first
    assert keys.drafted == []  # every directory from its record
    assert keys.from_records(["."], memo=False) == first  # its own stat pass: the same listings
    assert keys.drafted == []


def _rewrite_same_size_keep_mtime(root: Path) -> None:
    path = root / "a" / "b" / "y.txt"
    st = path.stat()
    path.write_text("zz")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored: only the ctime moves


def _set_xattr(root: Path) -> None:
    try:
        os.setxattr(root / "a" / "x.txt", "user.h3test", b"v")
    except OSError as err:
        pytest.skip(f"{root} holds no user xattrs: {err}")


def _retarget(root: Path) -> None:
    (root / "a" / "link").unlink()
    (root / "a" / "link").symlink_to("b")


def _move(root: Path) -> None:
    os.rename(root / "a" / "b" / "c" / "deep.txt", root / "keep" / "sub" / "deep.txt")


CHANGES: dict[str, tuple[Callable[[Path], None], set[str]]] = {
    # name: (the change, directories whose record it may make again; the others are reused)
    "rename": (lambda root: os.rename(root / "a" / "x.txt", root / "a" / "x2.txt"), {"", "a"}),
    "same size, mtime restored": (_rewrite_same_size_keep_mtime, {"a/b"}),
    "chmod": (lambda root: os.chmod(root / "a" / "b" / "y.txt", 0o600), {"a/b"}),
    "xattr added": (_set_xattr, {"a"}),
    "symlink retargeted": (_retarget, {"", "a"}),
    "moved between directories": (_move, {"", "a", "a/b", "a/b/c", "keep", "keep/sub"}),
    "directory chmod": (lambda root: os.chmod(root / "a" / "b" / "c", 0o700), {"a/b"}),
    "file added": (lambda root: (root / "empty" / "new").write_text("n"), {"", "empty"}),
    "left-out file kept by a new file": (lambda root: (root / "skip" / "inner" / "x").write_text("x"), None),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_tree_is_keyed_as_the_cold_build_keys_it(keys: Keys, change: str) -> None:
    before = keys.from_records(["."])
    apply, may_redo = CHANGES[change]
    apply(keys.root)
    keys.drafted.clear()
    after = keys.from_records(["."])
    assert after == keys.fresh(["."])
    assert after != before or change == "left-out file kept by a new file"
    if may_redo is not None:
        assert set(keys.drafted) <= may_redo | {"", "a", "a/b", "keep", "keep/sub", "empty"}
        assert set(keys.drafted) & may_redo  # the changed directory was keyed again
        assert "a/b/c" not in keys.drafted or "a/b/c" in may_redo


def test_a_new_ignore_pattern_or_option_uses_no_record_of_another(keys: Keys) -> None:
    before = keys.from_records(["."])
    (keys.root / ".dockerignore").write_text("skip\na/b\n")
    after = keys.from_records(["."])
    assert after == keys.fresh(["."]) and after != before
    for options in (
        CopyOptions(excludes=("**/*.txt", "!z.txt")),
        CopyOptions(excludes=("a",)),
        CopyOptions(excludes=("a", "!a/b/y.txt")),  # a left-out directory walked for an exception
        CopyOptions(chown=(7, 8)),
        CopyOptions(chmod=parse_chmod("go-r")),
        CopyOptions(chmod=parse_chmod("0700")),
    ):
        keys.from_records(["."], options=options)  # records made, then used
        assert keys.from_records(["."], options=options) == keys.fresh(["."], options=options)
        assert keys.from_records(["."], options=options) != after


def test_shapes_keyed_from_records_match_the_ordinary_key(keys: Keys) -> None:
    (keys.root / "dirlink").symlink_to("a")
    _settle()
    for sources, dest in (
        (["a"], "/out"),
        (["a", "keep"], "/out/"),
        (["a/b/"], "/"),
        (["dirlink"], "/o"),
        (["skip"], "/s/"),  # left out itself; an exception keeps a file below
        (["logs"], "logs"),
    ):
        first = keys.from_records(sources, dest)
        assert first == keys.fresh(sources, dest), sources
        assert keys.from_records(sources, dest) == first


def test_a_first_build_keyed_in_small_batches_is_the_ordinary_key(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drafts are digested a batch at a time (bounded memory): any cut gives the same key."""
    monkeypatch.setattr(dirkeys, "_BATCH", 2)
    assert keys.from_records(["."]) == keys.fresh(["."])
    assert keys.from_records(["a", "keep"], "/o/") == keys.fresh(["a", "keep"], "/o/")


def test_a_first_build_gets_the_selection_it_walked(keys: Keys) -> None:
    """No record served: the walk made every item, in select_sources' order (not walked again)."""
    (keys.root / "dirlink").symlink_to("a")
    for sources, options in (
        (["."], PLAIN),
        (["keep", "dirlink"], CopyOptions(chown=(1, 2), chmod=parse_chmod("u+x"))),
        (["skip"], PLAIN),
        (["."], CopyOptions(excludes=("a/b", "!a/b/c/deep.txt", "logs"))),
    ):
        with StatCache(None) as stat_cache:
            tree = open_build_context(keys.root, stat_cache)
            keyed = dirkeys.context_key(tree, sources, "/o/", options, None, keys.cache / repr(options))
            again = dirkeys.context_key(tree, sources, "/o/", options, None, keys.cache / repr(options))
            assert keyed is not None and again is not None
            want = select_sources(tree, sources, "/o/", options, None)
            assert keyed.selection is not None and keyed.selection.made_dirs == want.made_dirs
            assert list(keyed.selection.items) == list(want.items)
            assert again.selection is None and again.digest == keyed.digest  # from its records


def test_other_shapes_are_keyed_the_ordinary_way(keys: Keys) -> None:
    with StatCache(None) as stat_cache:
        tree = open_build_context(keys.root, stat_cache)
        for sources, options in (
            (["z.txt"], CopyOptions()),
            (["a", "z.txt"], CopyOptions()),
            (["a/*"], CopyOptions()),
            (["a"], CopyOptions(parents=True)),
            (["missing"], CopyOptions()),
        ):
            assert dirkeys.context_key(tree, sources, "/o/", options, None, keys.cache) is None


def test_a_hard_link_is_keyed_the_ordinary_way(keys: Keys) -> None:
    os.link(keys.root / "a" / "x.txt", keys.root / "keep" / "x-again")
    with StatCache(None) as stat_cache:
        tree = open_build_context(keys.root, stat_cache)
        assert dirkeys.context_key(tree, ["."], "/o/", CopyOptions(), None, keys.cache) is None


def test_a_directory_changed_in_its_racy_window_is_not_recorded(keys: Keys) -> None:
    keys.from_records(["."])
    (keys.root / "a" / "b" / "y.txt").write_text("new")  # now: within the window
    keys.drafted.clear()
    keys.from_records(["."])
    assert "a/b" in keys.drafted
    keys.drafted.clear()
    assert keys.from_records(["."]) == keys.fresh(["."])
    assert "a/b" in keys.drafted  # not stored the first time: made again


@pytest.mark.parametrize("cut", [1, 40, -1])
def test_a_torn_records_file_is_not_used(keys: Keys, cut: int) -> None:
    keys.from_records(["."])
    (stored,) = (keys.cache / dirkeys.DIR_NAME).iterdir()
    data = stored.read_bytes()
    stored.write_bytes(data[:cut])  # a crash mid-write, before its end mark
    keys.drafted.clear()
    assert keys.from_records(["."]) == keys.fresh(["."])
    assert "a/b" in keys.drafted and "" in keys.drafted  # every directory made again
    keys.drafted.clear()
    keys.from_records(["."])
    assert keys.drafted == []  # and stored whole again


def test_keying_and_walking_end_at_the_next_directory_once_the_build_is_stopping(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM) while a big context is keyed or walked ends it at the next
    directory or file (the executor sets the stat cache's `stop`), not after all of them."""
    stop = threading.Event()
    drafted = keys.drafted
    original = dirkeys._Walk._draft

    def draft_then_stop(self: dirkeys._Walk, rel: str, *args: object) -> object:
        stop.set()
        return original(self, rel, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(dirkeys._Walk, "_draft", draft_then_stop)
    with StatCache(keys.cache) as stat_cache:
        stat_cache.stop = stop
        tree = open_build_context(keys.root, stat_cache)
        with pytest.raises(KeyboardInterrupt):
            dirkeys.context_key(tree, ["."], "/o/", PLAIN, None, keys.cache)
        assert drafted == [""] and stat_cache.misses == 0  # the top drafted, then stopped: no file hashed
        with pytest.raises(KeyboardInterrupt):
            select_sources(tree, ["."], "/o/", PLAIN, None)
        files = [(rel, tree.entry(rel).key) for rel in ("z.txt", "a/x.txt")]  # type: ignore[union-attr]
        with pytest.raises(KeyboardInterrupt):
            stat_cache.digest_many(files, tree.scope, str(keys.root))
        stop.clear()
        assert len(stat_cache.digest_many(files, tree.scope, str(keys.root))) == 2


def test_a_rebuild_that_reused_records_keeps_the_stat_cache_whole(keys: Keys) -> None:
    keys.from_records(["."])
    shard = StatCache(keys.cache).shard_path(os.path.realpath(keys.root))
    assert shard is not None
    held = len(shard.read_bytes())
    (keys.root / "a" / "x.txt").write_text("changed")  # hashed again: one new digest saved
    _settle()
    keys.from_records(["."])
    assert len(shard.read_bytes()) > held  # appended, not pruned to the one directory looked up


def test_a_build_after_a_same_size_rewrite_copies_the_new_bytes(tmp_path: Path) -> None:
    from tests.support.build import build, cached_steps, rootfs, write_context

    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY . /ctx\n", FILES)
    (ctx / ".dockerignore").write_text("skip\n")
    _settle()
    cache = tmp_path / "cache"
    first = build(cache, ctx)
    assert (cache / dirkeys.DIR_NAME).is_dir()  # the directories' records were kept
    (ctx / "a" / "x.txt").write_text("x")  # the same bytes: the memo misses, the key does not
    again = build(cache, ctx)
    assert all(cached_steps(again)) and again.image_digest == first.image_digest
    _rewrite_same_size_keep_mtime(ctx)
    out = tmp_path / "out"
    result = rootfs(cache, ctx, out)
    assert cached_steps(result) == [False]
    assert (out / "ctx" / "a" / "b" / "y.txt").read_text() == "zz"


def test_a_fetched_context_leaves_no_records(tmp_path: Path) -> None:
    """A tar or git context is unpacked to a new directory each build: records of it would
    never serve, only fill the cache."""
    import io
    import tarfile

    from tests.support.build import build
    from tests.support.servers import serve_directory

    (tmp_path / "www").mkdir()
    with tarfile.open(tmp_path / "www" / "ctx.tar", "w") as tar:
        for name, text in {"Dockerfile": "FROM scratch\nCOPY . /ctx\n", **FILES}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    cache = tmp_path / "cache"
    with serve_directory(tmp_path / "www") as url:
        build(cache, f"{url}/ctx.tar", outputs=[f"type=local,dest={tmp_path / 'out'}"])
    assert (tmp_path / "out" / "ctx" / "a" / "b" / "y.txt").read_text() == "yy"
    assert not (cache / dirkeys.DIR_NAME).exists()


_NAMES = ("a", "b", "c.txt", "d.log")
_PATTERNS = ("a", "b/c.txt", "*.log", "**/*.txt", "!a/c.txt", "!**/d.log", "b", "!b/a", "a/*", "c.txt")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    paths=st.lists(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3), min_size=1, max_size=12),
    ignore=st.lists(st.sampled_from(_PATTERNS), max_size=4),
    excludes=st.lists(st.sampled_from(_PATTERNS), max_size=3),
    change=st.integers(min_value=0, max_value=100),
)
def test_any_tree_ignore_and_exclude_key_as_the_ordinary_walk(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    paths: list[list[str]],
    ignore: list[str],
    excludes: list[str],
    change: int,
) -> None:
    """The one-level filters of dirkeys are SourceTree.walk's: for any tree, .dockerignore
    (with exceptions) and --exclude, first from nothing, then after one file changes."""
    monkeypatch.setattr(dirkeys, "_SETTLE_NS", -(10**9))  # store every record (a tick is waited below)
    root = tmp_path_factory.mktemp("tree")
    ctx = root / "ctx"
    ctx.mkdir()
    files = []
    for parts in sorted(map(tuple, paths)):
        path = ctx.joinpath(*parts)
        if any(p.is_file() for p in path.parents if p != ctx) or path.is_dir():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("/".join(parts))
        files.append(path)
    if ignore:
        (ctx / ".dockerignore").write_text("\n".join(ignore) + "\n")
    keys = Keys(ctx, root / "cache")
    options = CopyOptions(excludes=tuple(excludes))
    assert keys.from_records(["."], options=options) == keys.fresh(["."], options=options)
    time.sleep(0.02)  # past the timestamp tick: the change moves the ctime
    target = files[change % len(files)] if files else None
    if target is not None:
        target.write_text("changed " + target.read_text())
    assert keys.from_records(["."], options=options) == keys.fresh(["."], options=options)
