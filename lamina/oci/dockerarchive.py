"""docker-archive: what `docker save` writes and `docker load` reads.

The format is a tar with `manifest.json` (a list of {Config, RepoTags,
Layers} with paths into the tar), the config files, the layer tars and a
legacy `repositories` file. Older dockers write `<id>/layer.tar`
uncompressed; docker 25 writes an OCI layout with `blobs/sha256/...`
paths; layers may be gzip or zstd. The reader takes all of these; the
writer writes the classic form (uncompressed `<diff_id>/layer.tar`), which
every docker and podman since 1.x loads.

A docker-archive has no image manifest: the reader makes an OCI one from
the config and the layers as found (deterministic, so loading the same
archive twice gives the same manifest digest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from lamina.errors import ImageFormatError
from lamina.oci.compression import Compression
from lamina.oci.digest import Digest
from lamina.oci.image import (
    MAX_DOCUMENT,
    OCI_CONFIG,
    Descriptor,
    ImageConfig,
    Manifest,
    descriptor_of,
)
from lamina.oci.layout import Files, SourceImage, archive_member, archive_writer, familiar_name, read_capped

_HEX_PATH = re.compile(r"(?:^|/)(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?$")


class DockerArchiveReader:
    """The images of a docker-archive (tar, or a directory of one unpacked)."""

    def __init__(self, files: Files) -> None:
        self.files = files
        self.label = files.label
        self._paths: dict[Digest, str] = {}

    def open_blob(self, digest: Digest) -> BinaryIO:
        try:
            return self.files.open(self._paths[digest])
        except KeyError:
            raise ImageFormatError(f"{self.label}: no blob {digest} (read images() first)") from None

    def blob_size(self, digest: Digest) -> int:
        return self.files.size(self._paths[digest])

    def images(self) -> tuple[SourceImage, ...]:
        if not self.files.exists("manifest.json"):
            raise ImageFormatError(f"{self.label}: no manifest.json: not a docker-archive")
        try:
            entries = json.loads(read_capped(self.files, "manifest.json"))
        except ValueError as err:
            raise ImageFormatError(f"{self.label}: manifest.json: not valid JSON: {err}") from err
        if not isinstance(entries, list):
            raise ImageFormatError(f"{self.label}: manifest.json: not a JSON list")
        return tuple(self._image(entry, i) for i, entry in enumerate(entries))

    def _image(self, entry: Any, i: int) -> SourceImage:
        what = f"{self.label}: manifest.json entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise ImageFormatError(f"{what}: no Config path")
        tags = entry.get("RepoTags") or []
        layer_paths = entry.get("Layers") or []
        if not all(isinstance(t, str) for t in tags) or not all(isinstance(p, str) for p in layer_paths):
            raise ImageFormatError(f"{what}: RepoTags and Layers must be lists of strings")
        config_path = _clean(entry["Config"])
        config_bytes = read_capped(self.files, config_path)
        config_digest = Digest.of_bytes(config_bytes)
        _check_named_digest(config_path, config_digest, what)
        config = ImageConfig.from_bytes(config_bytes, f"{what}: {config_path}")
        if len(config.diff_ids) != len(layer_paths):
            raise ImageFormatError(
                f"{what}: {len(layer_paths)} layers but the config lists {len(config.diff_ids)} diff_ids"
            )
        self._paths[config_digest] = config_path
        layers = []
        for path, diff_id in zip(map(_clean, layer_paths), config.diff_ids, strict=True):
            compression, digest, size = self._layer_facts(path, diff_id)
            self._paths[digest] = path
            layers.append(Descriptor(compression.media_type, digest, size))
        manifest = Manifest(descriptor_of(config_bytes, OCI_CONFIG), tuple(layers))
        manifest_bytes = manifest.to_bytes()
        descriptor = descriptor_of(manifest_bytes, manifest.media_type)
        return SourceImage(
            tuple(tags), descriptor, manifest_bytes, config_bytes, tuple(layers), config.diff_ids
        )

    def _layer_facts(self, path: str, diff_id: Digest) -> tuple[Compression, Digest, int]:
        """Compression, blob digest and size of one layer file."""
        size = self.files.size(path)
        with self.files.open(path) as f:
            compression = Compression.sniff(f.read(4))
        named = _HEX_PATH.search(path)
        if named and path.startswith("blobs/"):
            return compression, Digest("sha256", named.group(1)), size  # checked when copied
        if compression is Compression.NONE:
            return compression, diff_id, size  # an uncompressed layer is its diff_id; checked when copied
        with self.files.open(path) as f:
            digest = hashlib.file_digest(f, "sha256")
        return compression, Digest("sha256", digest.hexdigest()), size


def _clean(path: str) -> str:
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def _check_named_digest(path: str, digest: Digest, what: str) -> None:
    named = _HEX_PATH.search(path)
    if named and named.group(1) != digest.hex:
        raise ImageFormatError(f"{what}: {path} hashes to {digest}, not the digest in its name")


# --- writing ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DockerLayer:
    """An uncompressed layer tar: its diff_id, exact size, and a way to read it."""

    diff_id: Digest
    size: int
    open: Callable[[], BinaryIO] = dataclasses.field(compare=False)


@dataclasses.dataclass(frozen=True, slots=True)
class DockerImage:
    names: tuple[str, ...]  # full references; written as docker's short RepoTags
    config_bytes: bytes
    layers: tuple[DockerLayer, ...]


def write_docker_archive(out: BinaryIO, images: Sequence[DockerImage]) -> None:
    """Write a docker-archive of `images` to `out`, members sorted, times and owners fixed."""
    files: dict[str, tuple[int, Callable[[], BinaryIO]]] = {}
    manifest: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    for image in images:
        if len(image.config_bytes) > MAX_DOCUMENT:
            raise ImageFormatError(f"image config of {len(image.config_bytes)} bytes is too large")
        config_name = f"{Digest.of_bytes(image.config_bytes).hex}.json"
        files[config_name] = (len(image.config_bytes), _bytes_opener(image.config_bytes))
        layer_names = []
        for layer in image.layers:
            name = f"{layer.diff_id.hex}/layer.tar"
            files[name] = (layer.size, layer.open)
            layer_names.append(name)
        tags = [familiar_name(n) for n in image.names if "@" not in n]
        manifest.append({"Config": config_name, "RepoTags": tags, "Layers": layer_names})
        for tag in tags:
            repo, _, version = tag.rpartition(":")
            if image.layers:
                repositories.setdefault(repo, {})[version] = image.layers[-1].diff_id.hex
    files["manifest.json"] = _document(manifest)
    files["repositories"] = _document(dict(sorted(repositories.items())))
    directories = sorted({name.rsplit("/", 1)[0] for name in files if "/" in name})
    with archive_writer(out) as tar:
        members = [(d, None) for d in directories] + [(n, files[n]) for n in files]
        for name, content in sorted(members, key=lambda m: m[0]):
            if content is None:
                tar.addfile(archive_member(name, tarfile.DIRTYPE, 0))
                continue
            size, opener = content
            with opener() as stream:
                tar.addfile(archive_member(name, tarfile.REGTYPE, size), stream)


def _bytes_opener(data: bytes) -> Callable[[], BinaryIO]:
    return lambda: io.BytesIO(data)


def _document(obj: Any) -> tuple[int, Callable[[], BinaryIO]]:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return len(data), _bytes_opener(data)
