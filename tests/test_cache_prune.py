"""`lamina cache prune` (and its old name `cache gc`) against a real store, one option at a time.

Two builds share the busybox base: OLD (made, then aged two days in the
index) and NEW (made just now). Each adds one COPY layer of incompressible
bytes, so what a prune frees shows in `cache du`.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamina import api
from lamina.cli import cli
from tests.support.build import BASE, build, make_cache, write_context

DAY = 86400
LAYER_BYTES = 300_000


def _context(root: Path, name: str) -> Path:
    return write_context(
        root / name,
        f"FROM {BASE}\nCOPY data.bin /data.bin\n",
        {"data.bin": os.urandom(LAYER_BYTES)},
    )


def _age(cache: Path, seconds: float) -> None:
    """Make every build result and unpacked layer look unused for `seconds`."""
    db = sqlite3.connect(cache / "index.db")
    try:
        with db:
            db.execute("UPDATE cache SET last_used = ?", (time.time() - seconds,))
            db.execute("UPDATE unpacked SET last_used = ?", (time.time() - seconds,))
    finally:
        db.close()


def _unpacked(cache: Path) -> set[str]:
    return {name for name in os.listdir(cache / "unpacked") if not name.startswith(".")}


@dataclasses.dataclass(frozen=True)
class Built:
    cache: Path
    old: Path  # the context built two days ago (as the index says)
    new: Path  # the context built just now
    old_dirs: set[str]  # the unpacked layer each made
    new_dirs: set[str]
    base: set[str]  # the base image's unpacked layer


@pytest.fixture
def store(tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch) -> Built:
    cache = make_cache(tmp_path, busybox_image)
    monkeypatch.setenv("LAMINA_CACHE", str(cache))
    old, new = _context(tmp_path, "old"), _context(tmp_path, "new")
    build(cache, write_context(tmp_path / "base", f"FROM {BASE}\n"))
    base = _unpacked(cache)  # the FROM image's layer, unpacked
    build(cache, old)
    old_dirs = _unpacked(cache) - base
    _age(cache, 2 * DAY)
    build(cache, new)
    new_dirs = _unpacked(cache) - base - old_dirs
    assert len(old_dirs) == len(new_dirs) == 1 and len(base) == 1
    return Built(cache, old, new, old_dirs, new_dirs, base)


def prune(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["cache", *args])
    return result.exit_code, result.output


def cached(cache: Path, context: Path) -> bool:
    """Whether the context's COPY step hits the cache."""
    return build(cache, context).steps[-1].cached


def test_prune_without_options_keeps_what_builds_use(store: Built) -> None:
    cache = store.cache
    code, out = prune("prune")
    assert code == 0, out
    assert out.startswith("removed ") and " 0 unpacked layers, 0 build results; freed " in out
    assert _unpacked(cache) >= store.old_dirs | store.new_dirs | store.base
    assert cached(cache, store.old) and cached(cache, store.new)


def test_filter_until_drops_results_unused_for_that_long(store: Built) -> None:
    cache = store.cache
    code, out = prune("prune", "--filter", "until=24h")
    assert code == 0, out
    assert "0 build results" not in out
    assert _unpacked(cache) == store.new_dirs | store.base  # a named image's: it stays without --all
    assert cached(cache, store.new)
    assert not cached(cache, store.old)


def test_filter_until_spares_what_was_used_since(store: Built) -> None:
    cache = store.cache
    code, out = prune("prune", "--filter", "until=72h", "-f")
    assert code == 0, out
    assert _unpacked(cache) == store.old_dirs | store.new_dirs | store.base
    assert cached(cache, store.old) and cached(cache, store.new)


def test_all_drops_every_build_result_and_unpacked_layer(store: Built) -> None:
    cache = store.cache
    code, out = prune("prune", "--all", "--force")
    assert code == 0, out
    assert _unpacked(cache) == set()
    assert [record.name for record in api.images(cache_dir=cache)] == [f"docker.io/{BASE}"]
    usage = api.cache_du(cache_dir=cache)
    assert usage.blob_count == 3  # the named image's manifest, config and layer
    assert not cached(cache, store.new)  # and the base is unpacked again
    assert cached(cache, store.new)


def test_all_with_until_spares_the_recent(store: Built) -> None:
    cache = store.cache
    code, out = prune("prune", "-a", "--filter", "until=1d")
    assert code == 0, out
    assert _unpacked(cache) == store.new_dirs | store.base  # the base was used by the new build
    assert cached(cache, store.new)


def test_keep_storage_drops_least_recently_used_first(store: Built) -> None:
    cache = store.cache
    total = api.cache_du(cache_dir=cache).total
    code, out = prune("prune", "--keep-storage", str(total - LAYER_BYTES))
    assert code == 0, out
    assert api.cache_du(cache_dir=cache).total <= total - LAYER_BYTES
    assert "; the cache now takes " in out and "named images" not in out
    assert _unpacked(cache) == store.new_dirs | store.base
    assert cached(cache, store.new)


def test_keep_storage_zero_leaves_named_images(store: Built) -> None:
    cache = store.cache
    code, out = prune("prune", "--keep-storage", "0B")
    assert code == 0, out
    assert out.rstrip().endswith("(the rest is named images: `lamina rmi` them to go lower)")
    assert _unpacked(cache) == set()
    assert api.cache_du(cache_dir=cache).blob_count == 3


def _check_memos(cache: Path) -> int:
    """What the build checks remember (one per Dockerfile and its inputs): index entries, and
    files under checks/ where lamina once kept them."""
    db = sqlite3.connect(cache / "index.db")
    try:
        rows = db.execute("SELECT COUNT(*) FROM cache WHERE key LIKE 'build-checks:%'").fetchone()[0]
    finally:
        db.close()
    return int(rows) + (len(os.listdir(cache / "checks")) if (cache / "checks").is_dir() else 0)


def test_build_check_memos_are_pruned_like_build_results(store: Built) -> None:
    # One per Dockerfile ever built: without pruning they only grow.
    cache = store.cache
    assert _check_memos(cache) == 3  # the base's and OLD's (aged two days), NEW's (used since)
    code, out = prune("prune", "--filter", "until=24h")
    assert code == 0, out
    assert _check_memos(cache) == 1
    code, out = prune("prune", "--all")
    assert code == 0, out
    assert _check_memos(cache) == 0


def test_keep_storage_drops_build_check_memos(store: Built) -> None:
    code, out = prune("prune", "--keep-storage", "0B")
    assert code == 0, out
    assert _check_memos(store.cache) == 0


def test_prune_removes_the_old_check_memo_files(store: Built) -> None:
    # lamina once kept them as files under checks/, which nothing pruned.
    (store.cache / "checks").mkdir()
    (store.cache / "checks" / f"{'0' * 64}.json").write_text('{"warnings": [], "error": false, "bases": {}}')
    code, out = prune("prune")
    assert code == 0, out
    assert not (store.cache / "checks").exists()


def test_keep_storage_above_the_size_removes_nothing_used(store: Built) -> None:
    cache = store.cache
    code, out = prune("prune", "--keep-storage", "5GB")
    assert code == 0, out
    assert _unpacked(cache) == store.old_dirs | store.new_dirs | store.base


def test_gc_is_the_same_command(store: Built) -> None:
    cache = store.cache
    code, out = prune("gc", "--older-than", "1")
    assert code == 0, out
    assert _unpacked(cache) == store.new_dirs | store.base
    code, out = prune("gc", "--older-than", "1", "--filter", "until=1h")
    assert code == 2 and out.startswith("error: ") and out.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--filter", "label=a"], "'label=a': lamina's cache filters only on until=DURATION"),
        (["--filter", "until"], "'until': lamina's cache filters only on until=DURATION"),
        (["--filter", "until=yesterday"], "until=yesterday: not a duration"),
        (["--filter", "until=24"], "until=24: not a duration"),
        (["--keep-storage", "lots"], "'lots': not a size"),
        (["--keep-storage", "5XB"], "'5XB': not a size"),
    ],
)
def test_bad_options_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.setenv("LAMINA_CACHE", str(tmp_path / "cache"))
    code, out = prune("prune", *args)
    assert code == 2
    assert out.startswith("error: ") and out.count("\n") == 1
    assert message in out


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("512MB", 512 * 10**6), ("5GB", 5 * 10**9), ("5gb", 5 * 10**9), ("2GiB", 2 * 2**30),
     ("1.5kB", 1500), ("10 MiB", 10 * 2**20), ("7b", 7)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    from lamina.cli import _parse_size

    assert _parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400), ("30m", 1800), ("1h30m", 5400), ("7d", 7 * 86400), ("90s", 90), ("1.5h", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    from lamina.cli import _prune_until

    assert _prune_until([f"until={text}"]) == seconds
