"""An output that cannot be written: the one error line names the path the user gave.

Outputs are written under a temporary name beside (or inside) the destination and
renamed when complete; a failure must still name the destination, never the
temporary file the user has never heard of. The destination is a directory the
build's user cannot write: as root, the build runs as nobody (root writes anywhere).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nobody import as_nobody

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def top() -> Iterator[Path]:
    """A context (FROM scratch: no base image needed) and a read-only directory, where nobody reaches."""
    # pytest's own tmp dirs are private to root: nobody could not even read the context there.
    where = Path(tempfile.mkdtemp(prefix="lamina-unwritable-"))
    try:
        where.chmod(0o777)
        (where / "ctx").mkdir(mode=0o755)
        (where / "ctx" / "Dockerfile").write_text("FROM scratch\nCOPY a.txt /a.txt\n")
        (where / "ctx" / "a.txt").write_text("alpha\n")
        for path in (where / "ctx", where / "ctx" / "Dockerfile", where / "ctx" / "a.txt"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (where / "ro").mkdir()
        (where / "ro").chmod(0o555)
        yield where
    finally:
        (where / "ro").chmod(0o755)
        shutil.rmtree(where)


def lamina(top: Path, *args: str) -> subprocess.CompletedProcess[str]:
    prefix = as_nobody("root writes anywhere")
    env = {
        **os.environ,
        "LAMINA_CACHE": str(top / "cache"),
        "HOME": str(top),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [*prefix, sys.executable, "-m", "lamina", *args], capture_output=True, text=True, env=env, cwd=top
    )


@pytest.mark.parametrize(
    ("output", "dest"),
    [
        ("type=oci,dest={ro}/out.tar", "{ro}/out.tar"),
        ("type=docker,dest={ro}/out.tar", "{ro}/out.tar"),
        ("type=tar,dest={ro}/out.tar", "{ro}/out.tar"),
        ("type=local,dest={ro}/out", "{ro}/out"),
        ("{ro}/out", "{ro}/out"),
        ("type=oci,dest={ro}/layout,tar=false", "{ro}/layout"),
    ],
    ids=["oci", "docker", "tar", "local", "path", "oci-layout"],
)
def test_unwritable_output_names_its_dest(top: Path, output: str, dest: str) -> None:
    ro = top / "ro"
    proc = lamina(top, "build", "--progress", "plain", "-o", output.format(ro=ro), str(top / "ctx"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and errors[0].endswith(f": {dest.format(ro=ro)}: Permission denied"), proc.stderr
    assert ".tmp" not in proc.stderr, proc.stderr
    assert os.listdir(ro) == []


def test_unwritable_local_cache_names_the_blob(top: Path) -> None:
    # --cache-to type=local into a layout whose blobs/sha256 this user cannot write.
    dest = top / "cache-layout"
    (dest / "blobs" / "sha256").mkdir(parents=True)
    dest.chmod(0o777)
    (dest / "blobs").chmod(0o777)
    (dest / "blobs" / "sha256").chmod(0o555)
    proc = lamina(top, "build", "-q", "--cache-to", f"type=local,dest={dest}", str(top / "ctx"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert f"{dest}/blobs/sha256/" in errors[0] and errors[0].endswith(": Permission denied"), proc.stderr
    assert ".tmp" not in proc.stderr, proc.stderr


def test_a_cache_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM scratch\n")
    env = {**os.environ, "LAMINA_CACHE": str(tmp_path / "file" / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "lamina", "build", str(tmp_path / "ctx")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode != 0
    (line,) = done.stderr.splitlines()  # one line, never a traceback
    assert line.startswith(f"error: open store {tmp_path}/file/cache: ") and "Not a directory" in line
