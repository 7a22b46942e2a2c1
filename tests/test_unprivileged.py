"""The sandbox tests again, as unprivileged users: with a subordinate id range, and without.

Run as root (CI is root): creates two system users (reused when they exist),
gives one a range in /etc/subuid and /etc/subgid, copies the project to a
directory they can read, and runs `pytest -m sandbox` there as each of them.
Skips with a reason when not root or when runuser/useradd are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.plainuser import PLAIN_USER as WITHOUT_RANGE
from tests.support.plainuser import RANGED_USER as WITH_RANGE
from tests.support.plainuser import root_scratch, set_range, user_scratch
from tests.support.sandbox import ensure_user, system_tool, tun_open_to_users

PROJECT = Path(__file__).resolve().parent.parent
INNER_TIMEOUT = 2400  # seconds: each user runs every sandbox-marked file (about 6 min on an idle machine)


def _require_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create the unprivileged test users")
    for tool in ("runuser", "useradd", "newuidmap", "newgidmap"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="module")
def project_copy() -> Iterator[Path]:
    """The project (sources and tests) in a directory any user can read (pytest's tmp is 0700)."""
    _require_root_tools()
    with root_scratch("lamina-unprivileged-") as base:
        copy = base / "project"
        ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "*.egg-info")
        shutil.copytree(PROJECT, copy, ignore=ignore)
        subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
        yield copy


def _interpreter(user: str, project: Path) -> tuple[str, str]:
    """(python, PYTHONPATH) that `user` can run pytest with, the copy first on the path."""
    probe = [sys.executable, "-c", "import pytest, click, zstandard, hypothesis"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(project), "HOME": "/tmp"}
    probed = subprocess.run([system_tool("runuser"), "-u", user, "--", *probe], env=env, capture_output=True)
    if probed.returncode == 0:
        return sys.executable, str(project)
    # The venv is not readable by that user: copy its site-packages next to the project.
    import site

    site_copy = project.parent / "site-packages"
    if not site_copy.exists():
        shutil.copytree(site.getsitepackages()[0], site_copy, ignore=shutil.ignore_patterns("__editable__*"))
        subprocess.run(["chmod", "-R", "a+rX", str(site_copy)], check=True)
    return "/usr/bin/python3", f"{project}:{site_copy}"


def _user_dir(user: str, path: Path) -> str:
    """`path`, made 0700 and the user's."""
    import pwd

    path.mkdir(mode=0o700)
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return str(path)


def _sandbox_files(project: Path) -> list[str]:
    """The test files that have sandbox tests: a half-written unrelated test file must not
    stop the run at collection."""
    return sorted(
        str(p.relative_to(project))
        for p in (project / "tests").glob("test_*.py")
        if ("mark.sandbox" in p.read_text() or "mark.unprivileged" in p.read_text())
        and p.name != Path(__file__).name
    )


def _pytest_as(
    user: str, project: Path, *args: str, timeout: float, scratch: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`pytest ARGS` as `user` in the project copy. Its TMPDIR, --basetemp (TMPDIR/pytest) and
    runtime dir live in a scratch directory (tests.support.plainuser.user_scratch) root removes
    after: what the run leaves, owned by the user's subordinate ids too, never piles up in
    /tmp/pytest-of-USER. `scratch`: one the caller made and removes."""
    if scratch is None:
        with user_scratch(user, "lamina-u-") as made:  # short: the socket paths under it
            return _pytest_as(user, project, *args, timeout=timeout, scratch=made)
    python, pythonpath = _interpreter(user, project)
    tmp = scratch / "tmp"
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": pythonpath,
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(project.parent),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp),
        # A login session's own runtime dir: without one, skopeo and podman look in
        # /run/containers/UID, which a root podman or buildah leaves closed (0700).
        "XDG_RUNTIME_DIR": _user_dir(user, tmp / "run"),
    }
    from tests.support.minbase import CACHED, ENV_VAR

    if CACHED.is_file():  # the Debian root tests/test_build_apt.py made as root
        env[ENV_VAR] = str(CACHED)
    from tests.support import multiplatform

    if multiplatform.why_no_arm64() is None:  # fetched as root (apt-get download), read by them
        env[multiplatform.ENV_VAR] = str(multiplatform.arm64_busybox())
        env[multiplatform.ARMHF_ENV_VAR] = str(multiplatform.foreign_busybox("armhf"))
    command = [python, "-m", "pytest", "-p", "no:cacheprovider", f"--basetemp={tmp / 'pytest'}", *args]
    return subprocess.run(
        [system_tool("runuser"), "-u", user, "--", *command],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _passed(output: str) -> int:
    match = re.search(r"(\d+) passed", output)
    return int(match.group(1)) if match else 0


@pytest.fixture
def open_tun() -> Iterator[None]:
    """/dev/net/tun as Debian's udev leaves it (0666), for slirp4netns run by a user.

    Some hosts (this CI's VM) have no udev and keep it 0600: then the default
    network falls back to an isolated one, which the suite tests separately.
    """
    with tun_open_to_users():
        yield


@pytest.mark.parametrize("user,has_range", [(WITH_RANGE, True), (WITHOUT_RANGE, False)])
def test_sandbox_suite_as_unprivileged_user(
    project_copy: Path, user: str, has_range: bool, open_tun: None
) -> None:
    ensure_user(user)
    set_range(user, has_range)
    files = _sandbox_files(project_copy)
    args = ("-m", "sandbox or unprivileged", "-q", *files)
    done = _pytest_as(user, project_copy, *args, timeout=INNER_TIMEOUT)
    output = done.stdout + done.stderr
    tail = "\n".join(output.splitlines()[-40:])
    assert done.returncode == 0, f"pytest -m sandbox as {user} failed:\n{tail}"
    # Not vacuous: the sandbox tests really ran (and were not all skipped).
    assert _passed(output) >= 20, tail


def test_id_map_detection_matches_the_user(project_copy: Path) -> None:
    ensure_user(WITH_RANGE)
    set_range(WITH_RANGE, True)
    ensure_user(WITHOUT_RANGE)
    set_range(WITHOUT_RANGE, False)
    code = (
        "from lamina.engine.sandbox import detect_ids; i = detect_ids(); print(i.mode.value, bool(i.warning))"
    )
    seen = {}
    for user in (WITH_RANGE, WITHOUT_RANGE):
        python, pythonpath = _interpreter(user, project_copy)
        done = subprocess.run(
            [system_tool("runuser"), "-u", user, "--", python, "-c", code],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1"},
            capture_output=True,
            text=True,
            cwd="/",
        )
        assert done.returncode == 0, done.stderr
        seen[user] = done.stdout.split()
    assert seen == {WITH_RANGE: ["subordinate", "False"], WITHOUT_RANGE: ["single", "True"]}


LEAVES_A_TREE = """
import os
import tempfile
from pathlib import Path

from lamina.engine.sandbox.runner import set_owners


def test_leaves_trees_of_a_subordinate_id(tmp_path):
    print("TMPDIR=" + os.environ["TMPDIR"])
    for where in (tmp_path, Path(tempfile.mkdtemp())):
        (where / "d").mkdir()
        (where / "d" / "f").write_text("x")
        set_owners([(where / "d" / "f", 1000, 1000), (where / "d", 1000, 1000)])
        assert (where / "d").stat().st_uid != os.getuid()  # the user cannot remove d/f now
"""


def test_a_run_as_a_user_with_subordinate_ids_leaves_nothing_behind(project_copy: Path) -> None:
    """Trees a user's subordinate ids own (a rootless build's layers) can be removed by neither
    that user nor its pytest: they filled the disk from /tmp/pytest-of-USER run after run."""
    ensure_user(WITH_RANGE)
    set_range(WITH_RANGE, True)
    test_file = project_copy.parent / "leaves" / "test_leaves.py"
    test_file.parent.mkdir(mode=0o755, exist_ok=True)
    test_file.write_text(LEAVES_A_TREE)
    test_file.chmod(0o644)
    shared = Path("/tmp") / f"pytest-of-{WITH_RANGE}"  # where its pytest puts them by default
    before = sorted(shared.iterdir()) if shared.exists() else []
    done = _pytest_as(WITH_RANGE, project_copy, "-q", "-s", str(test_file), timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
    tmpdir = Path(re.search(r"TMPDIR=(\S+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert not tmpdir.parent.exists()  # its scratch: TMPDIR, --basetemp and all in them
    assert (sorted(shared.iterdir()) if shared.exists() else []) == before


def test_a_passing_rootless_session_removes_its_subordinate_id_trees(project_copy: Path) -> None:
    """Run as a user with subordinate ids (a developer's laptop), the suite itself removes
    the trees its rootless builds left under tmp_path, through the user's namespace helper
    (tests/conftest.py, tests/support/rootlesstmp.py): pytest, as the user, cannot."""
    ensure_user(WITH_RANGE)
    set_range(WITH_RANGE, True)
    test_file = project_copy / "tests" / "test_zz_leaves_trees.py"  # under the suite's conftest
    test_file.write_text(LEAVES_A_TREE)
    test_file.chmod(0o644)
    try:
        with user_scratch(WITH_RANGE, "lamina-pytest-rootless-") as scratch:
            args = ("-q", "-s", str(test_file.relative_to(project_copy)))
            done = _pytest_as(WITH_RANGE, project_copy, *args, timeout=300, scratch=scratch)
            assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
            assert list((scratch / "tmp" / "pytest").iterdir()) == []  # the session's basetemp
    finally:
        test_file.unlink()


def test_tun_stays_open_until_the_last_run_using_it_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs at once (xdist, or two sessions): the first one out must not close /dev/net/tun
    under the other (its network tests then failed), and the last gives the mode back.
    On a stand-in file, so that the host's device is never closed under a run."""
    from tests.support import sandbox

    tun, state = tmp_path / "tun", tmp_path / "tun.json"
    tun.touch(mode=0o600)
    monkeypatch.setattr(sandbox, "TUN", tun)
    monkeypatch.setattr(sandbox, "_TUN_STATE", state)
    code = (
        "import sys; from pathlib import Path; from tests.support import sandbox as s\n"
        "s.TUN, s._TUN_STATE = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "with s.tun_open_to_users():\n    print('in', flush=True); sys.stdin.readline()"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(tun), str(state)],
        cwd=PROJECT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert other.stdout is not None and other.stdin is not None
    try:
        assert other.stdout.readline() == "in\n"
        with tun_open_to_users():
            assert tun.stat().st_mode & 0o777 == 0o666
        assert tun.stat().st_mode & 0o777 == 0o666  # the other run is still inside
    finally:
        other.stdin.close()
        other.wait(timeout=30)
    assert tun.stat().st_mode & 0o777 == 0o600
    assert not state.exists()


def test_a_killed_runs_scratch_goes_with_the_next_run() -> None:
    """A run killed before its teardown (a timeout, SIGKILL) leaves its scratch dir, with the
    trees its users' subordinate ids own; the next run of the same helper removes it."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(gone.stdout)
    prefix = "lamina-test-sweep-"
    stale = Path(tempfile.mkdtemp(prefix=f"{prefix}{dead_pid}-"))
    (stale / "left").write_text("by a killed run\n")
    live = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))  # a run still going
    try:
        with root_scratch(prefix) as base:
            assert base.is_dir() and base.name.startswith(f"{prefix}{os.getpid()}-")
            assert not stale.exists()
            assert live.is_dir()
        assert not base.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
