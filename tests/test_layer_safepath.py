"""safepath: the one door for hostile paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.errors import UnsafePath
from lamina.oci.safepath import Root, clean, follow_links, remove_tree, resolve_in_root, safe_join


@pytest.mark.parametrize(
    ("name", "cleaned"),
    [("a/b", "a/b"), ("./a//b/", "a/b"), (".", ""), ("./", ""), ("a/./b/.", "a/b"), ("..a/b..", "..a/b..")],
)
def test_clean(name: str, cleaned: str) -> None:
    assert clean(name) == cleaned


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/etc/passwd", "absolute"),
        ("../x", r"'\.\.'"),
        ("a/../b", r"'\.\.'"),
        ("a/..", r"'\.\.'"),
        ("a\0b", "NUL"),
    ],
)
def test_clean_refuses(name: str, why: str) -> None:
    with pytest.raises(UnsafePath, match=why):
        clean(name)


def test_safe_join_refuses_symlinked_parents(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("/etc")
    assert safe_join(tmp_path, "real/x") == tmp_path / "real" / "x"
    assert safe_join(tmp_path, "link") == tmp_path / "link"  # the last component is the caller's
    assert safe_join(tmp_path, "missing/a/b") == tmp_path / "missing" / "a" / "b"
    with pytest.raises(UnsafePath, match="link is a symlink"):
        safe_join(tmp_path, "link/passwd")


def test_resolve_in_root_is_a_chroot(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "lib").symlink_to("/usr/lib")  # absolute: from the root, not the host
    (tmp_path / "up").symlink_to("../../../../etc")  # climbing stops at the root
    (tmp_path / "rel").symlink_to("usr/lib")
    assert resolve_in_root(tmp_path, "/lib/x.so") == tmp_path / "usr" / "lib" / "x.so"
    assert resolve_in_root(tmp_path, "rel/../lib") == tmp_path / "usr" / "lib"
    assert resolve_in_root(tmp_path, "up/passwd") == tmp_path / "etc" / "passwd"
    assert resolve_in_root(tmp_path, "../../x") == tmp_path / "x"


def test_resolve_in_root_stops_loops(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(UnsafePath, match="too many levels"):
        resolve_in_root(tmp_path, "a/x")


def test_follow_links_over_any_tree() -> None:
    # The one walk LayerView, ADD's archive destinations and resolve_in_root share: a tree
    # given only as "what is the link at this path" (here a table; None: not a link).
    links = {"var/run": "/run", "etc/alt": "../usr/share", "last": "var/run"}
    asked: list[str] = []

    def readlink(rel: str) -> str | None:
        asked.append(rel)
        return links.get(rel)

    assert follow_links("/var/run/x", readlink) == "run/x"
    assert follow_links("etc/alt/doc", readlink) == "usr/share/doc"
    assert follow_links("last", readlink) == "run"
    assert follow_links("last", readlink, follow_last=False) == "last"
    assert follow_links("..", readlink) == ""
    asked.clear()
    follow_links("a/b", readlink, follow_last=False)
    assert asked == ["a", "a/b"]  # the last is asked too: a caller learns it is missing


def test_root_open_dir_creates_and_refuses_symlinks(tmp_path: Path) -> None:
    root_dir, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root_dir.mkdir()
    elsewhere.mkdir()
    (root_dir / "link").symlink_to(elsewhere)
    (root_dir / "file").write_bytes(b"")
    old_umask = os.umask(0o077)
    try:
        with Root(root_dir) as root:
            fd = root.open_dir("x/y", create=True)
            assert fd is not None
            os.close(fd)
            assert root.open_dir("nope/z", create=False) is None
            with pytest.raises(UnsafePath, match="link is a symlink"):
                root.open_dir("link/x", create=True)
            with pytest.raises(UnsafePath, match="file is not a directory"):
                root.open_dir("file/x", create=True)
    finally:
        os.umask(old_umask)
    assert (root_dir / "x" / "y").is_dir()
    assert (root_dir / "x").stat().st_mode & 0o777 == 0o755  # not subject to the umask
    assert os.listdir(elsewhere) == []


def test_remove_tree_deeper_than_the_stack(tmp_path: Path) -> None:
    # 1500 levels: shutil.rmtree would hit Python's recursion limit.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"k")
    top = tmp_path / "top"
    depth = 1500
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.mkdir("top", dir_fd=fd)
        for _ in range(depth):
            next_fd = os.open("top" if _ == 0 else "d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
            os.mkdir("d", dir_fd=fd)
            (Path(f"/proc/self/fd/{fd}") / "file").write_bytes(b"x")
            os.symlink(str(outside), "link", dir_fd=fd)
    finally:
        os.close(fd)
    remove_tree(top)
    assert not top.exists()
    assert (outside / "keep").read_bytes() == b"k"
    remove_tree(top)  # already gone: fine
    (tmp_path / "f").write_bytes(b"")
    remove_tree(tmp_path / "f")
    assert not (tmp_path / "f").exists()
