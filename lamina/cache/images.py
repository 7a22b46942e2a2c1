"""Images in the store: load them in, make them, write them out.

The source/destination split of pypa/installer: `lamina.oci.archive` says
what an image file offers, the `Store` is where its blobs go, and these
functions join the two. Nothing here parses a tar member name or a
Dockerfile.

- `load_image_file(store, path, name)`: every image of an OCI archive, OCI
  layout or docker-archive into the store, each blob verified as it is
  copied (digest, size, and for layers the diff_id of the uncompressed
  tar, in the same pass).
- `commit_image(store, config, layers, names)`: a new image from a config
  and layer blobs already in the store (what a build ends with).
- `save_image(store, name, path, format, compression)`: write an image out
  as an OCI archive (with docker's manifest.json) or a docker-archive.
  Layers are recompressed only when asked for a compression they are not
  in, and a blob made that way is recorded and reused next time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lamina.cache.platforms import index_facts, is_index, never_pulled, platform_manifest
from lamina.cache.store import BlobWriter, ImageRecord, LayerRecord, Store
from lamina.errors import (
    DigestMismatch,
    DiskFull,
    ImageFormatError,
    ImageNotFound,
    LayerError,
    StoreError,
    is_disk_full,
)
from lamina.oci.compression import CHUNK, Compression, TeeReader, hash_decoded
from lamina.oci.digest import Digest
from lamina.oci.image import (
    DOCKER_CONFIG,
    MAX_DOCUMENT,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    descriptor_of,
    host_platform,
    match_platform,
    platform_matches,
    platforms_of,
)
from lamina.oci.layout import BlobSource, ExportImage, SourceImage, SourceIndex, atomic_output, is_attachment
from lamina.oci.reference import InvalidReference, store_name

if TYPE_CHECKING:
    from lamina.oci.dockerarchive import DockerLayer

FORMATS = ("oci", "docker")


def normalize_name(name: str) -> str:
    """The store's form of an image name: `app` -> `docker.io/library/app:latest`."""
    try:
        return store_name(name)
    except InvalidReference as err:
        raise StoreError(str(err)) from err


def display_name(name: str) -> str:
    """docker's short form: docker.io/library/app:1 -> app:1."""
    from lamina.oci.layout import familiar_name

    return familiar_name(name)


# --- loading ----------------------------------------------------------------------


def load_image_file(
    store: Store, path: Path, name: str | None = None, platform: Platform | None = None
) -> tuple[ImageRecord, ...]:
    """Import every image in `path`; `name` (only for a file holding one image) replaces its names.

    A multi-platform image (an index of platform manifests) is loaded whole and named as its
    index; `platform` loads only that platform's image of each, as `docker load --platform`.
    """
    try:
        return _load(store, path, name, platform)
    except DiskFull as err:  # the store's writers name the blob: the input is fine
        raise err.within(f"load {path}") from err
    except DigestMismatch as err:  # a blob of the file is not what its descriptor says
        raise DigestMismatch(f"load {path}: {err}") from err
    except OSError as err:
        if is_disk_full(err):
            raise DiskFull.writing(None, err).within(f"load {path}") from err
        raise ImageFormatError(f"load {path}: {err.strerror or err}") from err


def _load(store: Store, path: Path, name: str | None, platform: Platform | None) -> tuple[ImageRecord, ...]:
    from lamina.oci.archive import open_image_source
    from lamina.oci.layout import LayoutReader

    records: list[ImageRecord] = []
    with open_image_source(path) as source:
        entries = source.entries(platform) if isinstance(source, LayoutReader) else source.images()
        if not entries:
            raise ImageFormatError(f"{path}: holds no image")
        if name is not None and len({_top_digest(e) for e in entries}) != 1:
            raise ImageFormatError(f"{path}: holds {len(entries)} images; -t names only a single image")
        for entry in entries:
            names = (name,) if name is not None else entry.names
            if not names:
                raise ImageFormatError(
                    f"{path}: image {_top_digest(entry).short} has no name "
                    "(no io.containerd.image.name nor a full org.opencontainers.image.ref.name); "
                    "give one with -t"
                )
            if isinstance(entry, SourceIndex):
                records.extend(import_index(store, source, entry, names))
                continue
            if platform is not None and not platform_matches(entry.config.platform, platform):
                raise ImageFormatError(
                    f"{path}: image {entry.manifest.digest.short} is {entry.config.platform}, not {platform}"
                )
            records.extend(import_image(store, source, entry, names))
    return tuple(records)


def _top_digest(entry: SourceImage | SourceIndex) -> Digest:
    return entry.index.digest if isinstance(entry, SourceIndex) else entry.manifest.digest


def import_index(
    store: Store, source: BlobSource, entry: SourceIndex, names: Sequence[str]
) -> tuple[ImageRecord, ...]:
    """Copy a multi-platform image (every platform's blobs, then the index) and tag `names`."""
    normalized = [normalize_name(n) for n in names]
    for image in entry.images:
        import_image(store, source, image, ())
    for descriptor, data in entry.attached:  # attestations: copied as they are, each blob verified
        attached = Manifest.from_bytes(data, f"attestation manifest {descriptor.digest.short}")
        for blob in (attached.config, *attached.layers):
            if not store.has_blob(blob.digest):
                with source.open_blob(blob.digest) as stream:
                    store.put_blob(stream, blob.digest, blob.size)
        store.put_bytes(data, descriptor.digest)
    store.put_bytes(entry.index_bytes, entry.index.digest)
    size, created = index_facts(store, Index.from_bytes(entry.index_bytes))
    return tuple(store.tag(n, entry.index.digest, size=size, created=created) for n in normalized)


def import_image(
    store: Store, source: BlobSource, image: SourceImage, names: Sequence[str]
) -> tuple[ImageRecord, ...]:
    """Copy one image's blobs into the store (verifying each) and tag it with `names`."""
    normalized = [normalize_name(n) for n in names]  # fail on a bad name before copying anything
    for i, (layer, diff_id) in enumerate(zip(image.layers, image.diff_ids, strict=True)):
        known = store.layer(layer.digest)
        if known is not None and known.diff_id == diff_id and store.has_blob(layer.digest):
            continue
        compression = Compression.from_media_type(layer.media_type)
        with source.open_blob(layer.digest) as blob, store.blob_writer() as out:
            try:
                got = copy_layer(blob, out, compression)
            except (LayerError, OSError) as err:
                # Bytes that do not decode are most often bytes that are not the
                # blob: say so when the digest shows it.
                while chunk := blob.read(CHUNK):
                    out.write(chunk)
                out.commit(layer.digest, layer.size)  # raises DigestMismatch
                raise ImageFormatError(f"layer {i} ({layer.digest.short}): {err}") from err
            if got != diff_id:
                raise DigestMismatch(
                    f"layer {i} ({layer.digest.short}): the tar hashes to {got}, not {diff_id}"
                )
            out.commit(layer.digest, layer.size)
        store.record_layer(LayerRecord(layer.digest, diff_id, layer.media_type, layer.size))
    manifest = Manifest.from_bytes(image.manifest_bytes)
    store.put_bytes(image.config_bytes, manifest.config.digest)
    store.put_bytes(image.manifest_bytes, image.manifest.digest)
    return _tag_all(store, image.manifest.digest, manifest, image.config_bytes, normalized)


def _tag_all(
    store: Store, manifest_digest: Digest, manifest: Manifest, config_bytes: bytes, names: Sequence[str]
) -> tuple[ImageRecord, ...]:
    size = manifest.config.size + sum(layer.size for layer in manifest.layers)
    created = ImageConfig.from_bytes(config_bytes).created or ""
    return tuple(store.tag(name, manifest_digest, size=size, created=created) for name in names)


def copy_layer(blob: BinaryIO, out: BlobWriter, compression: Compression) -> Digest:
    """Copy a layer blob to `out` and return the diff_id of its tar, in one pass."""
    diff_id, _ = hash_decoded(TeeReader(blob, out.write), compression)  # type: ignore[arg-type]
    return diff_id


# --- making an image ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CommittedImage:
    """An image written into the store: its documents, layer blobs and diff_ids."""

    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]
    config_bytes: bytes
    diff_ids: tuple[Digest, ...]
    names: tuple[ImageRecord, ...] = ()  # the names tagged
    # The build's layers are still uncompressed tars: `manifest` names them, and the store
    # makes the manifest the build asked for on first use (Store.add_pending, .resolve).
    pending: bool = False


def commit_image(
    store: Store,
    config: ImageConfig,
    layers: Sequence[LayerRecord],
    names: Sequence[str] = (),
    annotations: Sequence[Mapping[str, str]] = (),
    manifest_annotations: Mapping[str, str] | None = None,
) -> CommittedImage:
    """Store `config` and a manifest over `layers` (blobs already in the store); tag `names`.

    `annotations`, when given, are each layer's descriptor annotations;
    `manifest_annotations` the manifest's (a pending image's: Store.add_pending).

    The config's diff_ids are set from `layers`. The one place an image's
    config and manifest are written (a build's too: engine.output.make_image);
    documents already in the store are not written again, so a no-op rebuild
    writes nothing.
    """
    for layer in layers:
        if not store.has_blob(layer.blob):
            raise StoreError(f"commit image: layer blob {layer.blob} is not in the store")
    blobs = tuple(Descriptor(layer.media_type, layer.blob, layer.size) for layer in layers)
    if annotations:
        blobs = tuple(blob.replace_annotations(a) for blob, a in zip(blobs, annotations, strict=True))
    diff_ids = tuple(layer.diff_id for layer in layers)
    config_bytes = dataclasses.replace(config, diff_ids=diff_ids).to_bytes()
    config_desc = descriptor_of(config_bytes, OCI_CONFIG)
    manifest = Manifest(config_desc, blobs, annotations=tuple(sorted((manifest_annotations or {}).items())))
    manifest_bytes = manifest.to_bytes()
    manifest_desc = descriptor_of(manifest_bytes, OCI_MANIFEST)
    for data, descriptor in ((config_bytes, config_desc), (manifest_bytes, manifest_desc)):
        if not store.has_blob(descriptor.digest):
            store.put_bytes(data, descriptor.digest)
    records: tuple[ImageRecord, ...] = ()
    if names:
        normalized = [normalize_name(n) for n in names]
        records = _tag_all(store, manifest_desc.digest, manifest, config_bytes, normalized)
    return CommittedImage(manifest_desc, config_desc, blobs, config_bytes, diff_ids, records)


def commit_index(store: Store, images: Sequence[CommittedImage], names: Sequence[str] = ()) -> Descriptor:
    """Store an OCI index over images already committed (one per platform, each entry with
    its config's platform) and tag `names` with it: a multi-platform image."""
    entries = []
    for image in images:
        platform = ImageConfig.from_bytes(image.config_bytes).platform
        entries.append(dataclasses.replace(image.manifest, platform=platform))
    data = Index(tuple(entries)).to_bytes()
    descriptor = descriptor_of(data, OCI_INDEX)
    if not store.has_blob(descriptor.digest):
        store.put_bytes(data, descriptor.digest)
    size, created = index_facts(store, Index(tuple(entries)))
    for name in (normalize_name(n) for n in names):
        store.tag(name, descriptor.digest, size=size, created=created)
    return descriptor


# --- reading back and writing out --------------------------------------------------------


def resolve_name(store: Store, name: str) -> ImageRecord:
    """The stored image `name` names, or (as docker save takes one) whose image ID it is:
    `sha256:` and the ID's hex or a prefix of it, or 12 to 64 hex digits naming no image."""
    named = names_of_id(store, name)
    return store.resolve(min(r.name for r in named)) if named else store.resolve(normalize_name(name))


def names_of_id(store: Store, name: str) -> tuple[ImageRecord, ...]:
    """The names (as tagged, nothing made) of the image whose ID `name` is (see resolve_name);
    () when `name` is no ID or a stored name. Raises ImageNotFound for an ID no image has,
    StoreError for a prefix two images share."""
    hex_part = name.removeprefix("sha256:")
    looks_like_id = bool(hex_part) and all(c in "0123456789abcdef" for c in hex_part) and len(hex_part) <= 64
    if not looks_like_id or (hex_part == name and len(hex_part) < 12):
        return ()
    with contextlib.suppress(StoreError):
        store.lookup(normalize_name(name))
        return ()  # a name that only looks like an ID
    found = [r for r in store.names() if _image_id(store, r.manifest).hex.startswith(hex_part)]
    ids = {_image_id(store, r.manifest) for r in found}
    if len(ids) > 1:
        raise StoreError(f"image ID {name} is ambiguous: {', '.join(sorted(d.short for d in ids))}")
    if not found:
        raise ImageNotFound(f"image {name} is not in the store (see `lamina images`)")
    return tuple(found)


def _image_id(store: Store, top: Digest) -> Digest:
    """docker's image ID: a manifest's config digest; a multi-platform index's own digest."""
    data = store.read_blob(top, MAX_DOCUMENT)
    return top if is_index(data) else Manifest.from_bytes(data, f"manifest {top}").config.digest


def stored_image(
    store: Store, name: str, platform: Platform | None = None
) -> tuple[ImageRecord, SourceImage]:
    """The record and documents of a named image in the store (or an image ID, resolve_name):
    for a multi-platform one, its `platform` image (None: this host's; see platform_manifest)."""
    record = resolve_name(store, name)
    return record, manifest_image(
        store, platform_manifest(store, record.manifest, platform, name), record.name
    )


def manifest_image(store: Store, digest: Digest, name: str | None = None) -> SourceImage:
    """The documents of the stored image manifest `digest`."""
    manifest_bytes = store.read_blob(digest, MAX_DOCUMENT)
    manifest = Manifest.from_bytes(manifest_bytes, f"manifest {digest}")
    config_bytes = store.read_blob(manifest.config.digest, MAX_DOCUMENT)
    config = ImageConfig.from_bytes(config_bytes, f"config {manifest.config.digest}")
    descriptor = Descriptor(manifest.media_type, digest, len(manifest_bytes))
    names = (name,) if name is not None else ()
    return SourceImage(names, descriptor, manifest_bytes, config_bytes, manifest.layers, config.diff_ids)


def with_compression(store: Store, image: SourceImage, compression: Compression | None) -> SourceImage:
    """`image` with OCI media types and every layer in `compression` (None: as stored).

    Blobs are reused when the store already has the layer in that
    compression; otherwise they are made once and recorded.
    """
    manifest = Manifest.from_bytes(image.manifest_bytes)
    layers: list[Descriptor] = []
    for layer, diff_id in zip(image.layers, image.diff_ids, strict=True):
        current = Compression.from_media_type(layer.media_type)
        target = current if compression is None else compression
        media_type = target.media_type
        if target is not current:
            layer = _layer_as(store, layer, diff_id, current, target)
        layers.append(dataclasses.replace(layer, media_type=media_type))
    config = manifest.config
    if config.media_type == DOCKER_CONFIG:
        config = dataclasses.replace(config, media_type=OCI_CONFIG)
    new = dataclasses.replace(manifest, media_type=OCI_MANIFEST, config=config, layers=tuple(layers))
    if new == manifest:
        return image
    manifest_bytes = new.to_bytes()
    store.put_bytes(manifest_bytes)
    return dataclasses.replace(
        image,
        manifest=descriptor_of(manifest_bytes, OCI_MANIFEST),
        manifest_bytes=manifest_bytes,
        layers=new.layers,
    )


def _layer_as(
    store: Store, layer: Descriptor, diff_id: Digest, current: Compression, target: Compression
) -> Descriptor:
    from lamina.oci.layer import recompress

    found = store.find_layer(diff_id, [target.media_type, target.docker_media_type])
    if found is not None:
        return Descriptor(found.media_type, found.blob, found.size)
    with store.open_blob(layer.digest) as blob, store.blob_writer() as out:
        info = recompress(blob, current, target, out)  # type: ignore[arg-type]
        if info.diff_id != diff_id:
            raise DigestMismatch(
                f"layer {layer.digest.short}: the stored tar hashes to {info.diff_id}, not {diff_id}"
            )
        committed = out.commit(info.digest, info.size)
    store.record_layer(LayerRecord(committed.digest, diff_id, info.media_type, committed.size))
    return Descriptor(info.media_type, committed.digest, committed.size)


def save_image(
    store: Store,
    name: str,
    path: Path,
    *,
    format: str = "oci",
    compression: Compression | None = None,
    platform: Platform | None = None,
) -> Descriptor:
    """Write the image `name` to `path` (replaced only once complete); return the descriptor of
    what was written: the manifest, or the index of a multi-platform image saved whole.

    `platform` saves only that platform's image of a multi-platform one (`docker save --platform`).
    """
    if format not in FORMATS:
        raise StoreError(f"unknown output format {format!r}: use oci or docker")
    try:
        return _save(store, name, path, format, compression, platform)
    except DiskFull as err:
        raise err.within(f"save {name} to {path}") from err
    except OSError as err:
        if is_disk_full(err):
            raise DiskFull.writing(None, err).within(f"save {name} to {path}") from err
        raise StoreError(f"save {name} to {path}: {err.strerror or err}") from err


def _save(
    store: Store,
    name: str,
    path: Path,
    format: str,
    compression: Compression | None,
    platform: Platform | None,
) -> Descriptor:
    record = resolve_name(store, name)
    if platform is None and is_index(store.read_blob(record.manifest, MAX_DOCUMENT)):
        return _save_index(store, record, path, format, compression)
    record, image = stored_image(store, name, platform)
    if format == "oci":
        from lamina.oci.layout import write_oci_archive

        image = with_compression(store, image, compression)
        manifest = Manifest.from_bytes(image.manifest_bytes)
        export = ExportImage(record.name, image.manifest, manifest.config, manifest.layers)
        export = _with_attestations(store, record.name, export)
        with atomic_output(path) as out:
            write_oci_archive(out, [export], store)
        return image.manifest
    import tempfile

    with tempfile.TemporaryDirectory(dir=store.root, prefix=".tmp-save-") as tmp, atomic_output(path) as out:
        _write_docker(store, record, image, Path(tmp), out)
    return image.manifest


def _save_index(
    store: Store, record: ImageRecord, path: Path, format: str, compression: Compression | None
) -> Descriptor:
    """A multi-platform image written whole: the index, every platform's manifest, config and
    layers (recompressed: new manifests under a new index); the host's image (else the
    first) is the one docker's manifest.json names."""
    from lamina.oci.layout import write_oci_archive

    name = display_name(record.name)
    data = store.read_blob(record.manifest, MAX_DOCUMENT)
    index = Index.from_bytes(data, f"{name}: index {record.manifest.short}")
    missing = never_pulled(store, index)
    if format == "docker":
        raise StoreError(
            f"save {name}: a multi-platform image ({platforms_of(index.manifests)}); "
            "a docker-archive holds one platform: add --platform"
        )
    if missing:
        raise StoreError(
            f"save {name}: never pulled: {missing}; pull it, or save one platform with --platform"
        )
    entries: list[Descriptor] = []
    images: list[SourceImage] = []
    kept: list[Descriptor] = []  # attestation manifests and their blobs, as they are
    for entry in index.manifests:
        if entry.platform is None or is_attachment(entry):
            attached = Manifest.from_bytes(store.read_blob(entry.digest, MAX_DOCUMENT))
            kept.extend((entry, attached.config, *attached.layers))
            entries.append(entry)
            continue
        image = with_compression(store, manifest_image(store, entry.digest), compression)
        images.append(image)
        changed = {"digest": image.manifest.digest, "size": image.manifest.size}
        entries.append(dataclasses.replace(entry, media_type=image.manifest.media_type, **changed))
    top = Descriptor(index.media_type, record.manifest, len(data))
    if tuple(entries) != index.manifests:  # recompressed: new manifests, so a new index
        data = dataclasses.replace(index, manifests=tuple(entries)).to_bytes()
        top = descriptor_of(data, index.media_type)
        store.put_bytes(data, top.digest)
    host = match_platform(entries, host_platform()) or next(e for e in entries if e.platform is not None)
    main = next(i for i in images if i.manifest.digest == host.digest)
    extra = [d for i in images if i is not main for d in (i.manifest, _config_of(i), *i.layers)]
    manifest = Manifest.from_bytes(main.manifest_bytes)
    export = ExportImage(record.name, main.manifest, manifest.config, manifest.layers, top, (*extra, *kept))
    with atomic_output(path) as out:
        write_oci_archive(out, [export], store)
    return top


def _config_of(image: SourceImage) -> Descriptor:
    return Manifest.from_bytes(image.manifest_bytes).config


def _with_attestations(store: Store, name: str, export: ExportImage) -> ExportImage:
    """`export` under the index the build made with its attestations (provenance), as a push
    sends it (engine.push), when `name` has one for this very manifest (not recompressed)."""
    import json

    found = store.cache_get(f"attested-index:{name}")  # engine.imageexport.attested_key
    if found is None or json.loads(found)["manifest"] != str(export.manifest.digest):
        return export
    digest = Digest.parse(json.loads(found)["index"])
    data = store.read_blob(digest, MAX_DOCUMENT)
    index = Index.from_bytes(data)
    extra: list[Descriptor] = []
    for entry in index.manifests:
        if entry.digest == export.manifest.digest:
            continue
        attached = Manifest.from_bytes(store.read_blob(entry.digest, MAX_DOCUMENT))
        extra.extend((entry, attached.config, *attached.layers))
    top = Descriptor(index.media_type, digest, len(data))
    return dataclasses.replace(export, index=top, extra=tuple(extra))


def _write_docker(store: Store, record: ImageRecord, image: SourceImage, tmp: Path, out: BinaryIO) -> None:
    from lamina.oci.dockerarchive import DockerImage, write_docker_archive

    layers: list[DockerLayer] = []
    for layer, diff_id in zip(image.layers, image.diff_ids, strict=True):
        layers.append(_uncompressed(store, layer, diff_id, tmp))
    write_docker_archive(out, [DockerImage((record.name,), image.config_bytes, tuple(layers))])


def _uncompressed(store: Store, layer: Descriptor, diff_id: Digest, tmp: Path) -> DockerLayer:
    """The layer as an uncompressed tar: the stored one, or a decompressed temporary copy."""
    from lamina.oci.dockerarchive import DockerLayer

    if store.has_blob(diff_id):
        return DockerLayer(diff_id, store.blob_size(diff_id), _opener(store.blob_path(diff_id)))
    target = tmp / diff_id.hex
    compression = Compression.from_media_type(layer.media_type)
    try:
        with store.open_blob(layer.digest) as blob, open(target, "wb") as f:
            got, size = hash_decoded(blob, compression, lambda tar: shutil.copyfileobj(tar, f, CHUNK))
    except OSError as err:
        if is_disk_full(err):  # the cache's disk, not the output's: say which file
            raise DiskFull.writing(target, err) from err
        raise
    if got != diff_id:
        raise DigestMismatch(f"layer {layer.digest.short}: the stored tar hashes to {got}")
    return DockerLayer(diff_id, size, _opener(target))


def _opener(path: Path) -> Callable[[], BinaryIO]:
    return lambda: open(path, "rb")


def validate_stored(store: Store, name: str) -> SourceImage:
    """validate_image for an image in the store: every digest, size and diff_id recomputed."""
    from lamina.oci.validate import image_problems, raise_problems

    _, image = stored_image(store, name)
    raise_problems(f"image {name}", image_problems(store, image))
    return image
