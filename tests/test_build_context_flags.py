"""Contexts and Dockerfiles that are not a local directory and file: `-f -`, a context of `-`."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_build_helpers import BASE, ROOT, make_cache, write_context

pytestmark = pytest.mark.sandbox


@pytest.fixture
def cache(tmp_path: Path, busybox_image: Path) -> Path:
    return make_cache(tmp_path, busybox_image)


def lamina(*args: str, cache: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    import os

    env = {**os.environ, "LAMINA_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run(
        [sys.executable, "-m", "lamina", *args], input=stdin, capture_output=True, env=env, cwd=ROOT
    )


def _tar(files: dict[str, bytes], mode: str = "w") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_dockerfile_from_stdin_with_a_context_dir(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\n", {"data.txt": "from the context\n"})
    out = tmp_path / "out"
    dockerfile = f"FROM {BASE}\nCOPY data.txt /got\n".encode()
    proc = lamina("build", "-f", "-", "-o", f"type=local,dest={out}", str(ctx), cache=cache, stdin=dockerfile)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (out / "got").read_text() == "from the context\n"


def test_context_of_stdin_is_a_dockerfile_and_an_empty_context(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dockerfile = f"FROM {BASE}\nRUN echo built > /built\nCOPY . /ctx/\n".encode()
    proc = lamina("build", "-o", f"type=local,dest={out}", "-", cache=cache, stdin=dockerfile)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (out / "built").read_text() == "built\n"
    assert list((out / "ctx").iterdir()) == [], "the context is empty"


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz", "w:bz2"])
def test_context_of_stdin_is_a_tar(cache: Path, tmp_path: Path, mode: str) -> None:
    files = {
        "Dockerfile": f"FROM {BASE}\nCOPY . /ctx/\n".encode(),
        "sub/other.Dockerfile": f"FROM {BASE}\nCOPY app.txt /other\n".encode(),
        "app.txt": b"app\n",
        ".dockerignore": b"secret.txt\n",
        "secret.txt": b"ignored\n",
    }
    out = tmp_path / "out"
    proc = lamina("build", "-o", f"type=local,dest={out}", "-", cache=cache, stdin=_tar(files, mode))
    assert proc.returncode == 0, proc.stderr.decode()
    assert (out / "ctx/app.txt").read_text() == "app\n"
    assert not (out / "ctx/secret.txt").exists(), "the tar's .dockerignore applies"
    # -f names a file inside the tar, as buildx sends it to BuildKit
    out2 = tmp_path / "out2"
    args = ("build", "-f", "sub/other.Dockerfile", "-o", f"type=local,dest={out2}", "-")
    proc = lamina(*args, cache=cache, stdin=_tar(files, mode))
    assert proc.returncode == 0, proc.stderr.decode()
    assert (out2 / "other").read_text() == "app\n"


def test_hostile_tar_on_stdin_is_refused(cache: Path, tmp_path: Path) -> None:
    bad = _tar({"Dockerfile": f"FROM {BASE}\n".encode(), "../escape.txt": b"x"})
    proc = lamina("build", "-", cache=cache, stdin=bad)
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("error: build context from stdin: ")
    assert not (tmp_path.parent / "escape.txt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-f", "-", "-"), "error: invalid argument: can't use stdin for both build context and dockerfile"),
        (
            ("-f", "Dockerfile", "-"),
            "error: ambiguous Dockerfile source: both stdin and flag correspond to Dockerfiles",
        ),
    ],
)
def test_stdin_refusals(cache: Path, args: tuple[str, ...], message: str) -> None:
    proc = lamina("build", *args, cache=cache, stdin=f"FROM {BASE}\n".encode())
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == message
