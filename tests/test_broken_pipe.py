"""`lamina build -o - . | head -c 100`: when stdout's reader goes, lamina ends as tar does.

Killed by SIGPIPE (the shell shows 141), nothing on stderr after the progress lines, no
traceback, no error line, and no file left behind (in the cache or beside the output).
A destination that is not a regular file (a FIFO, /proc/self/fd/1) is written through,
never replaced by a rename.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    """FROM scratch (no base image needed), 1 MB of content: far more than a pipe holds."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY big /big\n")
    (ctx / "big").write_bytes(os.urandom(1 << 20))
    return ctx


def lamina(cache: Path, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LAMINA_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "lamina", *args], env=env, stderr=subprocess.PIPE, **kwargs
    )


def head(proc: subprocess.Popen[bytes], size: int = 100) -> tuple[int, str]:
    """Read `size` bytes of stdout and close it, as `head -c` does; (status, stderr)."""
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(size)) == size
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    return proc.wait(timeout=120), stderr


def leftovers(*roots: Path) -> list[str]:
    return [str(p) for root in roots for p in root.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("output", ["-", "type=tar,dest=-", "type=oci,dest=-", "type=docker,dest=-"])
def test_build_to_a_closed_pipe_ends_as_tar_does(tmp_path: Path, ctx: Path, output: str) -> None:
    cache = tmp_path / "cache"
    proc = lamina(
        cache, "build", "--progress", "plain", "-o", output, str(ctx), stdout=subprocess.PIPE, cwd=tmp_path
    )
    status, stderr = head(proc)
    assert status == -signal.SIGPIPE, stderr
    assert "Traceback" not in stderr and "error:" not in stderr and "Broken pipe" not in stderr, stderr
    assert leftovers(cache, tmp_path) == []


def test_save_to_a_closed_pipe_ends_as_tar_does(tmp_path: Path, ctx: Path) -> None:
    cache = tmp_path / "cache"
    built = lamina(cache, "build", "-q", "-t", "pipe:1", str(ctx), stdout=subprocess.DEVNULL)
    assert built.wait(timeout=120) == 0
    proc = lamina(cache, "save", "pipe:1", "-o", "/proc/self/fd/1", stdout=subprocess.PIPE, cwd=tmp_path)
    status, stderr = head(proc)
    assert status == -signal.SIGPIPE, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    assert leftovers(cache, tmp_path) == []


def test_save_without_o_writes_stdout_and_refuses_a_terminal(tmp_path: Path, ctx: Path) -> None:
    # As docker save: `lamina save IMAGE > x.tar`, `lamina save IMAGE | ...`; never onto a terminal.
    import pty

    cache = tmp_path / "cache"
    assert lamina(cache, "build", "-q", "-t", "pipe:1", str(ctx), stdout=subprocess.DEVNULL).wait(120) == 0
    with open(tmp_path / "x.tar", "wb") as out:
        saved = lamina(cache, "save", "pipe:1", stdout=out)
        assert saved.wait(timeout=120) == 0
    loaded = lamina(tmp_path / "other", "load", str(tmp_path / "x.tar"), stdout=subprocess.PIPE)
    out, err = loaded.communicate(timeout=120)
    assert loaded.returncode == 0 and out.startswith(b"Loaded image: pipe:1"), err
    leader, follower = pty.openpty()
    try:
        proc = lamina(cache, "save", "pipe:1", stdout=follower)
        _, stderr = proc.communicate(timeout=120)
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 2 and stderr.decode().startswith("error: refusing to write an image archive"), (
        stderr
    )


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_save_through_a_pipe_writes_the_bytes_of_a_file(tmp_path: Path, ctx: Path, fmt: str) -> None:
    # `lamina save IMAGE | ...` streams the archive (no seek on a pipe): the same bytes as -o FILE.
    cache = tmp_path / "cache"
    assert lamina(cache, "build", "-q", "-t", "pipe:1", str(ctx), stdout=subprocess.DEVNULL).wait(120) == 0
    saved = lamina(cache, "save", "--format", fmt, "pipe:1", "-o", str(tmp_path / "x.tar"))
    assert saved.wait(timeout=120) == 0
    piped = lamina(cache, "save", "--format", fmt, "pipe:1", stdout=subprocess.PIPE)
    out, err = piped.communicate(timeout=120)
    assert piped.returncode == 0, err
    assert len(out) > 1 << 20 and out == (tmp_path / "x.tar").read_bytes()


def test_quiet_build_to_stdout_by_name_prints_the_id_on_stderr(tmp_path: Path, ctx: Path) -> None:
    # -o dest=/proc/self/fd/1 (or /dev/stdout) is stdout too: the image ID after the archive
    # would spoil it. (/proc/self/fd/1, not /dev/stdout: were the write a rename, /proc refuses.)
    import tarfile

    with open(tmp_path / "x.tar", "wb") as out:
        proc = lamina(
            tmp_path / "cache", "build", "-q", "-o", "type=oci,dest=/proc/self/fd/1", str(ctx), stdout=out
        )
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and stderr.decode().startswith("sha256:"), stderr
    with tarfile.open(tmp_path / "x.tar") as archive:
        assert "index.json" in archive.getnames()


def test_output_to_a_fifo_is_written_through(tmp_path: Path, ctx: Path) -> None:
    # A rename over the FIFO would replace it and the reader would get nothing.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = lamina(
        tmp_path / "cache", "build", "-q", "-o", f"type=oci,dest={fifo}", str(ctx), stdout=subprocess.DEVNULL
    )
    _, stderr = proc.communicate(timeout=120)
    reader.join(timeout=30)
    assert proc.returncode == 0, stderr
    assert fifo.is_fifo() and len(got[0]) > 1 << 20  # the archive, through the FIFO
    assert leftovers(tmp_path) == []


def test_another_error_with_stdout_gone_is_still_said(tmp_path: Path) -> None:
    # Only a write that broke on the gone reader is quiet: a missing image is an error line.
    proc = lamina(tmp_path / "cache", "save", "nosuch:1", "-o", "/proc/self/fd/1", stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and stderr.decode().startswith("error:"), stderr
