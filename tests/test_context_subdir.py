"""lamina.build(context_subdir=...): BuildKit's frontend attribute `contextsubdir` for a remote
context, and an absolute -f beside a URL context (buildx's `dockerfilekey`); engine.contextsource."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from lamina.errors import LaminaError
from tests.support.build import BASE, build, make_cache
from tests.support.servers import serve_directory


def _tar(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))


def test_the_dockerfile_is_named_from_the_top_of_the_context_not_the_subdir(
    tmp_path: Path, busybox_image: Path
) -> None:
    """dockerui scopes the context only: `Dockerfile` is the tar's own, COPY reads sub/dir."""
    cache = make_cache(tmp_path, busybox_image)
    (tmp_path / "www").mkdir()
    _tar(
        tmp_path / "www" / "ctx.tar",
        {"Dockerfile": "FROM scratch\nCOPY foo /bar\n", "foo": "top", "sub/dir/foo": "scoped"},
    )
    out = tmp_path / "out"
    with serve_directory(tmp_path / "www") as url:
        build(cache, f"{url}/ctx.tar", context_subdir="sub/dir", outputs=[f"type=local,dest={out}"])
    assert (out / "bar").read_text() == "scoped"


@pytest.mark.parametrize(
    "subdir, message",
    [("missing", "not a directory of the build context"), ("../..", "outside of the build context")],
)
def test_a_subdir_that_is_not_a_directory_inside_the_context_is_refused(
    tmp_path: Path, busybox_image: Path, subdir: str, message: str
) -> None:
    cache = make_cache(tmp_path, busybox_image)
    (tmp_path / "www").mkdir()
    _tar(tmp_path / "www" / "ctx.tar", {"Dockerfile": f"FROM {BASE}\n", "sub/foo": "x"})
    with serve_directory(tmp_path / "www") as url, pytest.raises(LaminaError, match=message):
        build(cache, f"{url}/ctx.tar", context_subdir=subdir)


def test_a_local_context_takes_no_subdir(tmp_path: Path, busybox_image: Path) -> None:
    """BuildKit applies contextsubdir to a fetched context only; a local one is named whole."""
    cache = make_cache(tmp_path, busybox_image)
    (tmp_path / "ctx" / "sub").mkdir(parents=True)
    (tmp_path / "ctx" / "Dockerfile").write_text(f"FROM {BASE}\n")
    with pytest.raises(LaminaError, match=r"only a remote context .* give .*ctx/sub as the context"):
        build(cache, tmp_path / "ctx", context_subdir="sub")
