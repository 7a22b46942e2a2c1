"""Reading a stage through its overlay-form layer dirs: whiteouts, opaque dirs, symlinks, owners."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.engine.steps.layerview import LayerView, materialize
from lamina.engine.steps.users import resolve_owner
from lamina.errors import BuildError


def whiteout(path: Path) -> None:
    os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))


@pytest.fixture
def stack(tmp_path: Path) -> list[Path]:
    if os.geteuid() != 0:
        pytest.skip("whiteout devices need root to create outside a user namespace")
    low, mid, top = tmp_path / "low", tmp_path / "mid", tmp_path / "top"
    (low / "etc").mkdir(parents=True)
    (low / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n")
    (low / "etc/group").write_text("root:x:0:\nstaff:x:50:\n")
    (low / "data/old").mkdir(parents=True)
    (low / "data/old/file").write_text("old")
    (low / "gone.txt").write_text("x")
    (low / "real").mkdir()
    (low / "real/inside.txt").write_text("via link")
    os.symlink("/real", low / "link")
    mid.mkdir()
    whiteout(mid / "gone.txt")
    (mid / "data").mkdir()
    os.setxattr(mid / "data", "user.overlay.opaque", b"y")
    (mid / "data/new").write_text("new")
    top.mkdir()
    (top / "etc").mkdir()
    (top / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nweb:x:33:33::/var/www:/bin/sh\n")
    return [low, mid, top]


def test_whiteout_hides_lower_file(stack: list[Path]) -> None:
    view = LayerView(stack)
    assert view.stat("/gone.txt") is None
    assert view.stat("/etc/group") is not None


def test_opaque_dir_hides_lower_contents(stack: list[Path], tmp_path: Path) -> None:
    view = LayerView(stack)
    assert view.stat("/data/old/file") is None
    assert view.read_text("/data/new") == "new"
    dest = tmp_path / "view"
    materialize(view, ["/data"], dest)
    assert sorted(p.name for p in (dest / "data").iterdir()) == ["new"]


def test_symlink_resolves_inside_the_view(stack: list[Path], tmp_path: Path) -> None:
    view = LayerView(stack)
    assert view.resolve("/link/inside.txt") == "/real/inside.txt"
    dest = tmp_path / "view"
    materialize(view, ["/link/inside.txt"], dest)
    assert os.readlink(dest / "link") == "/real"
    assert (dest / "real/inside.txt").read_text() == "via link"


def test_missing_dirs_for_workdir(stack: list[Path]) -> None:
    view = LayerView(stack)
    assert view.missing_dirs("/real/a/b") == ["/real/a", "/real/a/b"]
    assert view.missing_dirs("/etc") == []


def test_chown_names_resolve_in_the_top_passwd(stack: list[Path]) -> None:
    view = LayerView(stack)
    assert resolve_owner(view, "web") == (33, 33)
    assert resolve_owner(view, "web:staff") == (33, 50)
    assert resolve_owner(view, "1234:99") == (1234, 99)
    with pytest.raises(BuildError, match="unable to find user app"):
        resolve_owner(view, "app")  # shadowed by the top layer's passwd
    with pytest.raises(BuildError, match="unable to find group nogroup"):
        resolve_owner(view, "web:nogroup")
