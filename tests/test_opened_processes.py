"""lamina.oci.opened across processes: two lamina processes reading one cached layer whose
directories shut out their owner (rootless). Neither reads the other's raised modes as the
tree's, and neither gives a mode back while the other still reads (the grants' table and
locks beside the tree). As root opened is a no-op: tests/test_unprivileged.py runs this
file as its unprivileged users.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lamina.oci.opened import opened, true_stat

pytestmark = pytest.mark.unprivileged

ROOT = Path(__file__).resolve().parent.parent
# The other process: enter opened(tree), say the true modes it reads, wait for a line, leave.
OTHER = """
import os, stat, sys
from lamina.oci.opened import opened, true_stat
shut = sys.argv[1]
with opened([os.path.dirname(shut)]):
    modes = [stat.S_IMODE(true_stat(os.lstat(p)).st_mode) for p in (shut, shut + "/inner/f")]
    print("in", *(oct(m) for m in modes), open(shut + "/inner/f").read(), flush=True)
    sys.stdin.readline()
print("out", flush=True)
"""


def _shut_tree(layer: Path) -> Path:
    """layer/shut (0124, as `RUN chmod 124 dir`) holding inner (0644) holding f (0124)."""
    shut = layer / "shut"
    (shut / "inner").mkdir(parents=True)
    (shut / "inner" / "f").write_text("data")
    os.chmod(shut / "inner" / "f", 0o124)
    os.chmod(shut / "inner", 0o644)
    os.chmod(shut, 0o124)
    return shut


def _other(shut: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", OTHER, str(shut)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _modes(shut: Path) -> tuple[int, int]:
    return tuple(stat.S_IMODE(true_stat(os.lstat(p)).st_mode) for p in (shut, shut / "inner" / "f"))  # type: ignore[return-value]


@pytest.mark.parametrize("first", ["other", "this"])
def test_two_processes_read_one_shut_layer(tmp_path: Path, first: str) -> None:
    """Either process in first: both read the true modes (0124) and the data; the one that
    leaves first gives nothing back under the other; the last gives every mode back and
    leaves no lock file beside the tree."""
    if os.geteuid() == 0:
        pytest.skip("root reads any directory; tests/test_unprivileged.py runs this as a user")
    layer = tmp_path / "unpacked" / "layer"
    shut = _shut_tree(layer)
    with opened([layer]) if first == "this" else contextlib.nullcontext():
        other = _other(shut)
        try:
            assert other.stdout is not None and other.stdin is not None
            assert other.stdout.readline().split() == ["in", "0o124", "0o124", "data"]
            with opened([layer]) if first == "other" else contextlib.nullcontext():
                assert _modes(shut) == (0o124, 0o124)
                other.stdin.write("leave\n")
                other.stdin.flush()
                assert other.stdout.readline().split() == ["out"]
                assert other.wait(30) == 0
                # the other process is gone: this one still reads, with the true modes
                assert (shut / "inner" / "f").read_text() == "data"
                assert _modes(shut) == (0o124, 0o124)
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()
    assert stat.S_IMODE(os.lstat(shut).st_mode) == 0o124  # every mode given back
    assert sorted(os.listdir(layer.parent)) == ["layer"]  # no lock or table left
    os.chmod(shut, 0o755)
    os.chmod(shut / "inner", 0o755)
    assert stat.S_IMODE(os.lstat(shut / "inner" / "f").st_mode) == 0o124


def test_modes_are_given_back_after_the_reader_set_times(tmp_path: Path) -> None:
    """An export clamps times inside opened (SOURCE_DATE_EPOCH): the grants are still given
    back (a changed ctime does not make an inode another's)."""
    if os.geteuid() == 0:
        pytest.skip("root reads any directory; tests/test_unprivileged.py runs this as a user")
    layer = tmp_path / "layer"
    shut = _shut_tree(layer)
    with opened([layer]):
        for path in (shut / "inner" / "f", shut / "inner", shut):
            os.utime(path, ns=(1_700_000_000 * 10**9,) * 2, follow_symlinks=False)
    assert stat.S_IMODE(os.lstat(shut).st_mode) == 0o124
    os.chmod(shut, 0o755)
    assert stat.S_IMODE(os.lstat(shut / "inner").st_mode) == 0o644
    os.chmod(shut / "inner", 0o755)
    assert stat.S_IMODE(os.lstat(shut / "inner" / "f").st_mode) == 0o124


def test_cache_verify_gives_back_what_a_killed_reader_left(tmp_path: Path) -> None:
    """A lamina process killed while it reads a shut layer leaves its grants raised: `lamina
    cache verify` names them, `--repair` gives the modes back and removes the table."""
    if os.geteuid() == 0:
        pytest.skip("root reads any directory; tests/test_unprivileged.py runs this as a user")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LAMINA_CACHE": str(tmp_path / "cache")}

    def verify(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "lamina", "cache", "verify", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env)

    assert verify().returncode == 0  # the store made, empty
    layer = tmp_path / "cache" / "unpacked" / ("ab" * 32)
    shut = _shut_tree(layer)
    other = _other(shut)
    assert other.stdout is not None
    assert other.stdout.readline().startswith("in ")
    other.kill()
    other.wait()
    assert stat.S_IMODE(os.lstat(shut).st_mode) == 0o524  # raised, and nobody left to give it back

    found = verify()
    assert found.returncode != 0 and "a killed rootless reader left raised" in found.stdout, found.stdout
    assert verify("--repair").returncode == 0
    assert stat.S_IMODE(os.lstat(shut).st_mode) == 0o124
    assert sorted(os.listdir(layer.parent)) == [layer.name]
    assert verify().stdout.strip().endswith("; clean")
    os.chmod(shut, 0o755)
    os.chmod(shut / "inner", 0o755)
