"""Which Dockerfile and ignore file a build reads (lamina.engine.buildfiles), on a fake file system.

Path logic only, so pyfakefs stands in for the context directory: each case
is the set of files present, and what the build must pick among them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from lamina.engine.buildfiles import default_dockerfile, dockerfile_ignore_file

CTX = Path("/ctx")


@pytest.mark.parametrize(
    ("present", "picked"),
    [
        (["Dockerfile"], "Dockerfile"),
        (["dockerfile"], "dockerfile"),  # BuildKit's dockerui falls back to the lower-case name
        (["Dockerfile", "dockerfile"], "Dockerfile"),  # the usual name wins when both exist
        ([], "Dockerfile"),  # nothing there: the build names the usual one in its error
    ],
    ids=["upper", "lower-only", "both", "none"],
)
def test_default_dockerfile(fs: FakeFilesystem, present: list[str], picked: str) -> None:
    fs.create_dir(CTX)
    for name in present:
        fs.create_file(CTX / name, contents="FROM scratch\n")
    assert default_dockerfile(CTX) == CTX / picked


def test_a_directory_named_dockerfile_is_not_taken_for_one(fs: FakeFilesystem) -> None:
    fs.create_dir(CTX / "dockerfile")
    assert default_dockerfile(CTX) == CTX / "Dockerfile"


def test_ignore_file_is_named_after_the_dockerfile_asked_for(fs: FakeFilesystem) -> None:
    fs.create_file(CTX / "build" / "app.Dockerfile")
    wanted = CTX / "build" / "app.Dockerfile.dockerignore"
    assert dockerfile_ignore_file(CTX, CTX / "build" / "app.Dockerfile") == wanted
    assert dockerfile_ignore_file(CTX, None) == CTX / "Dockerfile.dockerignore"


def test_lower_case_fallback_keeps_the_default_ignore_file_name(fs: FakeFilesystem) -> None:
    fs.create_file(CTX / "dockerfile")
    picked = default_dockerfile(CTX)
    assert dockerfile_ignore_file(CTX, picked) == CTX / "Dockerfile.dockerignore"
    # Asked for by name (-f dockerfile) while `Dockerfile` exists, it is a Dockerfile of its own.
    fs.create_file(CTX / "Dockerfile")
    assert dockerfile_ignore_file(CTX, CTX / "dockerfile") == CTX / "dockerfile.dockerignore"
