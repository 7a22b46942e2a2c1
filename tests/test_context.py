"""The build context: ignore-aware walks, scoped paths, and the persistent stat cache."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from lamina.cache.statcache import DIR_NAME, StatCache
from lamina.engine import context as context_module
from lamina.engine.buildfiles import default_dockerfile
from lamina.engine.context import SourceTree, open_build_context, open_rootfs
from lamina.errors import ContextError
from lamina.oci.entry import EntryType


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _settle(root: Path) -> None:
    """Wait until files just written under `root` are old enough for the stat cache to keep."""
    time.sleep(0.15)


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    _write(
        root,
        {
            "app/main.py": "print()\n",
            "app/util.py": "x = 1\n",
            "build/out.o": "obj",
            "build/keep.txt": "kept",
            "node_modules/pkg/index.js": "js",
            "README.md": "readme",
        },
    )
    return root


def _paths(tree: SourceTree, rel: str = "") -> list[str]:
    return [e.path for e in tree.walk(rel)]


def test_walk_lists_everything_sorted_without_ignore_file(ctx: Path) -> None:
    tree = open_build_context(ctx, StatCache(None))
    assert _paths(tree) == [
        "README.md",
        "app",
        "app/main.py",
        "app/util.py",
        "build",
        "build/keep.txt",
        "build/out.o",
        "node_modules",
        "node_modules/pkg",
        "node_modules/pkg/index.js",
    ]


def test_walk_honours_dockerignore_and_reincludes_exceptions(ctx: Path) -> None:
    (ctx / ".dockerignore").write_text("node_modules\nbuild\n!build/keep.txt\n*.md\n.dockerignore\n")
    tree = open_build_context(ctx, StatCache(None))
    # build/ is excluded but listed, since an exception keeps something inside it.
    assert _paths(tree) == ["app", "app/main.py", "app/util.py", "build", "build/keep.txt"]
    assert tree.entry("build/out.o") is None
    assert tree.entry("build") is not None
    assert tree.entry("node_modules") is None


def test_pruned_directory_is_never_read(ctx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (ctx / ".dockerignore").write_text("node_modules\n")
    tree = open_build_context(ctx, StatCache(None))
    opened: list[str] = []
    real_scandir = os.scandir

    def spying_scandir(path: str) -> os.ScandirIterator[str]:  # type: ignore[type-var]
        opened.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(context_module.os, "scandir", spying_scandir)
    list(tree.walk())
    assert not any("node_modules" in p for p in opened)


def test_named_dockerfile_ignore_file_wins(ctx: Path, tmp_path: Path) -> None:
    (ctx / ".dockerignore").write_text("app\n")
    dockerfile = tmp_path / "app.Dockerfile"
    dockerfile.write_text("FROM scratch\n")
    (tmp_path / "app.Dockerfile.dockerignore").write_text("build\n")
    tree = open_build_context(ctx, StatCache(None), dockerfile=dockerfile)
    paths = _paths(tree)
    assert "app/main.py" in paths
    assert "build" not in paths


def test_default_dockerfile_ignore_file_wins(ctx: Path) -> None:
    """BuildKit's testDockerignoreOverride: Dockerfile.dockerignore beside the default Dockerfile."""
    (ctx / ".dockerignore").write_text("app\n")
    (ctx / "Dockerfile.dockerignore").write_text("build\n")
    for dockerfile in (None, ctx / "Dockerfile"):
        paths = _paths(open_build_context(ctx, StatCache(None), dockerfile=dockerfile))
        assert "app/main.py" in paths and "build" not in paths


def test_unix_socket_is_an_empty_regular_file(tmp_path: Path) -> None:
    """BuildKit's testCopySocket: a socket in the context is copied as an empty regular file."""
    import socket

    root = tmp_path / "ctx"
    root.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "s.sock"))
    os.chmod(root / "s.sock", 0o600)
    tree = open_build_context(root, StatCache(None))
    (entry,) = list(tree.walk())
    assert (entry.type, entry.size, entry.mode, entry.socket) == (EntryType.FILE, 0, 0o600, True)
    assert tree.file_digests([entry]) == {"s.sock": hashlib.sha256(b"").digest()}
    assert tree.checksum() == tree.checksum()  # content is never read


def test_lowercase_dockerfile_fallback(tmp_path: Path) -> None:
    """BuildKit's testDockerfileLowercase: `dockerfile` when there is no `Dockerfile`."""
    assert default_dockerfile(tmp_path) == tmp_path / "Dockerfile"
    (tmp_path / "dockerfile").write_text("FROM scratch\n")
    assert default_dockerfile(tmp_path) == tmp_path / "dockerfile"
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    assert default_dockerfile(tmp_path) == tmp_path / "Dockerfile"


def test_context_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ContextError, match="not a directory"):
        open_build_context(tmp_path / "missing", StatCache(None))


def test_invalid_ignore_file_names_the_file(ctx: Path) -> None:
    (ctx / ".dockerignore").write_text("ok\n[\n")
    with pytest.raises(Exception, match=r"\.dockerignore:2"):
        open_build_context(ctx, StatCache(None))


def test_ignore_file_that_is_a_directory_is_an_error(ctx: Path) -> None:
    (ctx / ".dockerignore").mkdir()
    with pytest.raises(ContextError, match=r"\.dockerignore: is a directory, not an ignore file"):
        open_build_context(ctx, StatCache(None))


def test_dotdot_out_of_context_is_refused(ctx: Path) -> None:
    tree = open_build_context(ctx, StatCache(None))
    with pytest.raises(ContextError, match=r"\.\./etc/passwd: path is outside of the build context"):
        tree.resolve("../etc/passwd")
    assert tree.resolve("app/../README.md") == "README.md"


def test_symlink_out_of_context_is_refused(ctx: Path) -> None:
    (ctx / "abs").symlink_to("/etc")
    (ctx / "app" / "up").symlink_to("../../outside")
    tree = open_build_context(ctx, StatCache(None))
    with pytest.raises(ContextError, match="abs -> /etc points outside of the build context"):
        tree.resolve("abs/passwd")
    with pytest.raises(ContextError, match="app/up"):
        tree.resolve("app/up")


def test_a_context_given_as_a_symlink_is_the_directory_it_names(ctx: Path, tmp_path: Path) -> None:
    from lamina.engine.steps.copyadd.selection import CopyOptions, select_sources

    link = tmp_path / "link"
    link.symlink_to(ctx)
    tree = open_build_context(link, StatCache(None))
    items = list(select_sources(tree, ["."], "/ctx/", CopyOptions()).items)
    assert [i.dest for i in items] == [
        f"ctx/{e.path}" for e in open_build_context(ctx, StatCache(None)).walk()
    ]
    assert EntryType.SYMLINK not in {i.entry.type for i in items if i.dest == "ctx"}


def test_symlink_inside_context_resolves(ctx: Path) -> None:
    (ctx / "link").symlink_to("app")
    (ctx / "app" / "self").symlink_to("../README.md")
    tree = open_build_context(ctx, StatCache(None))
    assert tree.resolve("link/main.py") == "app/main.py"
    assert tree.resolve("app/self") == "README.md"
    assert tree.resolve("app/self", follow_last=False) == "app/self"


def test_symlink_loop_is_an_error(ctx: Path) -> None:
    (ctx / "a").symlink_to("b")
    (ctx / "b").symlink_to("a")
    with pytest.raises(ContextError, match="too many levels"):
        open_build_context(ctx, StatCache(None)).resolve("a")


def test_rootfs_resolves_absolute_symlinks_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    _write(root, {"bin/busybox": "bb"})
    (root / "usr").mkdir()
    (root / "usr" / "bin").symlink_to("/bin")
    (root / "escape").symlink_to("../../../../bin")
    tree = open_rootfs(root, StatCache(None))
    assert tree.resolve("usr/bin/busybox") == "bin/busybox"
    assert tree.resolve("escape/busybox") == "bin/busybox"  # `..` stops at the root, like chroot


def test_walk_lists_symlinks_without_following(ctx: Path) -> None:
    (ctx / "app" / "loop").symlink_to("..")
    tree = open_build_context(ctx, StatCache(None))
    entries = {e.path: e for e in tree.walk("app")}
    assert entries["app/loop"].type is EntryType.SYMLINK
    assert entries["app/loop"].linkname == ".."
    assert "app/loop/app" not in entries


def test_noop_rewalk_reads_no_file(ctx: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _settle(ctx)
    with StatCache(cache_dir) as cache:
        first = open_build_context(ctx, cache).checksum()
        assert cache.misses == 6 and cache.hits == 0
    assert len(list((cache_dir / DIR_NAME).glob("*.bin"))) == 1
    with StatCache(cache_dir) as cache:  # a new process: loads the persisted digests
        again = open_build_context(ctx, cache).checksum()
        assert (cache.misses, cache.hits) == (0, 6)
    assert again == first


def test_touch_rehashes_but_keeps_the_digest(ctx: Path, tmp_path: Path) -> None:
    _settle(ctx)
    with StatCache(tmp_path / "cache") as cache:
        first = open_build_context(ctx, cache).checksum()
    os.utime(ctx / "README.md", (1, 1))
    with StatCache(tmp_path / "cache") as cache:
        assert open_build_context(ctx, cache).checksum() == first
        assert cache.misses == 1


def test_content_change_with_restored_mtime_is_seen(ctx: Path, tmp_path: Path) -> None:
    _settle(ctx)
    target = ctx / "app" / "util.py"
    before = target.stat()
    with StatCache(tmp_path / "cache") as cache:
        first = open_build_context(ctx, cache).checksum()
    target.write_text("x = 2\n")  # same size
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back; ctime cannot be
    with StatCache(tmp_path / "cache") as cache:
        assert open_build_context(ctx, cache).checksum() != first


def test_fresh_files_are_not_persisted(tmp_path: Path) -> None:
    # Written just now: a second write in the same timestamp tick would be invisible.
    _write(tmp_path / "ctx", {"new": "data"})
    with StatCache(tmp_path / "cache") as cache:
        open_build_context(tmp_path / "ctx", cache).checksum()
    assert StatCache(tmp_path / "cache").size(os.path.realpath(tmp_path / "ctx")) == 0


def test_checksum_ignores_mtime_but_sees_mode(ctx: Path) -> None:
    tree = open_build_context(ctx, StatCache(None))
    first = tree.checksum()
    os.utime(ctx / "app" / "main.py", (5, 5))
    assert tree.checksum() == first
    os.chmod(ctx / "app" / "main.py", 0o755)
    assert tree.checksum() != first


def test_statcache_survives_a_torn_or_foreign_file(tmp_path: Path) -> None:
    _write(tmp_path / "ctx", {"f": "x"})
    scope = os.path.realpath(tmp_path / "ctx")
    shard = StatCache(tmp_path).shard_path(scope)
    assert shard is not None
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"garbage")
    assert StatCache(tmp_path).size(scope) == 0
    _settle(tmp_path)
    with StatCache(tmp_path) as cache:
        open_build_context(tmp_path / "ctx", cache).checksum()
    shard.write_bytes(shard.read_bytes() + b"\x01\x02")  # a torn tail record
    assert StatCache(tmp_path).size(scope) == 1


def test_two_writers_merge_their_entries(tmp_path: Path) -> None:
    _write(tmp_path / "ctx", {"one": "1", "two": "2"})
    _settle(tmp_path)
    first, second = StatCache(tmp_path / "cache"), StatCache(tmp_path / "cache")
    context = tmp_path / "ctx"
    tree_one, tree_two = open_build_context(context, first), open_build_context(context, second)
    tree_one.file_digests([e for e in tree_one.walk() if e.path == "one"])
    tree_two.file_digests([e for e in tree_two.walk() if e.path == "two"])
    first.save()
    second.save()
    assert StatCache(tmp_path / "cache").size(os.path.realpath(context)) == 2


def test_rootfs_digests_are_not_persisted(tmp_path: Path) -> None:
    _write(tmp_path / "rootfs", {"bin/sh": "sh"})
    _settle(tmp_path)
    with StatCache(tmp_path / "cache") as cache:
        open_rootfs(tmp_path / "rootfs", cache).checksum()
    assert not (tmp_path / "cache" / DIR_NAME).exists()


@pytest.mark.unprivileged
def test_unreadable_directory_is_a_context_error(ctx: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any directory; tests/test_unprivileged.py runs this as a user")
    os.chmod(ctx / "app", 0)
    try:
        with pytest.raises(ContextError, match="app: cannot read directory"):
            list(open_build_context(ctx, StatCache(None)).walk())
    finally:
        os.chmod(ctx / "app", 0o755)


def test_stale_entries_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lamina.cache import statcache

    monkeypatch.setattr(statcache, "_SLACK", 0)
    context = tmp_path / "ctx"
    _write(context, {name: name for name in "abcdef"})
    _settle(context)
    with StatCache(tmp_path / "cache") as cache:
        open_build_context(context, cache).checksum()
    for name in "bcdef":
        (context / name).unlink()
    _write(context, {"g": "g"})
    _settle(context)
    with StatCache(tmp_path / "cache") as cache:
        open_build_context(context, cache).checksum()
    assert StatCache(tmp_path / "cache").size(os.path.realpath(context)) == 2


def test_a_file_swapped_for_a_fifo_is_not_read(ctx: Path) -> None:
    tree = open_build_context(ctx, StatCache(None))
    entries = [e for e in tree.walk() if e.path == "README.md"]
    (ctx / "README.md").unlink()
    os.mkfifo(ctx / "README.md")  # opening it for reading would block forever
    with pytest.raises(ContextError, match=r"^README\.md: cannot read: not a regular file$"):
        tree.file_digests(entries)


def test_an_xattr_added_to_a_file_known_plain_is_keyed(
    ctx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file noted as carrying no xattrs costs no listxattr on a rebuild, and setting one
    (which moves the ctime, hence the identity) is seen: the COPY's key changes."""
    from lamina.engine.steps.copyadd.selection import CopyOptions, select_sources, selection_key

    target = ctx / "app" / "util.py"
    _settle(ctx)

    def key(cache: StatCache) -> str:
        tree = open_build_context(ctx, cache)
        return str(selection_key(tree, select_sources(tree, ["app"], "/app/", CopyOptions())))

    with StatCache(tmp_path / "cache") as cache:
        first = key(cache)
    listed: list[str] = []
    real = os.listxattr
    monkeypatch.setattr(os, "listxattr", lambda path, **kw: listed.append(str(path)) or real(path, **kw))
    with StatCache(tmp_path / "cache") as cache:  # a new process
        assert key(cache) == first
    assert not any(path.endswith(".py") for path in listed)  # only directories are listed
    try:
        os.setxattr(target, "user.note", b"x")
    except OSError as err:
        pytest.skip(f"this file system has no user xattrs ({err.strerror})")
    time.sleep(0.15)  # past the stat cache's settle time, as _settle
    with StatCache(tmp_path / "cache") as cache:
        assert key(cache) != first
    assert any(path.endswith("util.py") for path in listed)


def test_bulk_pauses_cycle_collection_and_always_resumes_it() -> None:
    """A big selection is built without cycle collection, which resumes after, also when
    the build fails inside, and only once the last of nested (or concurrent) uses ends."""
    import gc

    from lamina.engine.context import bulk

    assert gc.isenabled()
    with bulk():
        assert not gc.isenabled()
        with bulk():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ContextError), bulk():
        raise ContextError("a failed COPY")
    assert gc.isenabled()
