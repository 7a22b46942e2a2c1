"""Trust nothing: recompute every digest, diff_id and size of an image from its bytes.

`validate_image(path)` opens an OCI archive, layout directory or
docker-archive, and checks, for every image in it:
- the manifest and config blobs hash to their descriptors (done on read);
- every layer blob has its descriptor's size and digest, decompresses as
  its media type says, is a readable tar with no absolute or `..` member
  names, and its uncompressed bytes hash to the config's diff_id;
- the config's extra rules the JSON schema does not check: `created` and
  history times are RFC 3339, every `Env` entry is `NAME=value`;
- in an OCI tarball that carries docker's `manifest.json`, that its
  Config and Layers paths exist.
Every problem is gathered and raised as one ImageFormatError.
"""

from __future__ import annotations

import functools
import json
import tarfile
from pathlib import Path
from typing import BinaryIO

from lamina.errors import ImageFormatError, LaminaError, LayerError
from lamina.oci.compression import Compression
from lamina.oci.image import ImageConfig, is_env_entry, is_rfc3339
from lamina.oci.layer import describe_layer
from lamina.oci.layout import BlobSource, Files, SourceImage, read_capped


def config_problems(config_bytes: bytes, what: str = "config") -> list[str]:
    """Rules of the image config that the JSON schema leaves out."""
    problems: list[str] = []
    try:
        config = ImageConfig.from_bytes(config_bytes, what)
    except ImageFormatError as err:
        return [str(err)]
    if config.created is not None and not is_rfc3339(config.created):
        problems.append(f"{what}: created {config.created!r} is not an RFC 3339 time")
    for i, history in enumerate(config.history):
        if history.created is not None and not is_rfc3339(history.created):
            problems.append(f"{what}: history {i} created {history.created!r} is not an RFC 3339 time")
    for entry in config.config.env:
        if not is_env_entry(entry):
            problems.append(f"{what}: Env entry {entry!r} is not NAME=value")
    if not config.architecture or not config.os:
        problems.append(f"{what}: architecture and os are required")
    return problems


def layer_problems(source: BlobSource, image: SourceImage) -> list[str]:
    """Recompute digest, size and diff_id of every layer of `image` from `source`'s blobs."""
    problems: list[str] = []
    if len(image.layers) != len(image.diff_ids):
        problems.append(f"{len(image.layers)} layers but {len(image.diff_ids)} diff_ids")
    for i, (layer, diff_id) in enumerate(zip(image.layers, image.diff_ids, strict=False)):
        what = f"layer {i} ({layer.digest.short})"
        try:
            compression = Compression.from_media_type(layer.media_type)
        except LayerError as err:
            problems.append(f"{what}: {err}")
            continue

        check = functools.partial(_check_members, what=what, problems=problems)
        try:
            with source.open_blob(layer.digest) as blob:
                info = describe_layer(blob, compression, check)
        except LaminaError as err:
            problems.append(f"{what}: {err}")
            continue
        if info.size != layer.size:
            problems.append(f"{what}: {info.size} bytes, descriptor says {layer.size}")
        if info.digest != layer.digest:
            problems.append(f"{what}: blob hashes to {info.digest}, not {layer.digest}")
        if info.diff_id != diff_id:
            problems.append(f"{what}: uncompressed tar hashes to {info.diff_id}, not {diff_id}")
    return problems


def _check_members(tar_bytes: BinaryIO, what: str, problems: list[str]) -> None:
    try:
        from lamina.oci.extract import BoundedTarInfo

        with tarfile.open(fileobj=tar_bytes, mode="r|", tarinfo=BoundedTarInfo) as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.name.startswith("/") or ".." in parts:
                    problems.append(f"{what}: member {member.name!r} escapes the root")
    except tarfile.TarError as err:
        problems.append(f"{what}: not a readable tar: {err}")


def _docker_manifest_problems(files: Files) -> list[str]:
    if not files.exists("manifest.json"):
        return []
    try:
        entries = json.loads(read_capped(files, "manifest.json"))
    except (ValueError, ImageFormatError) as err:
        return [f"manifest.json: not valid JSON: {err}"]
    problems = []
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        for path in [entry.get("Config", ""), *entry.get("Layers", [])]:
            if not isinstance(path, str) or not files.exists(path):
                problems.append(f"manifest.json entry {i}: {path!r} is not in the archive")
    return problems


def validate_image(path: Path) -> tuple[SourceImage, ...]:
    """Check every image in `path`; return them, or raise one error listing every problem."""
    from lamina.oci.archive import open_image_source
    from lamina.oci.layout import LayoutReader

    problems: list[str] = []
    with open_image_source(path) as source:
        images = source.images()
        if not images:
            problems.append("holds no image")
        for image in images:
            label = f"image {image.manifest.digest.short}"
            problems += [f"{label}: {p}" for p in image_problems(source, image)]
        if isinstance(source, LayoutReader):
            problems += _docker_manifest_problems(source.files)
    raise_problems(str(path), problems)
    return images


def image_problems(source: BlobSource, image: SourceImage) -> list[str]:
    """Every problem of one image's config and layers."""
    return config_problems(image.config_bytes) + layer_problems(source, image)


def raise_problems(label: str, problems: list[str]) -> None:
    """One ImageFormatError listing every problem, if there is any."""
    if problems:
        raise ImageFormatError(f"{label}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
