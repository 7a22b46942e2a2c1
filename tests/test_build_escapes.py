"""What must keep holding while a Dockerfile tries to reach the host through the build.

Each test names the attack: a bind mount whose source is a symlink out of
the context or out of another stage, a cache directory holding a symlink to
the host's root, and WORKDIR through /proc/self/fd. The host file they aim
at holds a marker that must never reach the image.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.errors import LaminaError
from tests.support.build import BASE, build, write_context

pytestmark = pytest.mark.sandbox


@pytest.fixture
def host_secret(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on the host with a file a step must never read."""
    where = tmp_path_factory.mktemp("host-side")
    where.chmod(0o755)
    (where / "secret").write_text(f"host-marker-{uuid.uuid4().hex}\n")
    (where / "secret").chmod(0o644)
    yield where


def _attempt(cache: Path, ctx: Path, out: Path) -> str:
    """Build into `out`; the text the image holds at /seen, or the error."""
    try:
        build(cache, ctx, outputs=[f"type=local,dest={out}"])
    except LaminaError as err:
        return f"error: {err}"
    seen = out / "seen"
    return seen.read_text() if seen.exists() else ""


def test_bind_mount_of_a_context_symlink_out_of_the_context(
    cache: Path, tmp_path: Path, host_secret: Path
) -> None:
    dockerfile = f"FROM {BASE}\nRUN --mount=type=bind,source=escape,target=/m cat /m/secret > /seen || true\n"
    ctx = write_context(tmp_path / "ctx", dockerfile)
    (ctx / "escape").symlink_to(host_secret)
    assert "host-marker" not in _attempt(cache, ctx, tmp_path / "out")


def test_bind_mount_of_a_stage_symlink_to_a_host_path(cache: Path, tmp_path: Path, host_secret: Path) -> None:
    dockerfile = (
        f"FROM {BASE} AS evil\nRUN ln -s {host_secret} /escape\n"
        f"FROM {BASE}\n"
        "RUN --mount=type=bind,from=evil,source=/escape,target=/m cat /m/secret > /seen || true\n"
    )
    ctx = write_context(tmp_path / "ctx", dockerfile)
    assert "host-marker" not in _attempt(cache, ctx, tmp_path / "out")


def test_cache_mount_holding_a_symlink_to_a_host_path(cache: Path, tmp_path: Path, host_secret: Path) -> None:
    dockerfile = (
        f"FROM {BASE}\n"
        f"RUN --mount=type=cache,id=c,target=/c ln -sfn {host_secret} /c/escape\n"
        "RUN --mount=type=cache,id=c,target=/c cat /c/escape/secret > /seen || true\n"
        "RUN --mount=type=cache,id=c,target=/c --mount=type=bind,source=.,target=/c/escape/ctx true\n"
    )
    ctx = write_context(tmp_path / "ctx", dockerfile)
    assert "host-marker" not in _attempt(cache, ctx, tmp_path / "out")
    assert not (host_secret / "ctx").exists()  # the mount target did not land on the host


@pytest.mark.parametrize("fd", ["0", "3", "9"])
def test_workdir_through_proc_self_fd(cache: Path, tmp_path: Path, fd: str) -> None:
    dockerfile = f"FROM {BASE}\nWORKDIR /proc/self/fd/{fd}\nRUN pwd > /seen; ls -la . >> /seen 2>&1 || true\n"
    ctx = write_context(tmp_path / "ctx", dockerfile)
    seen = _attempt(cache, ctx, tmp_path / "out")
    # Either refused, or a directory of the image's own (/proc is mounted over it in RUN).
    assert "pipe:" not in seen and "socket:" not in seen and "/work" not in seen, seen
