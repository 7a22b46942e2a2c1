"""`--add-host`, `--ulimit`, `--shm-size`: what every RUN of a build sees, as buildx passes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.build import BASE, run_cli, write_context

pytestmark = pytest.mark.sandbox


PROBE = f"""\
FROM {BASE}
RUN cat /etc/hosts > /hosts; ulimit -Sn > /nofile-soft; ulimit -Hn > /nofile-hard; \\
    df -k /dev/shm | tail -1 > /shm
"""


def _build(cache: Path, ctx: Path, out: Path, *flags: str) -> None:
    run_cli("build", "-o", f"type=local,dest={out}", *flags, str(ctx), cache=cache)


@pytest.mark.parametrize("network", ["default", "none", "host"])
def test_add_host_ulimit_shm_size_reach_run(cache: Path, tmp_path: Path, network: str) -> None:
    ctx = write_context(tmp_path / "ctx", PROBE)
    out = tmp_path / "out"
    flags = ["--add-host", "db.internal:10.1.2.3", "--add-host", "v6=[fd00::1]"]
    flags += ["--ulimit", "nofile=256:512", "--shm-size", "16m", "--network", network]
    _build(cache, ctx, out, *flags)
    hosts = (out / "hosts").read_text().splitlines()
    assert "10.1.2.3\tdb.internal" in hosts and "fd00::1\tv6" in hosts
    assert (out / "nofile-soft").read_text() == "256\n"
    assert (out / "nofile-hard").read_text() == "512\n"
    assert (out / "shm").read_text().split()[1] == str(16 * 1024), "/dev/shm is 16 MiB"


def test_defaults_and_the_cache_key(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", PROBE)
    out = tmp_path / "out"
    _build(cache, ctx, out)
    assert "db.internal" not in (out / "hosts").read_text()
    assert (out / "shm").read_text().split()[1] == str(64 * 1024), "runc's and BuildKit's 64 MiB"
    # The flags are in the step's key, as in the exec op's meta in BuildKit.
    proc = run_cli("build", "--progress", "plain", "--add-host", "a:1.2.3.4", str(ctx), cache=cache)
    assert "CACHED" not in proc.stderr.split("RUN cat")[1].splitlines()[0]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--add-host=nohost", "--add-host nohost: invalid host (expected NAME:IP)"),
        ("--add-host=a:999.1.1.1", "--add-host a:999.1.1.1: invalid host (999.1.1.1 is not an IP address)"),
        ("--add-host=gw:host-gateway", "--add-host gw:host-gateway: host-gateway is not supported"),
        ("--ulimit=bogus=1", "--ulimit bogus=1: invalid ulimit type: bogus"),
        (
            "--ulimit=nofile=9:3",
            "--ulimit nofile=9:3: ulimit soft limit must be less than or equal to hard limit",
        ),
        ("--ulimit=nofile", "--ulimit nofile: invalid ulimit argument (expected NAME=SOFT[:HARD])"),
        ("--shm-size=lots", "--shm-size lots: invalid size (use e.g. 64m, 1g or bytes)"),
    ],
)
def test_bad_values_fail_in_one_line(cache: Path, tmp_path: Path, flag: str, message: str) -> None:
    ctx = write_context(tmp_path / "ctx", PROBE)
    proc = run_cli("build", flag, str(ctx), cache=cache, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"error: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plan_cache_takes_the_run_flags(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", PROBE)
    run_cli("build", "-t", "flags:1", str(ctx), cache=cache)
    same = run_cli("plan", "--cache", str(ctx), cache=cache).stdout
    assert "RUN cat /etc/hosts" in same and "will run" not in same
    for flag in ("--add-host=a:1.2.3.4", "--ulimit=nofile=100:200", "--shm-size=8m"):
        forecast = run_cli("plan", "--cache", flag, str(ctx), cache=cache).stdout
        line = next(line for line in forecast.splitlines() if "RUN cat /etc/hosts" in line)
        assert "will run" in line, (flag, line)
