"""Which files of the context directory the build reads for itself: its Dockerfile and ignore file.

Path logic only, imported by the no-op replay too, so it imports nothing.
"""

from __future__ import annotations

from pathlib import Path


def default_dockerfile(root: Path) -> Path:
    """The Dockerfile of a build given no `-f`: `Dockerfile`, else `dockerfile`.

    BuildKit's dockerui falls back to the lower-case name when `Dockerfile`
    cannot be read (moby/moby#10858). Its ignore file stays
    `Dockerfile.dockerignore`, the default name's, as there.
    """
    default = root / "Dockerfile"
    lower = root / "dockerfile"
    if not default.exists() and lower.is_file():
        return lower
    return default


def dockerfile_ignore_file(root: Path, dockerfile: Path | None) -> Path:
    """`<Dockerfile>.dockerignore`: the ignore file of this Dockerfile, which wins over `.dockerignore`.

    BuildKit names it after the Dockerfile asked for, so the lower-case
    fallback keeps `Dockerfile.dockerignore`.
    """
    if dockerfile is None or (dockerfile.name == "dockerfile" and dockerfile == default_dockerfile(root)):
        dockerfile = root / "Dockerfile"
    return dockerfile.with_name(dockerfile.name + ".dockerignore")
