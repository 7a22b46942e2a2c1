"""The bytes a COPY keeps for the layer writer (lamina.oci.fresh) last one build: two builds
in one process (the Python API) never share them, whatever inode the second one reuses."""

from __future__ import annotations

from pathlib import Path

from lamina import api
from lamina.oci import fresh
from tests.support.build import BASE, build, make_cache, write_context


def _copied(cache: Path) -> list[Path]:
    return [p for p in (cache / "unpacked").glob("*/f") if p.is_file()]


def test_what_a_copy_kept_is_gone_when_its_build_ends(tmp_path: Path, busybox_image: Path) -> None:
    cache = make_cache(tmp_path, busybox_image)
    # stage a's layer is never written as a tar (only copied from): its kept bytes stay unused
    dockerfile = f"FROM {BASE} AS a\nCOPY f /f\nFROM {BASE}\nCOPY --from=a /f /g\n"
    ctx = write_context(tmp_path / "ctx", dockerfile, {"f": "first\n"})
    build(cache, ctx)
    copied = _copied(cache)
    assert copied
    # the inode a later build may get again, with the same size and (coarse) times
    assert all(fresh.opener(str(p), p.lstat()) is None for p in copied)

    api.cache_prune(all=True, cache_dir=cache)  # the layer dirs go: their inodes are free
    (ctx / "f").write_text("other\n")  # same size
    result = build(cache, ctx, outputs=[f"type=local,dest={tmp_path / 'out'}"])
    assert (tmp_path / "out" / "g").read_text() == "other\n", result
