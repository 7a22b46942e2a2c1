"""Every RUN has an /etc/hosts naming localhost and its hostname, whatever its network, as
BuildKit's executor writes one for each (oci.GetHostsFile), --network=none included."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.build import BASE, make_cache, rootfs, write_context

pytestmark = pytest.mark.sandbox


def test_a_run_without_network_has_hosts_naming_localhost_and_its_hostname(
    tmp_path: Path, busybox_image: Path
) -> None:
    cache = make_cache(tmp_path, busybox_image)
    dockerfile = f"FROM {BASE}\nRUN --network=none cat /etc/hosts > /hosts\n"
    out = tmp_path / "out"
    rootfs(
        cache,
        write_context(tmp_path / "ctx", dockerfile),
        out,
        build_args={"BUILDKIT_SANDBOX_HOSTNAME": "foo"},
    )
    lines = (out / "hosts").read_text().splitlines()
    assert "127.0.0.1\tlocalhost foo" in lines, lines


def test_add_host_lines_follow_in_a_run_without_network(tmp_path: Path, busybox_image: Path) -> None:
    cache = make_cache(tmp_path, busybox_image)
    dockerfile = f"FROM {BASE}\nRUN --network=none cat /etc/hosts > /hosts\n"
    out = tmp_path / "out"
    rootfs(cache, write_context(tmp_path / "ctx", dockerfile), out, add_hosts=["db.test:10.0.0.5"])
    lines = (out / "hosts").read_text().splitlines()
    assert lines[0].startswith("127.0.0.1\tlocalhost ") and lines[-1] == "10.0.0.5\tdb.test", lines
