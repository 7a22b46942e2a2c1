"""Open any image file lamina can load: OCI archive, OCI layout dir, docker-archive.

`open_image_source(path)` looks at what is there and returns an
`ImageSource`: the images it holds (documents read and checked) and
`open_blob(digest)` for their blobs. A tarball that is both an OCI layout
and a docker-archive (lamina's own `save` output, docker 25's `save`) is
read as the OCI layout, which carries the manifests' real digests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from lamina.errors import ImageFormatError
from lamina.oci.digest import Digest
from lamina.oci.dockerarchive import DockerArchiveReader
from lamina.oci.layout import DirFiles, Files, LayoutReader, SourceImage, TarFiles


class ImageSource(Protocol):
    label: str

    def images(self) -> tuple[SourceImage, ...]: ...

    def open_blob(self, digest: Digest) -> BinaryIO: ...

    def blob_size(self, digest: Digest) -> int: ...


def detect(files: Files) -> str:
    """ "oci" or "docker" for what `files` hold; ImageFormatError when neither."""
    if files.exists("oci-layout") and files.exists("index.json"):
        return "oci"
    if files.exists("manifest.json"):
        return "docker"
    raise ImageFormatError(
        f"{files.label}: neither an OCI layout (oci-layout, index.json) nor a docker-archive (manifest.json)"
    )


def reader_for(files: Files) -> ImageSource:
    if detect(files) == "oci":
        return LayoutReader(files)
    return DockerArchiveReader(files)


@contextlib.contextmanager
def open_image_source(path: Path) -> Iterator[ImageSource]:
    """The images in `path` (a tar file, plain or gzipped, or a directory)."""
    if path.is_dir():
        yield reader_for(DirFiles(path))
        return
    if not path.exists():
        raise ImageFormatError(f"{path}: no such file or directory")
    tar = TarFiles(path)
    try:
        yield reader_for(tar)
    finally:
        tar.close()
