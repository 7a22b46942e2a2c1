"""Contexts and Dockerfiles that are not a local directory and file: `-f -`, a context of `-`."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.build import BASE, ROOT, write_context

pytestmark = pytest.mark.sandbox


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
    assert (out / "ctx/secret.txt").read_text() == "ignored\n", "BuildKit filters no tar context"
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


def test_errors_name_a_fetched_dockerfile_by_its_path_in_the_context(cache: Path, tmp_path: Path) -> None:
    """As BuildKit: 'Dockerfile:2' for -f -, 'sub/x.Dockerfile:2' in a tar context; never the
    scratch directory the context was unpacked into (was: /tmp/lamina-context-XXX/stdin/...)."""
    bad = b"FROM scratch\nFROOM x\n"
    proc = lamina("build", "-f", "-", str(tmp_path), cache=cache, stdin=bad)
    assert proc.stderr.decode().splitlines()[0] == (
        "error: Dockerfile:2: unknown instruction: FROOM (did you mean FROM?)"
    )
    proc = lamina("build", "-f", "sub/x.Dockerfile", "-", cache=cache, stdin=_tar({"sub/x.Dockerfile": bad}))
    assert proc.stderr.decode().splitlines()[0] == (
        "error: sub/x.Dockerfile:2: unknown instruction: FROOM (did you mean FROM?)"
    )
    proc = lamina("build", "--check", "-f", "-", str(tmp_path), cache=cache, stdin=b"FROM scratch\nENV a b\n")
    assert "\nDockerfile:2\n" in proc.stdout.decode(), proc.stdout.decode()


# --- --build-context -----------------------------------------------------------------------


def _build(cache: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    proc = lamina("build", *args, cache=cache)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_build_context_dir_replaces_image_and_stage(cache: Path, tmp_path: Path) -> None:
    extra = write_context(
        tmp_path / "extra", "", {"hello.txt": "from extra\n", ".dockerignore": "Dockerfile\n"}
    )
    text = f"""\
FROM {BASE} AS deps
RUN exit 3
FROM {BASE}
COPY --from=deps /hello.txt /from-stage
COPY --from=tools /hello.txt /from-image
RUN --mount=from=tools,target=/t cat /t/hello.txt > /from-mount
"""
    ctx = write_context(tmp_path / "ctx", text)
    out = tmp_path / "out"
    flags = ("--build-context", f"deps={extra}", "--build-context", f"tools={extra}")
    _build(cache, *flags, "-o", f"type=local,dest={out}", str(ctx))
    for name in ("from-stage", "from-image", "from-mount"):
        assert (out / name).read_text() == "from extra\n", name
    # the directory is an image of its files: owners 0:0, its .dockerignore applied
    out2 = tmp_path / "out2"
    ctx2 = write_context(tmp_path / "ctx2", "FROM tools\n")
    _build(cache, "--build-context", f"tools={extra}", "-o", f"type=local,dest={out2}", str(ctx2))
    assert sorted(p.name for p in out2.iterdir()) == [".dockerignore", "hello.txt"]
    proc = lamina("images", cache=cache)
    assert b"lamina-build-context" not in proc.stdout, "the stand-in images are untagged afterwards"


def test_build_context_docker_image_replaces_from(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM alpine:3.19\nRUN busybox --help | head -1 > /which\n")
    out = tmp_path / "out"
    _build(
        cache,
        "--build-context",
        f"alpine:3.19=docker-image://{BASE}",
        "-o",
        f"type=local,dest={out}",
        str(ctx),
    )
    assert (out / "which").read_text().startswith("BusyBox")


def test_build_context_oci_layout(cache: Path, tmp_path: Path) -> None:
    src = write_context(tmp_path / "src", f"FROM {BASE}\nRUN echo layout > /marker\n")
    archive = tmp_path / "img.tar"
    _build(cache, "-t", "made:1", "-o", f"type=oci,dest={archive}", str(src))
    layout = tmp_path / "layout"
    with tarfile.open(archive) as tar:
        tar.extractall(layout)  # the archive lamina just wrote
    import json

    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    ctx = write_context(tmp_path / "ctx", "FROM base\nRUN cat /marker > /seen\n")
    for value in (f"oci-layout://{layout}@{digest}", f"oci-layout://{layout}:1"):
        out = tmp_path / f"out-{value[-1]}"
        _build(cache, "--build-context", f"base={value}", "-o", f"type=local,dest={out}", str(ctx))
        assert (out / "seen").read_text() == "layout\n", value


def test_build_context_dir_change_is_seen_by_a_rebuild(cache: Path, tmp_path: Path) -> None:
    extra = write_context(tmp_path / "extra", "", {"v.txt": "one\n"})
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY --from=extra /v.txt /v.txt\n")
    _build(cache, "--build-context", f"extra={extra}", "-t", "ctxtest:1", str(ctx))
    (extra / "v.txt").write_text("two\n")
    _build(cache, "--build-context", f"extra={extra}", "-t", "ctxtest:1", str(ctx))
    out = tmp_path / "out"
    _build(cache, "--build-context", f"extra={extra}", "-o", f"type=local,dest={out}", str(ctx))
    assert (out / "v.txt").read_text() == "two\n"
    proc = lamina("run", "ctxtest:1", "cat", "/v.txt", cache=cache)
    assert proc.stdout == b"two\n", "the no-op replay did not keep the old image"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x=target:other", "only a directory, a git or http(s) URL, docker-image:// or oci-layout://"),
        ("x=/nonexistent/dir", "/nonexistent/dir is not a directory"),
        ("novalue", "expected NAME=VALUE"),
    ],
)
def test_build_context_refusals(cache: Path, tmp_path: Path, value: str, message: str) -> None:
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\n")
    proc = lamina("build", "--build-context", value, str(ctx), cache=cache)
    assert proc.returncode == 1
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    assert message in proc.stderr.decode()


def test_tar_context_dockerfile_symlink_out_is_refused(cache: Path, tmp_path: Path) -> None:
    """A hostile tar's Dockerfile -> /etc/passwd must not make the build read the host's file."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        link = tarfile.TarInfo("Dockerfile")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    proc = lamina("build", "-", cache=cache, stdin=out.getvalue())
    assert proc.returncode == 1
    message = "error: Dockerfile Dockerfile: a symlink that points outside of the build context"
    assert proc.stderr.decode().strip() == message
