"""A Debian `debootstrap --variant=minbase` root filesystem as a tar, for tests that need apt.

Made once per machine, as root, from the suite and mirror this host's apt
uses (so no address is written here), into a world-readable file that the
unprivileged test users (tests/test_unprivileged.py) read too. Building it
takes about 30 s and 100 MB of downloads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

ENV_VAR = "LAMINA_TEST_MINBASE"  # a tar made earlier (the unprivileged runs get it this way)
CACHED = Path(tempfile.gettempdir()) / "lamina-test-minbase" / "minbase.tar"


def host_suite_and_mirror() -> tuple[str, str] | None:
    """This host's release codename and the first mirror its apt sources give for it."""
    release = Path("/etc/os-release")
    found = re.search(r"^VERSION_CODENAME=(\w+)", release.read_text(), re.M) if release.exists() else None
    if found is None:
        return None
    codename = found.group(1)
    # deb822 files (Debian 12, Ubuntu 24.04): stanzas of "Key: value" lines.
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


def why_unavailable() -> str | None:
    """None when `minbase_tar()` can give a tar; else why it cannot, for a skip."""
    given = os.environ.get(ENV_VAR)
    if given:
        return None if Path(given).is_file() else f"${ENV_VAR} names {given}, which does not exist"
    if CACHED.is_file():
        return None
    if os.geteuid() != 0:
        return f"debootstrap needs root; tests/test_unprivileged.py passes the root run's tar in ${ENV_VAR}"
    if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
        return "debootstrap is not installed (apt-get install debootstrap)"
    if host_suite_and_mirror() is None:
        return "no Debian suite and mirror in /etc/os-release and /etc/apt/sources*"
    return None


def minbase_tar() -> Path:
    """The minbase tar: from $LAMINA_TEST_MINBASE, made earlier, or made now (as root)."""
    given = os.environ.get(ENV_VAR)
    if given:
        return Path(given)
    if CACHED.is_file():
        return CACHED
    found = host_suite_and_mirror()
    assert found is not None, why_unavailable()
    suite, mirror = found
    CACHED.parent.mkdir(mode=0o755, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="minbase-", dir=CACHED.parent))
    try:
        root = work / "root"
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        subprocess.run(
            [debootstrap, "--variant=minbase", suite, str(root), mirror],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        partial = work / "minbase.tar"
        with tarfile.open(partial, "w") as tar:
            tar.add(root, arcname=".")
        partial.chmod(0o644)
        os.replace(partial, CACHED)  # complete or absent, for the next run
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return CACHED
