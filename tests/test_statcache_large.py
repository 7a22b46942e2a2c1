"""The stat cache on large contexts: bounded work for threads, files read in one call (issue 22)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lamina.cache import statcache
from lamina.cache.statcache import StatCache, hash_file, stat_key


def _items(paths: list[Path]) -> list[tuple[str, statcache.StatKey]]:
    return [(str(p), stat_key(os.lstat(p))) for p in paths]


def test_small_and_large_files_digest_as_sha256_in_order(tmp_path: Path) -> None:
    paths = []
    for i in range(40):
        path = tmp_path / f"f{i:02d}"
        # Every third file is larger than what is read in one call.
        size = statcache._SMALL + 1000 * i if i % 3 == 0 else i * 7
        path.write_bytes(bytes((i + n) % 251 for n in range(size)))
        paths.append(path)
    digests = StatCache(None).digest_many(_items(paths))
    assert digests == [hashlib.sha256(p.read_bytes()).digest() for p in paths]


def test_a_file_that_grew_since_lstat_is_hashed_whole(tmp_path: Path) -> None:
    path = tmp_path / "grows"
    path.write_bytes(b"x" * 10)
    size = os.lstat(path).st_size
    path.write_bytes(b"x" * 100_000)
    digest, after = hash_file(path, size)
    assert digest == hashlib.sha256(b"x" * 100_000).digest()
    assert after.st_size == 100_000


def test_a_file_that_shrank_since_lstat_is_hashed_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "shrinks"
    path.write_bytes(b"y" * 5000)
    size = os.lstat(path).st_size
    path.write_bytes(b"y" * 3)
    assert hash_file(path, size)[0] == hashlib.sha256(b"yyy").digest()


def test_threads_get_a_bounded_window_of_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many files a context has, only a few are handed to threads at once."""
    monkeypatch.setattr(statcache, "_SMALL", 0)  # every file goes to the pool
    paths = []
    for i in range(300):
        path = tmp_path / f"f{i:03d}"
        path.write_bytes(b"%d" % i)
        paths.append(path)
    outstanding = 0
    most = 0
    submit = ThreadPoolExecutor.submit

    def counting_submit(self: ThreadPoolExecutor, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal outstanding, most
        outstanding += 1
        most = max(most, outstanding)
        future = submit(self, fn, *args, **kwargs)

        def done(_: object) -> None:
            nonlocal outstanding
            outstanding -= 1

        future.add_done_callback(done)
        return future

    monkeypatch.setattr(ThreadPoolExecutor, "submit", counting_submit)
    digests = StatCache(None).digest_many(_items(paths))
    assert digests == [hashlib.sha256(p.read_bytes()).digest() for p in paths]
    assert most <= min(4, os.cpu_count() or 1) * statcache._WINDOW


def test_an_unreadable_large_file_raises_and_stops_the_pool(tmp_path: Path) -> None:
    paths = []
    for i in range(6):
        path = tmp_path / f"big{i}"
        path.write_bytes(b"z" * (statcache._SMALL + 1))
        paths.append(path)
    items = _items(paths)
    os.unlink(paths[3])
    with pytest.raises(FileNotFoundError):
        StatCache(None).digest_many(items)


def test_a_saved_shard_is_read_back_record_for_record(tmp_path: Path) -> None:
    """The on-disk format (fixed records of the five stat fields and the digest) is what a
    new process loads: an unchanged file's digest comes from it, the file is never opened."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    path = ctx / "f"
    path.write_bytes(b"content")
    key = stat_key(os.lstat(path))
    cache = StatCache(tmp_path / "cache")
    shard = cache.shard_path("scope")
    assert shard is not None
    shard.parent.mkdir(parents=True)
    recorded = b"r" * 32  # not the file's sha256: proves the record, not the file, answered
    other = statcache._RECORD.pack(1, 2, 3, 4, 5, b"o" * 32, 0)
    shard.write_bytes(statcache._MAGIC + other + key + recorded + b"\1" + b"torn")
    assert cache.size("scope") == 2
    assert cache.digest(path, key, "scope") == recorded
    assert cache.hits == 1 and cache.misses == 0
    assert cache.plain(key, "scope") and not cache.plain(statcache._KEY.pack(1, 2, 3, 4, 5), "scope")


def test_hashing_a_big_context_reports_progress_to_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statcache, "_PROGRESS_FROM", 10)
    monkeypatch.setattr(statcache, "_PROGRESS_EVERY", 0.0)
    monkeypatch.setattr(statcache, "_SETTLE_NS", 0)  # the files just written count as settled
    paths = []
    for i in range(30):
        path = tmp_path / f"f{i:02d}"
        path.write_bytes(b"a" * i)
        paths.append(path)
    cache = StatCache(None)
    reports: list[tuple[int, int, int]] = []
    cache.progress = lambda done, total, nbytes: reports.append((done, total, nbytes))
    cache.digest_many(_items(paths), scope="context")
    assert reports[-1] == (30, 30, sum(range(30)))
    assert [r[0] for r in reports] == sorted(r[0] for r in reports)
    # A stage's files (no scope) and a warm context report nothing.
    reports.clear()
    cache.digest_many(_items(paths), scope="context")
    StatCache(None).digest_many(_items(paths))
    assert reports == []


def test_the_tty_view_shows_the_context_being_hashed() -> None:
    import io

    from lamina.engine.progress import ContextSink, TtyProgress

    stream = io.StringIO()
    sink = TtyProgress(stream)
    assert isinstance(sink, ContextSink)
    sink.context_progress(1_234, 100_000, 5_600_000)
    sink.context_progress(100_000, 100_000, 9_100_000)
    sink.finish(None)
    assert "[internal] load build context: 100,000/100,000 files hashed, 9.1 MB done" in stream.getvalue()


def test_a_context_file_read_for_its_digest_is_kept_once_for_the_copy(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"small file\n")
    large.write_bytes(b"L" * (statcache._KEEP_FILE + 1))
    items = _items([small, large])
    cache = StatCache(None)
    cache.digest_many(items, scope="context")
    assert cache.take(items[0][1]) == b"small file\n"
    assert cache.take(items[0][1]) is None  # handed out once
    assert cache.take(items[1][1]) is None  # too big to keep: the copy reads it
    other = StatCache(None)
    other.digest_many(items)  # a stage's files (no scope) are never kept
    assert other.take(items[0][1]) is None


def test_copy_writes_what_was_hashed_reading_each_file_once(tmp_path: Path) -> None:
    from lamina.engine.context import open_build_context
    from lamina.engine.steps.copyadd.placement import write_selection
    from lamina.engine.steps.copyadd.selection import CopyOptions, select_sources, selection_key

    ctx = tmp_path / "ctx"
    (ctx / "d").mkdir(parents=True)
    for i in range(50):
        (ctx / "d" / f"f{i}").write_bytes(b"%d\n" % i * i)
    tree = open_build_context(ctx, StatCache(tmp_path / "cache"))
    selection = select_sources(tree, ["."], "/out/", CopyOptions())
    selection_key(tree, selection)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).startswith(str(ctx)):
            opened.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", counting_open)
        write_selection(tree, selection, dest)
    assert opened == []  # every file came from the read that hashed it
    for i in range(50):
        assert (dest / "out" / "d" / f"f{i}").read_bytes() == b"%d\n" % i * i


def test_a_rebuild_appends_only_the_new_digests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statcache, "_SETTLE_NS", 0)
    paths = []
    for i in range(20):
        path = tmp_path / f"f{i:02d}"
        path.write_bytes(b"%d" % i)
        paths.append(path)
    cache_dir = tmp_path / "cache"
    with StatCache(cache_dir) as cache:
        cache.digest_many(_items(paths), "ctx")
    shard = StatCache(cache_dir).shard_path("ctx")
    assert shard is not None
    size = shard.stat().st_size
    assert size == len(statcache._MAGIC) + 20 * statcache._RECORD.size
    paths[3].write_bytes(b"changed")
    with StatCache(cache_dir) as cache:
        cache.digest_many(_items(paths), "ctx")
    assert shard.stat().st_size == size + statcache._RECORD.size  # one record appended
    with StatCache(cache_dir) as cache:
        digests = cache.digest_many(_items(paths), "ctx")
        assert cache.misses == 0  # every digest, old and appended, is read back
    assert digests == [hashlib.sha256(p.read_bytes()).digest() for p in paths]


def test_a_torn_shard_is_rewritten_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statcache, "_SETTLE_NS", 0)
    path = tmp_path / "f"
    path.write_bytes(b"content")
    cache = StatCache(tmp_path / "cache")
    shard = cache.shard_path("ctx")
    assert shard is not None
    shard.parent.mkdir(parents=True)
    shard.write_bytes(statcache._MAGIC + b"torn record")
    with cache:
        cache.digest_many(_items([path]), "ctx")
    assert shard.stat().st_size == len(statcache._MAGIC) + statcache._RECORD.size
    assert StatCache(tmp_path / "cache").size("ctx") == 1


def test_a_loaded_digest_noted_plain_is_appended_and_read_back_plain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statcache, "_SETTLE_NS", 0)
    paths = [tmp_path / "a", tmp_path / "b"]
    for path in paths:
        path.write_bytes(path.name.encode())
    items = _items(paths)
    with StatCache(tmp_path / "cache") as cache:
        cache.digest_many(items, "ctx")
    with StatCache(tmp_path / "cache") as cache:
        assert not cache.plain(items[0][1], "ctx")
        cache.note_plain(items[0][1], "ctx")
        assert cache.plain(items[0][1], "ctx") and not cache.plain(items[1][1], "ctx")
    again = StatCache(tmp_path / "cache")
    assert again.plain(items[0][1], "ctx") and not again.plain(items[1][1], "ctx")
    assert again.known(items[0][1], "ctx") == hashlib.sha256(b"a").digest()


def test_one_process_saves_again_what_it_hashed_after_a_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived process (the API, a test session) builds, saves, builds more."""
    monkeypatch.setattr(statcache, "_SETTLE_NS", 0)
    paths = [tmp_path / f"f{i}" for i in range(3)]
    for path in paths:
        path.write_bytes(path.name.encode())
    cache = StatCache(tmp_path / "cache")
    cache.digest_many(_items(paths[:2]), "ctx")
    cache.save()
    cache.digest_many(_items(paths[2:]), "ctx")
    cache.save()
    fresh = StatCache(tmp_path / "cache")
    digests = fresh.digest_many(_items(paths), "ctx")
    assert digests == [hashlib.sha256(p.name.encode()).digest() for p in paths]
    assert fresh.misses == 0


def test_a_context_hashed_in_batches_reports_one_count_to_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller digesting a big context a batch at a time (bounded memory) shows one line."""
    monkeypatch.setattr(statcache, "_PROGRESS_FROM", 10)
    monkeypatch.setattr(statcache, "_PROGRESS_EVERY", 0.0)
    monkeypatch.setattr(statcache, "_SETTLE_NS", 0)  # the files just written count as settled
    paths = []
    for i in range(30):
        path = tmp_path / f"f{i:02d}"
        path.write_bytes(b"b" * i)
        paths.append(path)
    cache = StatCache(None)
    cache.digest_many(_items(paths[:5]), scope="context")  # known before: not hashed again
    reports: list[tuple[int, int, int]] = []
    cache.progress = lambda done, total, nbytes: reports.append((done, total, nbytes))
    with cache.hashing(30):
        for start in range(0, 30, 10):
            cache.digest_many(_items(paths[start : start + 10]), scope="context")
    assert {total for _, total, _ in reports[:-1]} == {30}  # one count across the batches
    assert reports[-1] == (25, 25, sum(range(5, 30)))  # ends at what was hashed
    assert [r[0] for r in reports] == sorted(r[0] for r in reports)
