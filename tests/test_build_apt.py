"""apt-get in a RUN step, on a Debian minbase root made by debootstrap.

The packages come from the Debian mirror this host's apt uses. As root and,
through tests/test_unprivileged.py, as a user with a subordinate id range
(`useradd` and `USER app` work) and as one without (only root exists: apt
runs its downloads as root, `APT::Sandbox::User "root"`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.build import rootfs, write_context
from tests.support.minbase import minbase_tar, why_unavailable

pytestmark = pytest.mark.sandbox

_APT = "apt-get -o Acquire::Retries=3"


@pytest.fixture(scope="module")
def minbase() -> Path:
    why = why_unavailable()
    if why is not None:
        pytest.skip(why)
    return minbase_tar()


def test_apt_get_installs_a_package_and_a_user_runs_it(minbase: Path, tmp_path: Path) -> None:
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    with_users = detect_ids().mode is not IdMode.SINGLE
    user_steps = (
        "RUN useradd -m app\nUSER app\nRUN hello > /home/app/greeting && id -un > /home/app/who\n"
        if with_users
        else "RUN mkdir -p /home/app && hello > /home/app/greeting && id -un > /home/app/who\n"
    )
    dockerfile = (
        "FROM scratch AS system\n"
        "ADD minbase.tar /\n"
        f"RUN {_APT} update -q && {_APT} install -y -q --no-install-recommends hello\n"
        f"{user_steps}"
        "FROM scratch\n"
        "COPY --from=system /home/app/ /out/\n"
        "COPY --from=system /var/lib/dpkg/status /out/dpkg-status\n"
    )
    ctx = write_context(tmp_path / "ctx", dockerfile)
    shutil.copy(minbase, ctx / "minbase.tar")
    out = tmp_path / "out"
    rootfs(tmp_path / "cache", ctx, out)
    assert (out / "out/greeting").read_text() == "Hello, world!\n"
    assert (out / "out/who").read_text() == ("app\n" if with_users else "root\n")
    assert "Package: hello\nStatus: install ok installed" in (out / "out/dpkg-status").read_text()
