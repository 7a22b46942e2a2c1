"""Bounded inputs: every limit on what a build reads stops it quickly with one error line naming
the Dockerfile, the line and the limit (Dockerfile size, line length, number of stages,
heredoc size, expanded words, context entries and depth)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lamina.engine.dockerfile.instructions import MAX_STAGES
from lamina.engine.dockerfile.parser import MAX_DOCKERFILE_BYTES, MAX_HEREDOC_BYTES, MAX_LINE_BYTES
from tests.support.build import BASE, make_cache, run_cli, write_context


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line (build-check warnings may come before it)."""
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[:2000]
    assert len(lines[0]) < 1000, lines[0][:2000]
    return lines[0]


def refused(tmp_path: Path, text: str | bytes, *commands: str) -> list[str]:
    """The error line of `lamina build` (and of `lamina parse` and `lamina plan`) on `text`."""
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_bytes(text if isinstance(text, bytes) else text.encode())
    lines = []
    for command in commands or ("build", "parse", "plan"):
        proc = run_cli(command, str(ctx), cache=tmp_path / "cache", check=False, timeout=120)
        lines.append(one_error(proc))
    return lines


def test_dockerfile_larger_than_the_limit(tmp_path: Path) -> None:
    line = "RUN echo this line is repeated until the file is too large\n"
    count = MAX_DOCKERFILE_BYTES // len(line) + 10
    text = "FROM scratch\n" + line * count
    crossing = len(text.encode()[:MAX_DOCKERFILE_BYTES].split(b"\n"))
    dockerfile = tmp_path / "ctx" / "Dockerfile"
    for error in refused(tmp_path, text):
        assert error == (
            f"error: {dockerfile}:{crossing}: the Dockerfile is larger than {MAX_DOCKERFILE_BYTES} bytes"
            " (lamina's limit, 8 MiB)"
        )


def test_a_huge_sparse_dockerfile_is_not_read_whole(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    with open(ctx / "Dockerfile", "wb") as f:
        f.write(b"FROM scratch\n")
        f.truncate(64 << 30)  # 64 GiB of zeros, no disk used: an unbounded read never ends
    proc = run_cli("build", str(ctx), cache=tmp_path / "cache", check=False, timeout=120)
    assert "Dockerfile:2: the Dockerfile is larger than" in one_error(proc)


def test_line_longer_than_the_limit(tmp_path: Path) -> None:
    text = f"FROM scratch\nLABEL a=b\nLABEL x={'y' * MAX_LINE_BYTES}\n"
    for error in refused(tmp_path, text):
        assert error.endswith(
            f"Dockerfile:3: dockerfile line greater than max allowed size of {MAX_LINE_BYTES - 1}"
        )


def test_more_stages_than_the_limit(tmp_path: Path) -> None:
    text = "".join(f"FROM scratch AS s{i}\nLABEL i={i}\n" for i in range(MAX_STAGES + 1))
    for error in refused(tmp_path, text, "build", "plan"):  # parse is syntax only: no stages
        assert error.endswith(
            f"Dockerfile:{2 * MAX_STAGES + 1}: more than {MAX_STAGES} stages (lamina's limit)"
        )


def test_as_many_stages_as_the_limit_plan(tmp_path: Path) -> None:
    text = "FROM scratch AS s0\n" + "".join(f"FROM s{i - 1} AS s{i}\n" for i in range(1, MAX_STAGES))
    (tmp_path / "Dockerfile").write_text(text)
    proc = run_cli("plan", str(tmp_path), cache=tmp_path / "cache", check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_heredoc_larger_than_the_limit(tmp_path: Path) -> None:
    body = "echo a line of the script\n" * (MAX_HEREDOC_BYTES // 26 + 2)
    text = f"FROM scratch\nCOPY <<EOF /script\n{body}EOF\n"
    crossing = 2 + MAX_HEREDOC_BYTES // 26 + 1
    for error in refused(tmp_path, text):
        limit = f"heredoc EOF is larger than {MAX_HEREDOC_BYTES} bytes (lamina's limit, 4 MiB)"
        assert error.endswith(f"Dockerfile:{crossing}: {limit}")


def test_expansion_larger_than_the_limit(tmp_path: Path) -> None:
    lines = ["FROM scratch", "ENV A=aaaaaaaaaaaaaaaa"]
    lines += [f"ENV {chr(66 + i)}=" + f"${{{chr(65 + i)}}}" * 16 for i in range(6)]
    (error,) = refused(tmp_path, "\n".join(lines) + "\n", "build")
    assert "Dockerfile:7: " in error and "(lamina's limit, 4 MiB)" in error  # F: 16 MiB


def test_context_deeper_than_the_limit(tmp_path: Path, busybox_image: Path) -> None:
    from lamina.engine.context import MAX_CONTEXT_DEPTH
    from lamina.oci.safepath import remove_tree

    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nLABEL a=b\nCOPY d /d\n")
    fd = os.open(ctx, os.O_RDONLY)
    try:  # one level at a time through a dir fd: the whole path is longer than PATH_MAX allows
        for _ in range(MAX_CONTEXT_DEPTH + 2):  # d, and MAX + 1 levels below it
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    try:
        error = one_error(run_cli("build", "-q", str(ctx), cache=cache, check=False, timeout=300))
    finally:
        remove_tree(ctx / "d")  # no recursion: pytest's cleanup (shutil.rmtree) recurses too deep
    assert error.startswith(f"error: {ctx / 'Dockerfile'}:3: ")
    assert error.endswith(f"...: more than {MAX_CONTEXT_DEPTH} directory levels deep (lamina's limit)")


def test_context_with_more_entries_than_the_limit(
    tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real limit is a million entries; the test lowers it to 50 (the same code path)."""
    from lamina import api
    from lamina.engine import context
    from lamina.engine.steps.copyadd import dirkeys  # noqa: F401 -- imported before the limit moves, as in a full run
    from lamina.errors import LaminaError

    monkeypatch.setattr(context, "MAX_CONTEXT_ENTRIES", 50)
    cache = make_cache(tmp_path, busybox_image)
    files = {f"src/big/f{i:03}": "x" for i in range(40)} | {f"src/keep/f{i:03}": "x" for i in range(20)}
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY src /src\n", files)
    with pytest.raises(LaminaError) as caught:
        api.build(ctx, cache_dir=cache, environ={})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{ctx / 'Dockerfile'}:2: ")
    assert message.endswith(
        "src: more than 50 files and directories (lamina's limit): leave some out with .dockerignore"
    )
    (ctx / ".dockerignore").write_text("src/big\n")  # what the message says to do
    api.build(ctx, cache_dir=cache, environ={})  # a directory left out is not walked
