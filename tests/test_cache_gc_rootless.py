"""`lamina cache gc` frees what rootless builds leave: files only the user namespace may touch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina import api
from lamina.engine.sandbox.idmap import IdMode, detect_ids


def _unpacked(cache: Path) -> list[str]:
    return sorted(name for name in os.listdir(cache / "unpacked") if not name.startswith("."))


@pytest.mark.sandbox
def test_gc_removes_unpacked_layers_with_private_files(tmp_path: Path, busybox_image: Path) -> None:
    cache = tmp_path / "cache"
    api.load(busybox_image, cache_dir=cache)
    # A directory the build makes unwritable (and, with subordinate ids, owned
    # by a container user the caller is not): only a remover inside the user
    # namespace can empty it.
    chown = "chown -R 1000:1000 /p && " if detect_ids().mode is not IdMode.SINGLE else ""
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM lamina-test/busybox:1.35\n"
        f"RUN mkdir -p /p/q && echo secret > /p/q/f && chmod 600 /p/q/f && {chown}chmod 500 /p/q /p\n"
    )
    api.build(context, cache_dir=cache, tags=["private:1"])
    built = set(_unpacked(cache))
    assert built, "the RUN step left an unpacked layer"

    api.rmi("private:1", cache_dir=cache)
    api.rmi("lamina-test/busybox:1.35", cache_dir=cache)
    report = api.cache_gc(older_than=0, cache_dir=cache)

    assert _unpacked(cache) == []
    assert report.unpacked_removed >= len(built)
