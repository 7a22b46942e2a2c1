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

from tests.support.sandbox import ensure_user, system_tool

PROJECT = Path(__file__).resolve().parent.parent
WITH_RANGE = "lamina-sb-sub"
WITHOUT_RANGE = "lamina-sb-nosub"
RANGE_SIZE = 65536
INNER_TIMEOUT = 2400  # seconds: each user runs every sandbox-marked file (about 6 min on an idle machine)


def _require_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create the unprivileged test users")
    for tool in ("runuser", "useradd", "newuidmap", "newgidmap"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed")


def _set_range(name: str, wanted: bool) -> None:
    """Give `name` one range in /etc/subuid and /etc/subgid (wanted) or none."""
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        lines = path.read_text().splitlines() if path.exists() else []
        mine = [line for line in lines if line.split(":")[0] == name]
        others = [line for line in lines if line.split(":")[0] != name]
        if wanted and mine:
            continue
        if wanted:
            ends = [int(p[1]) + int(p[2]) for p in (line.split(":") for line in others) if len(p) == 3]
            start = max([100000, *ends])
            others.append(f"{name}:{start}:{RANGE_SIZE}")
        elif not mine:
            continue
        path.write_text("".join(line + "\n" for line in others))


@pytest.fixture(scope="module")
def project_copy() -> Iterator[Path]:
    """The project (sources and tests) in a directory any user can read (pytest's tmp is 0700)."""
    _require_root_tools()
    base = Path(tempfile.mkdtemp(prefix="lamina-unprivileged-"))
    try:
        base.chmod(0o755)
        copy = base / "project"
        ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "*.egg-info")
        shutil.copytree(PROJECT, copy, ignore=ignore)
        subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
        yield copy
    finally:
        shutil.rmtree(base, ignore_errors=True)


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


def _runtime_dir(user: str, parent: Path) -> str:
    import pwd

    path = parent / f"run-{user}"
    path.mkdir(mode=0o700, exist_ok=True)
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return str(path)


def _run_as(user: str, project: Path) -> subprocess.CompletedProcess[str]:
    python, pythonpath = _interpreter(user, project)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": pythonpath,
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(project.parent),
        "LANG": "C.UTF-8",
        # A login session's own runtime dir: without one, skopeo and podman look in
        # /run/containers/UID, which a root podman or buildah leaves closed (0700).
        "XDG_RUNTIME_DIR": _runtime_dir(user, project.parent),
    }
    from tests.support.minbase import CACHED, ENV_VAR

    if CACHED.is_file():  # the Debian root tests/test_build_apt.py made as root
        env[ENV_VAR] = str(CACHED)
    from tests.support import multiplatform

    if multiplatform.why_no_arm64() is None:  # fetched as root (apt-get download), read by them
        env[multiplatform.ENV_VAR] = str(multiplatform.arm64_busybox())
        env[multiplatform.ARMHF_ENV_VAR] = str(multiplatform.foreign_busybox("armhf"))
    # Only the files that have sandbox tests: a half-written unrelated test
    # file must not stop the run at collection.
    files = sorted(
        str(p.relative_to(project))
        for p in (project / "tests").glob("test_*.py")
        if ("mark.sandbox" in p.read_text() or "mark.unprivileged" in p.read_text())
        and p.name != Path(__file__).name
    )
    args = [python, "-m", "pytest", "-m", "sandbox or unprivileged", "-q", "-p", "no:cacheprovider", *files]
    return subprocess.run(
        [system_tool("runuser"), "-u", user, "--", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT,
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
    tun = Path("/dev/net/tun")
    if not tun.exists():
        yield
        return
    mode = tun.stat().st_mode & 0o777
    tun.chmod(0o666)
    try:
        yield
    finally:
        tun.chmod(mode)


@pytest.mark.parametrize("user,has_range", [(WITH_RANGE, True), (WITHOUT_RANGE, False)])
def test_sandbox_suite_as_unprivileged_user(
    project_copy: Path, user: str, has_range: bool, open_tun: None
) -> None:
    ensure_user(user)
    _set_range(user, has_range)
    done = _run_as(user, project_copy)
    output = done.stdout + done.stderr
    tail = "\n".join(output.splitlines()[-40:])
    assert done.returncode == 0, f"pytest -m sandbox as {user} failed:\n{tail}"
    # Not vacuous: the sandbox tests really ran (and were not all skipped).
    assert _passed(output) >= 20, tail


def test_id_map_detection_matches_the_user(project_copy: Path) -> None:
    ensure_user(WITH_RANGE)
    _set_range(WITH_RANGE, True)
    ensure_user(WITHOUT_RANGE)
    _set_range(WITHOUT_RANGE, False)
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
