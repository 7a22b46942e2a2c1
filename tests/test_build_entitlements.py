"""RUN's network and security modes at build level: BuildKit's defaults and its entitlements.

A RUN gets a network of its own unless the build says `--network host`;
`RUN --network=host` and `RUN --security=insecure` need `--allow`, as buildx
asks, and fail with one line naming the Dockerfile line otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.build import BASE, run_cli, write_context
from tests.support.servers import loopback_server

pytestmark = pytest.mark.sandbox


@pytest.fixture
def loopback_port() -> Iterator[int]:
    """A server on the host's 127.0.0.1 that answers and hangs up (nc waits for that)."""
    with loopback_server() as port:
        yield port


def _build(cache: Path, ctx: Path, out: Path, *flags: str, check: bool = True) -> object:
    return run_cli(
        "build",
        "--progress=plain",
        *flags,
        "-o",
        f"type=local,dest={out}",
        str(ctx),
        cache=cache,
        check=check,
    )


def test_default_network_is_private_and_host_network_is_asked_for(
    cache: Path, tmp_path: Path, loopback_port: int
) -> None:
    probe = f"nc -w 2 127.0.0.1 {loopback_port} </dev/null && echo reached > /net || echo unreachable > /net"
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN {probe}\n")
    _build(cache, ctx, tmp_path / "default")
    assert (tmp_path / "default/net").read_text() == "unreachable\n"
    _build(cache, ctx, tmp_path / "host", "--network", "host")  # buildx grants network.host for it
    assert (tmp_path / "host/net").read_text() == "reached\n"


def test_run_network_host_needs_the_entitlement(cache: Path, tmp_path: Path, loopback_port: int) -> None:
    probe = f"nc -w 2 127.0.0.1 {loopback_port} </dev/null && echo reached > /net || echo unreachable > /net"
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN --network=host {probe}\n")
    refused = _build(cache, ctx, tmp_path / "no", check=False)
    assert refused.returncode != 0
    assert "Dockerfile:2" in refused.stderr
    assert "--allow network.host" in refused.stderr
    assert not (tmp_path / "no").exists()
    _build(cache, ctx, tmp_path / "yes", "--allow", "network.host")
    assert (tmp_path / "yes/net").read_text() == "reached\n"


def test_run_security_insecure_needs_the_entitlement(cache: Path, tmp_path: Path) -> None:
    run = "RUN --security=insecure grep -E '^(Seccomp|CapBnd)' /proc/self/status > /status"
    ctx = write_context(
        tmp_path / "ctx", f"FROM {BASE}\n{run}\nRUN grep -E '^Seccomp:' /proc/self/status > /after\n"
    )
    refused = _build(cache, ctx, tmp_path / "no", check=False)
    assert refused.returncode != 0
    assert "Dockerfile:2" in refused.stderr and "--allow security.insecure" in refused.stderr
    _build(cache, ctx, tmp_path / "yes", "--allow", "security.insecure")
    fields = dict(line.split(":\t") for line in (tmp_path / "yes/status").read_text().splitlines())
    assert fields["Seccomp"] == "0"
    assert int(fields["CapBnd"], 16) != 0xA80425FB
    assert (tmp_path / "yes/after").read_text() == "Seccomp:\t2\n"  # only that step is lifted


def test_info_says_what_a_step_gets(cache: Path) -> None:
    out = run_cli("info", cache=cache).stdout
    assert "0xa80425fb" in out
    assert "/proc/sys" in out and "/proc/keys" in out
    assert "network:         default:" in out


def test_a_replayed_build_still_needs_its_entitlement(cache: Path, tmp_path: Path) -> None:
    # An unchanged build is replayed from a memo of its inputs: --allow must be one of them.
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN --security=insecure true\n")
    run_cli("build", "-t", "insecure:1", "--allow", "security.insecure", str(ctx), cache=cache)
    again = run_cli("build", "-t", "insecure:1", str(ctx), cache=cache, check=False)
    assert again.returncode != 0
    assert "--allow security.insecure" in again.stderr
