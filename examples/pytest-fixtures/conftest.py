"""The images this suite tests, built once per session by lamina's pytest plugin."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# A Debian root made by `debootstrap --variant=minbase` (as root, about 30 s), as a
# tar any user can read: $LAMINA_EXAMPLE_MINBASE names one made earlier, else it is
# made once per machine here (the same file lamina's own tests make and use).
MINBASE_ENV = "LAMINA_EXAMPLE_MINBASE"
MINBASE = Path(tempfile.gettempdir()) / "lamina-test-minbase" / "minbase.tar"


@pytest.fixture(scope="session")
def base(lamina_build, tmp_path_factory):
    """A busybox base image made FROM scratch with the host's static busybox."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    context = tmp_path_factory.mktemp("base")
    shutil.copytree(HERE / "base", context, dirs_exist_ok=True)
    shutil.copy2(busybox, context / "busybox")
    return lamina_build(context, tag="pytest-fixtures-example/busybox:latest")


@pytest.fixture(scope="session")
def web(lamina_build, base):
    return lamina_build(HERE / "app", target="web", build_args={"BASE": base.name})


@pytest.fixture(scope="session")
def tool(lamina_build, base):
    return lamina_build(HERE / "app", target="tool", build_args={"BASE": base.name})


@pytest.fixture(scope="session")
def python_base(lamina_build, lamina_cache):
    """Debian minbase with python3 installed by apt-get from the Debian mirror."""
    # The context lives in lamina's cache, so that the next session finds it (and
    # every step of its build) as it was: the 200 MB tar is not copied again.
    context = lamina_cache / "pytest-fixtures-example" / "debian"
    context.mkdir(parents=True, exist_ok=True)
    with _locked(context.parent / "debian.lock"):  # xdist workers: one makes it, the others wait
        tar = _minbase_tar()
        dockerfile = (HERE / "debian" / "Dockerfile").read_bytes()
        if not (context / "Dockerfile").is_file() or (context / "Dockerfile").read_bytes() != dockerfile:
            (context / "Dockerfile.tmp").write_bytes(dockerfile)
            os.replace(context / "Dockerfile.tmp", context / "Dockerfile")
        link = context / "minbase.tar"
        if not link.exists() or not os.path.samefile(link, tar):
            link.unlink(missing_ok=True)
            try:
                os.link(tar, link)
            except OSError:  # another file system, or a file of another user's
                shutil.copy2(tar, link)
    # The host's network for apt-get: it works where a user cannot open /dev/net/tun too.
    return lamina_build(context, tag="pytest-fixtures-example/python:latest", network="host")


@pytest.fixture(scope="session")
def pyweb(lamina_build, base, python_base):
    args = {"BASE": base.name, "PYTHON_BASE": python_base.name}
    return lamina_build(HERE / "app", target="pyweb", build_args=args)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _minbase_tar() -> Path:
    given = os.environ.get(MINBASE_ENV)
    if given:
        if not Path(given).is_file():
            pytest.skip(f"${MINBASE_ENV} names {given}, which does not exist")
        return Path(given)
    if MINBASE.is_file():
        return MINBASE
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if debootstrap is None:
        pytest.skip("the Debian base needs debootstrap (apt-get install debootstrap)")
    if os.geteuid() != 0:
        pytest.skip(
            f"debootstrap needs root: run this suite as root once, or set ${MINBASE_ENV} to a minbase tar"
        )
    found = _suite_and_mirror()
    if found is None:
        pytest.skip("no Debian suite and mirror in /etc/os-release and /etc/apt/sources*")
    MINBASE.parent.mkdir(mode=0o755, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="minbase-", dir=MINBASE.parent))
    try:
        root = work / "root"
        subprocess.run(
            [debootstrap, "--variant=minbase", found[0], str(root), found[1]],
            check=True,
            capture_output=True,
            timeout=900,
        )
        partial = work / "minbase.tar"
        with tarfile.open(partial, "w") as tar:
            tar.add(root, arcname=".")
        partial.chmod(0o644)
        os.replace(partial, MINBASE)  # whole or absent, for the next session (or xdist worker)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return MINBASE


def _suite_and_mirror() -> tuple[str, str] | None:
    """This host's Debian codename and the first mirror its apt sources give for it."""
    release = Path("/etc/os-release")
    found = re.search(r"^VERSION_CODENAME=(\w+)", release.read_text(), re.M) if release.exists() else None
    if found is None:
        return None
    codename = found.group(1)
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and codename in fields.get("Suites", "").split():
                return codename, fields["URIs"].split()[0]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        line = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{codename}\s", listing.read_text(), re.M)
        if line is not None:
            return codename, line.group(1)
    return None
