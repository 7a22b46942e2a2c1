"""RUN --mount=type=cache across builds: which directory a mount gets, and when it starts empty.

BuildKit keys a cache mount by its id and the ref it starts from (`from=`, or
the directory it makes for uid=/gid=/mode=), and a RUN that ignores the cache
(--no-cache, --no-cache-filter) prunes its cache ids before the build.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.build import BASE, rootfs, write_context

pytestmark = pytest.mark.sandbox

# A RUN that adds a line to the cache's log and writes how many lines it then has to /OUT.
COUNT = "RUN --mount=type=cache,id={id},target=/c{opts} sh -c 'echo x >> /c/log; wc -l < /c/log > /{out}'\n"


def _lines(out: Path, name: str) -> int:
    return int((out / name).read_text())


def test_no_cache_empties_the_mount_once_for_the_whole_build(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE}\n" + COUNT.format(id="c", opts="", out="one")
    text += COUNT.format(id="c", opts="", out="two")
    ctx = write_context(tmp_path / "ctx", text)
    rootfs(cache, ctx, tmp_path / "a")
    assert (_lines(tmp_path / "a", "one"), _lines(tmp_path / "a", "two")) == (1, 2)
    rootfs(cache, ctx, tmp_path / "b", no_cache=True)
    # Emptied before its first RUN, then shared by the second as in any build.
    assert (_lines(tmp_path / "b", "one"), _lines(tmp_path / "b", "two")) == (1, 2)
    later = f"FROM {BASE}\nRUN echo new\n" + COUNT.format(id="c", opts="", out="three")
    (ctx / "Dockerfile").write_text(later)
    rootfs(cache, ctx, tmp_path / "d")
    assert _lines(tmp_path / "d", "three") == 3, "a build without --no-cache keeps what the last one left"


def test_no_cache_filter_empties_only_the_mounts_of_that_stage(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS one\n" + COUNT.format(id="a", opts="", out="a")
    text += f"FROM {BASE} AS two\n" + COUNT.format(id="b", opts="", out="b")
    text += "FROM scratch\nCOPY --from=one /a /a\nCOPY --from=two /b /b\n"
    ctx = write_context(tmp_path / "ctx", text)
    rootfs(cache, ctx, tmp_path / "first")
    (ctx / "Dockerfile").write_text(text.replace("/c/log;", "/c/log; true;"))  # both RUNs run again
    rootfs(cache, ctx, tmp_path / "second", no_cache_filter=["two"])
    assert (_lines(tmp_path / "second", "a"), _lines(tmp_path / "second", "b")) == (2, 1)


def test_another_mode_is_another_cache(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE}\n" + COUNT.format(id="c", opts=",mode=0700", out="one")
    text += COUNT.format(id="c", opts=",mode=0755", out="two")
    text += COUNT.format(id="c", opts=",mode=0700", out="three")
    out = tmp_path / "out"
    rootfs(cache, write_context(tmp_path / "ctx", text), out)
    assert (_lines(out, "one"), _lines(out, "two"), _lines(out, "three")) == (1, 1, 2)


def test_a_changed_from_stage_seeds_a_new_cache(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS seed\nCOPY src/ /seed/\n\nFROM {BASE}\n"
    text += "RUN --mount=type=cache,id=s,from=seed,source=/seed,target=/c "
    text += "sh -c 'cat /c/a.txt >> /c/log; cat /c/log > /got'\n"
    ctx = write_context(tmp_path / "ctx", text, {"src/a.txt": "old\n"})
    rootfs(cache, ctx, tmp_path / "a")
    assert (tmp_path / "a/got").read_text() == "old\n"
    (ctx / "src/a.txt").write_text("new\n")
    rootfs(cache, ctx, tmp_path / "b")
    assert (tmp_path / "b/got").read_text() == "new\n", "the new seed, not the old cache with its log"


def test_a_read_only_cache_mount_sees_the_cache_and_cannot_write_it(cache: Path, tmp_path: Path) -> None:
    """`ro` (alias of `readonly`), as BuildKit: the same cache directory, mounted read-only."""
    text = f"FROM {BASE}\n" + COUNT.format(id="c", opts="", out="one")
    text += "RUN --mount=type=cache,id=c,target=/c,ro sh -c 'cat /c/log > /seen; "
    text += "{ echo y >> /c/log; } 2> /err || true'\n"
    text += COUNT.format(id="c", opts="", out="two")
    out = tmp_path / "out"
    rootfs(cache, write_context(tmp_path / "ctx", text), out)
    assert (out / "seen").read_text() == "x\n"
    assert "Read-only file system" in (out / "err").read_text()
    assert _lines(out, "two") == 2, "the read-only step added nothing to the cache"


def test_cache_mount_namespace_build_arg_keeps_caches_apart(cache: Path, tmp_path: Path) -> None:
    """BUILDKIT_CACHE_MOUNT_NS puts every cache id under it (BuildKit's NS/ID): another namespace,
    or none, is another cache; the same namespace shares it (was: the build arg refused)."""

    def count(out: str, ns: str | None) -> int:
        # a step before it of its own: the RUN runs every time (no hit), its cache mount kept
        text = f"FROM {BASE}\nRUN echo {out}\n" + COUNT.format(id="c", opts="", out="n")
        args = {"BUILDKIT_CACHE_MOUNT_NS": ns} if ns is not None else {}
        rootfs(cache, write_context(tmp_path / out / "ctx", text), tmp_path / out / "root", build_args=args)
        return _lines(tmp_path / out / "root", "n")

    assert count("a1", "a") == 1
    assert count("none", None) == 1
    assert count("b", "b") == 1
    assert count("a2", "a") == 2


def test_no_cache_leaves_no_files_behind_and_keeps_the_lock(cache: Path, tmp_path: Path) -> None:
    # mode= makes a ref'd directory (ID-REF) with its lock file ID-REF.lock beside it.
    ctx = write_context(
        tmp_path / "ctx", f"FROM {BASE}\n" + COUNT.format(id="c", opts=",mode=0700", out="one")
    )
    rootfs(cache, ctx, tmp_path / "a")
    mounts = cache / "cachemounts"
    locks = sorted(p.name for p in mounts.glob("*.lock"))
    for run in ("b", "c"):
        rootfs(cache, ctx, tmp_path / run, no_cache=True)
        assert _lines(tmp_path / run, "one") == 1
    assert not list(mounts.glob(".pruned-*")), "a pruned cache is removed, not left under another name"
    assert sorted(p.name for p in mounts.glob("*.lock")) == locks, "the lock a concurrent build holds stays"
