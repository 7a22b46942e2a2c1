"""Records derived from builds and kept under the store (COPY's records of what it wrote,
per-directory key records, the stat cache): `cache du` counts them, `cache prune` removes
the COPY records of layer dirs that went, and `cache prune -a` removes them all."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamina import api
from lamina.cache import statcache
from lamina.cache.store import DERIVED_DIRS
from lamina.cli import cli
from lamina.engine.steps.copyadd import dirkeys, priorcopy
from tests.support.build import BASE, build, make_cache, write_context


def test_the_store_knows_every_directory_of_derived_records() -> None:
    # the store cannot import them (engine -> cache), so the names are checked here
    assert set(DERIVED_DIRS) == {priorcopy.DIR_NAME, dirkeys.DIR_NAME, statcache.DIR_NAME}


def _files(cache: Path, name: str) -> list[str]:
    directory = cache / name
    return sorted(os.listdir(directory)) if directory.is_dir() else []


@pytest.fixture
def cache(tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = make_cache(tmp_path, busybox_image)
    monkeypatch.setenv("LAMINA_CACHE", str(cache))
    files = {f"d/f{i:03}.txt": f"file {i}\n" for i in range(300)}
    context = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY d /d/\n", files)
    # The stat cache keeps a digest only once its file's ctime is _SETTLE_NS old ("racy git").
    time.sleep(statcache._SETTLE_NS / 1e9 + 0.05)
    build(cache, context)
    for name in DERIVED_DIRS:
        assert _files(cache, name), f"the build kept no {name}/ records"
    return cache


def test_du_counts_the_derived_records(cache: Path) -> None:
    usage = api.cache_du()
    on_disk = [os.lstat(cache / d / f).st_size for d in DERIVED_DIRS for f in _files(cache, d)]
    assert (usage.derived, usage.derived_count) == (sum(on_disk), len(on_disk))
    assert usage.total == usage.blobs + usage.unpacked + usage.index + usage.derived
    out = CliRunner().invoke(cli, ["cache", "du"]).output
    assert f"({len(on_disk)} files: COPY, stat cache)" in out


def test_prune_removes_the_copy_records_of_layer_dirs_that_went(cache: Path) -> None:
    kept = _files(cache, "copies")
    orphan = cache / "copies" / f"{'0' * 32}-{'f' * 64}.bin"  # a layer dir not in unpacked/
    orphan.write_bytes(b"x" * 100)
    result = CliRunner().invoke(cli, ["cache", "prune"])
    assert result.exit_code == 0, result.output
    assert _files(cache, "copies") == kept  # the build's layer dir is still there: its record stays
    assert _files(cache, "dirkeys") and _files(cache, "statcache")


def test_prune_all_removes_every_derived_record(cache: Path) -> None:
    result = CliRunner().invoke(cli, ["cache", "prune", "-a"])
    assert result.exit_code == 0, result.output
    for name in DERIVED_DIRS:
        assert _files(cache, name) == [], name
    assert api.cache_du().derived == 0
