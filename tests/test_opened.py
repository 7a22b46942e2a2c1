"""lamina.oci.opened: a rootless build reads the directories and files it owns that shut it out.

As root these are no-ops (root reads them as they are): tests/test_unprivileged.py
runs this file as its unprivileged users. The conformance cases chmod_non_octal
and step_names build through it (COPY --from, layer write, type=local export).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from lamina.oci.opened import opened, true_stat

pytestmark = pytest.mark.unprivileged


def _shut_tree(root: Path) -> Path:
    """root/shut (0124, as `RUN chmod 124 dir`) holding inner (0644) holding file f (0124)."""
    shut = root / "shut"
    (shut / "inner").mkdir(parents=True)
    (shut / "inner" / "f").write_text("data")
    os.chmod(shut / "inner" / "f", 0o124)
    os.chmod(shut / "inner", 0o644)
    os.chmod(shut, 0o124)
    return shut


def _as_user() -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any directory; tests/test_unprivileged.py runs this as a user")


def test_shut_tree_is_read_with_its_true_modes(tmp_path: Path) -> None:
    _as_user()
    shut = _shut_tree(tmp_path)
    with pytest.raises(PermissionError):
        os.listdir(shut)
    with opened([tmp_path]):
        assert os.listdir(shut) == ["inner"]
        assert (shut / "inner" / "f").read_text() == "data"
        assert stat.S_IMODE(true_stat(os.lstat(shut)).st_mode) == 0o124
        assert stat.S_IMODE(true_stat(os.lstat(shut / "inner")).st_mode) == 0o644
        assert stat.S_IMODE(true_stat(os.lstat(shut / "inner" / "f")).st_mode) == 0o124
    assert stat.S_IMODE(os.lstat(shut).st_mode) == 0o124  # given back, the inner ones too
    os.chmod(shut, 0o755)
    assert stat.S_IMODE(os.lstat(shut / "inner").st_mode) == 0o644
    os.chmod(shut / "inner", 0o755)
    assert stat.S_IMODE(os.lstat(shut / "inner" / "f").st_mode) == 0o124


def test_grant_lasts_until_the_last_reader_is_done(tmp_path: Path) -> None:
    _as_user()
    shut = _shut_tree(tmp_path)
    inside, leave = threading.Event(), threading.Event()

    def other_reader() -> None:
        with opened([shut]):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other_reader)
    thread.start()
    try:
        assert inside.wait(10)
        with opened([shut]):
            pass
        assert os.listdir(shut) == ["inner"]  # the other reader still holds it
    finally:
        leave.set()
        thread.join()
    with pytest.raises(PermissionError):
        os.listdir(shut)
    os.chmod(shut, 0o755)
    os.chmod(shut / "inner", 0o755)


def test_a_root_below_a_shut_directory_is_reached_and_links_are_not_followed(tmp_path: Path) -> None:
    _as_user()
    shut = _shut_tree(tmp_path / "layer")
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o100)  # the user's, shut: a link to it must not open it
    os.chmod(shut, 0o755)
    os.symlink(outside, shut / "link")
    os.chmod(shut, 0o124)
    with opened([shut / "inner" / "f"], base=tmp_path / "layer"):
        assert (shut / "inner" / "f").read_text() == "data"
    with opened([shut / "link" / "x"], base=tmp_path / "layer"), opened([shut]):
        assert stat.S_IMODE(os.lstat(outside).st_mode) == 0o100
    assert stat.S_IMODE(os.lstat(tmp_path / "layer" / "shut").st_mode) == 0o124
    os.chmod(shut, 0o755)
    os.chmod(shut / "inner", 0o755)
    outside.chmod(0o755)
