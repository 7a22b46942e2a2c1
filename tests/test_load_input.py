"""`lamina load` as docker load is typed: `-i FILE` / `--input FILE`, or a tar on stdin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lamina(cache: Path, *args: str, stdin: object = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LAMINA_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "lamina", *args],
        stdin=stdin,  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def _names(cache: Path) -> list[str]:
    return [line.split()[0] for line in _lamina(cache, "images").stdout.splitlines()[1:]]


@pytest.mark.parametrize("flag", ["-i", "--input"])
def test_load_reads_the_file_given_by_input(busybox_image: Path, tmp_path: Path, flag: str) -> None:
    done = _lamina(tmp_path / "cache", "load", flag, str(busybox_image))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Loaded image: lamina-test/busybox:1.35 (sha256:")
    assert _names(tmp_path / "cache") == ["lamina-test/busybox:1.35"]


def test_load_reads_a_tar_piped_to_stdin(busybox_image: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with open(busybox_image, "rb") as tar:
        done = _lamina(cache, "load", "-t", "piped:1", stdin=tar)
    assert done.returncode == 0, done.stderr
    assert _names(cache) == ["piped:1"]
    # save | load, as `docker save x | docker load`: the docker-archive from the pipe
    save = subprocess.Popen(
        [sys.executable, "-m", "lamina", "save", "piped:1", "--format", "docker"],
        stdout=subprocess.PIPE,
        env={**os.environ, "LAMINA_CACHE": str(cache)},
        cwd=ROOT,
    )
    other = tmp_path / "other"
    done = _lamina(other, "load", stdin=save.stdout)
    assert save.wait(timeout=120) == 0
    assert done.returncode == 0, done.stderr
    assert _names(other) == ["piped:1"]
    assert list((other / "tmp").iterdir()) == []  # the spooled copy went


def test_load_refuses_two_files_and_a_terminal_in_one_line(busybox_image: Path, tmp_path: Path) -> None:
    done = _lamina(tmp_path / "cache", "load", str(busybox_image), "-i", str(busybox_image))
    assert done.returncode == 2 and "give the file once: FILE or -i FILE" in done.stderr
    leader, follower = os.openpty()
    try:
        done = _lamina(tmp_path / "cache", "load", stdin=follower)
    finally:
        os.close(leader)
        os.close(follower)
    assert done.returncode == 2
    assert "no file given and stdin is a terminal: give FILE, -i FILE or pipe a tar" in done.stderr


def test_junk_on_stdin_is_one_line_naming_stdin(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"junk" * 300)
    with open(junk, "rb") as stdin:
        done = _lamina(tmp_path / "cache", "load", stdin=stdin)
    assert done.returncode == 1
    assert done.stderr.startswith("error: stdin: ") and done.stderr.count("\n") == 1, done.stderr
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
