"""The image one output gets: BuildKit's image exporter attributes applied to a committed image.

`output.commit_image` makes the build's image once, in the build's
`--compression`, with OCI media types; that is what the store holds by
default. An `-o type=image|oci|docker` output may ask for something else, as
BuildKit's exporters take it:

- `compression=` / `compression-level=`: layers the build made are written
  in that compression (the same blobs `--compression` would give; a level
  recompresses the build's blob at that level). Base-image layers keep the
  compression they came in, as BuildKit keeps existing blobs, unless
  `force-compression=true`.
- `oci-mediatypes=false` (type=docker's default): docker's schema 2 media
  types for the manifest, config and layers; the bytes of config and layers
  are the same.
- annotations: `manifest` ones go into the manifest, `manifest-descriptor`
  ones onto its descriptor (the index.json entry of a layout), `index` and
  `index-descriptor` ones need an index, which only a build with
  attestations (`--provenance`) makes, as in BuildKit.
- attestations: an image index holding the image manifest (with its
  platform) and an attestation manifest (`unknown/unknown`, annotated
  `vnd.docker.reference.type=attestation-manifest`) whose layers are in-toto
  statements (see lamina.engine.provenance).

Nothing here writes an output file; new documents and blobs go into the store.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.engine.outputspec import Annotation, OutputSpec
from lamina.errors import OutputError
from lamina.oci.digest import Digest

if TYPE_CHECKING:
    from lamina.cache.store import Store
    from lamina.engine.output import CommittedImage, ImageLayer
    from lamina.oci.compression import Compression
    from lamina.oci.image import Descriptor, Platform

IN_TOTO_LAYER = "application/vnd.in-toto+json"
REFERENCE_TYPE = "vnd.docker.reference.type"
REFERENCE_DIGEST = "vnd.docker.reference.digest"
PREDICATE_TYPE = "in-toto.io/predicate-type"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
ATTESTATION_ARTIFACT = "application/vnd.docker.attestation.manifest.v1+json"


@dataclasses.dataclass(frozen=True, slots=True)
class Statement:
    """An in-toto statement to attach, its subject filled in by `export_image`."""

    predicate_type: str
    predicate: dict[str, object]
    filename: str = "provenance.json"  # its name in a type=local/tar output (BuildKit's Path)


@dataclasses.dataclass(frozen=True, slots=True)
class ExportedImage:
    """One output's image: descriptors of its documents, all blobs in the store."""

    manifest: Descriptor  # media type and manifest-descriptor annotations as the output wants
    config: Descriptor
    layers: tuple[Descriptor, ...]
    index: Descriptor | None = None  # when attestations are attached
    extra: tuple[Descriptor, ...] = ()  # attestation manifest, its config and statements

    @property
    def top(self) -> Descriptor:
        """What names the image: the index when there is one, else the manifest."""
        return self.index if self.index is not None else self.manifest


def default_export(output: OutputSpec, build_compression: str) -> bool:
    """True when the output wants exactly the committed image (no attribute changes it)."""
    return (
        output.compression in ("", build_compression)
        and output.compression_level is None
        and not output.force_compression
        and output.oci_types
        and not output.annotations
    )


def export_image(
    store: Store,
    image: CommittedImage,
    layers: Sequence[ImageLayer],
    output: OutputSpec,
    build_compression: str,
    epoch: int | None,
    platform: Platform,
    statements: Sequence[Statement] = (),
    names: Sequence[str] = (),
    in_index: Sequence[str] = (),
) -> ExportedImage:
    """The image `output` asks for, made from the committed `image` (whose layer dirs are `layers`).

    `names` are the image's names in this output (attestation subjects). `in_index`: every
    platform of a multi-platform build, whose index (platform_index) takes the index annotations;
    an annotation for another of them is left to that platform's image."""
    from lamina.oci.image import (
        DOCKER_CONFIG,
        DOCKER_MANIFEST,
        OCI_CONFIG,
        OCI_MANIFEST,
        Manifest,
        descriptor_of,
    )

    annotations = _annotations_by_kind(output.annotations, platform, bool(statements), in_index)
    if not output.oci_types and statements:
        raise OutputError('cannot export attestations with "oci-mediatypes=false"')
    out_epoch = output.epoch(epoch)  # source-date-epoch=: the layers written again with that one
    if default_export(output, build_compression) and not statements and out_epoch == epoch:
        return ExportedImage(image.manifest, image.config, image.layers)
    blobs, diff_ids = _layer_blobs(
        store, image, layers, output, build_compression, out_epoch, out_epoch != epoch
    )
    oci = output.oci_types
    config = image.config
    if out_epoch != epoch:
        config = _epoch_config(store, image, layers, diff_ids, out_epoch)
    config = dataclasses.replace(config, media_type=OCI_CONFIG if oci else DOCKER_CONFIG)
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest = Manifest(config, blobs, media_type, tuple(sorted(annotations["manifest"].items())))
    data = manifest.to_bytes()
    _put(store, data)
    descriptor = descriptor_of(data, media_type).replace_annotations(annotations["manifest-descriptor"])
    exported = ExportedImage(descriptor, config, blobs)
    if statements:
        exported = _with_attestations(
            store, exported, names, platform, statements, annotations, output.oci_artifact
        )
    return exported


def _annotations_by_kind(
    annotations: Sequence[Annotation], platform: Platform, has_index: bool, in_index: Sequence[str] = ()
) -> dict[str, dict[str, str]]:
    by_kind: dict[str, dict[str, str]] = {
        "manifest": {},
        "manifest-descriptor": {},
        "index": {},
        "index-descriptor": {},
    }
    for annotation in annotations:
        if annotation.platform and annotation.platform != str(platform):
            if annotation.platform in in_index:
                continue  # another platform's image takes it
            raise OutputError(f"invalid annotation: no platform {annotation.platform} found in source")
        by_kind[annotation.kind][annotation.key] = annotation.value
    if in_index:  # the index is made by platform_index
        by_kind["index"], by_kind["index-descriptor"] = {}, {}
    elif not has_index and (by_kind["index"] or by_kind["index-descriptor"]):
        raise OutputError("index annotations not supported for single platform export")
    return by_kind


def _put(store: Store, data: bytes) -> None:
    digest = Digest.of_bytes(data)
    if not store.has_blob(digest):
        store.put_bytes(data, digest)


def _layer_blobs(
    store: Store,
    image: CommittedImage,
    layers: Sequence[ImageLayer],
    output: OutputSpec,
    build_compression: str,
    epoch: int | None,
    rewrite: bool = False,
) -> tuple[tuple[Descriptor, ...], tuple[Digest, ...]]:
    """Each layer's blob in this output, and its diff_id; with `rewrite` (an output's own
    source-date-epoch=), the built layers are written again with `epoch`."""
    from lamina.engine.output import epoch_annotations, layer_blobs
    from lamina.oci.compression import Compression

    target = Compression.parse(output.compression or build_compression)
    level = output.compression_level
    out: list[Descriptor] = []
    diff_ids = list(image.diff_ids)
    # Built layers wanted in another compression: made together (one rootless helper).
    remake: list[tuple[int, tuple[ImageLayer, list[Path]]]] = []
    for i, (layer, blob, diff_id) in enumerate(zip(layers, image.layers, image.diff_ids, strict=True)):
        current = Compression.from_media_type(blob.media_type)
        if layer.blob is not None:  # a base image's layer, as it came
            if output.force_compression and (current is not target or level is not None):
                blob = _recompressed(store, blob, diff_id, current, target, level)
        elif rewrite or (level is None and current is not target):
            remake.append((i, (layer, [below.path for below in reversed(layers[:i])])))
        elif level is not None:
            blob = _recompressed(store, blob, diff_id, current, target, level)
        out.append(blob)
    made = layer_blobs(store, [job for _, job in remake], target.value, epoch) if remake else []
    for (i, _), (blob, diff_id) in zip(remake, made, strict=True):
        out[i] = blob if level is None else _recompressed(store, blob, diff_id, target, target, level)
        diff_ids[i] = diff_id
    typed = (_typed(blob, output.oci_types) for blob in out)
    blobs = tuple(
        b.replace_annotations(epoch_annotations(x, epoch)) for b, x in zip(typed, layers, strict=True)
    )
    return blobs, tuple(diff_ids)


def _epoch_config(
    store: Store,
    image: CommittedImage,
    layers: Sequence[ImageLayer],
    diff_ids: Sequence[Digest],
    epoch: int | None,
) -> Descriptor:
    """The config of an output with its own source-date-epoch=: its layers' diff_ids, and, as
    BuildKit's exporter clamps them, the image's and the build's history times no later than
    `epoch` (the base image's history keeps its times)."""
    from lamina.oci.image import OCI_CONFIG, ImageConfig, descriptor_of, format_time

    config = ImageConfig.from_bytes(image.config_bytes)
    config = dataclasses.replace(config, diff_ids=tuple(diff_ids))
    if epoch is not None:
        stamp = format_time(epoch)

        def clamped(created: str | None) -> str:
            return stamp if created is None or _seconds(created) > epoch else created

        base_layers = sum(1 for layer in layers if layer.blob is not None)
        history, seen = [], 0
        for entry in config.history:
            base = seen < base_layers  # the base image's entries: up to its last layer's
            seen += 0 if entry.empty_layer else 1
            history.append(entry if base else dataclasses.replace(entry, created=clamped(entry.created)))
        config = dataclasses.replace(config, created=clamped(config.created), history=tuple(history))
    data = config.to_bytes()
    _put(store, data)
    return descriptor_of(data, OCI_CONFIG)


def _seconds(created: str) -> float:
    """An RFC 3339 time (Go's, up to nanoseconds) as seconds since the epoch."""
    import datetime
    import re

    text = re.sub(r"(\.\d{6})\d+", r"\1", created.upper()).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(text).timestamp()


def _typed(blob: Descriptor, oci_types: bool) -> Descriptor:
    from lamina.oci.compression import Compression

    kind = Compression.from_media_type(blob.media_type)
    media_type = kind.media_type if oci_types else kind.docker_media_type
    return dataclasses.replace(blob, media_type=media_type, annotations=())


def _recompressed(
    store: Store,
    blob: Descriptor,
    diff_id: Digest,
    current: Compression,
    target: Compression,
    level: int | None,
) -> Descriptor:
    """`blob` re-encoded as `target` at `level`: made once, then found by its memo.

    A blob at an explicit level is not recorded as *the* blob of its diff_id in
    that compression: a later default export must not pick it up by chance.
    """
    from lamina.cache.store import LayerRecord
    from lamina.oci.image import Descriptor
    from lamina.oci.layer import recompress

    memo = f"layer-recompress:{diff_id}:{target.value}:{'' if level is None else level}"
    found = store.cache_get(memo)
    if found is not None:
        record = json.loads(found)
        digest = Digest.parse(record["digest"])
        if store.has_blob(digest):
            return Descriptor(target.media_type, digest, record["size"])
    if level is None:
        known = store.find_layer(diff_id, [target.media_type, target.docker_media_type])
        if known is not None:
            return Descriptor(target.media_type, known.blob, known.size)
    with store.open_blob(blob.digest) as source, store.blob_writer() as writer:
        info = recompress(source, current, target, writer, level)  # type: ignore[arg-type]
        if info.diff_id != diff_id:
            raise OutputError(f"layer {blob.digest}: its tar hashes to {info.diff_id}, not {diff_id}")
        committed = writer.commit(info.digest, info.size)
    if level is None:
        store.record_layer(LayerRecord(committed.digest, diff_id, info.media_type, committed.size))
    record = {"digest": str(committed.digest), "size": committed.size}
    store.cache_put(memo, json.dumps(record), refs=[committed.digest])
    return Descriptor(target.media_type, committed.digest, committed.size)


def _with_attestations(
    store: Store,
    image: ExportedImage,
    names: Sequence[str],
    platform: Platform,
    statements: Sequence[Statement],
    annotations: dict[str, dict[str, str]],
    artifact: bool = False,
) -> ExportedImage:
    """An index of the image and one attestation manifest over `statements`, as BuildKit's writer."""
    from lamina.oci.image import OCI_INDEX, OCI_MANIFEST, Index, Platform, descriptor_of

    # BuildKit's default subjects: each name the image is exported under, as a purl.
    digest = {image.manifest.digest.algorithm: image.manifest.digest.hex}
    subjects = [{"name": image_purl(name, str(platform)), "digest": digest} for name in names]
    layers = _statement_layers(store, statements, subjects)
    unknown = Platform(architecture="unknown", os="unknown")
    config, config_bytes, manifest_bytes = _attestation_manifest(image, layers, artifact)
    _put(store, config_bytes)
    _put(store, manifest_bytes)
    attestation = dataclasses.replace(
        descriptor_of(manifest_bytes, OCI_MANIFEST),
        annotations=(
            (REFERENCE_DIGEST, str(image.manifest.digest)),
            (REFERENCE_TYPE, "attestation-manifest"),
        ),
        platform=unknown,
    )
    entry = dataclasses.replace(image.manifest, platform=platform)
    index = Index((entry, attestation), OCI_INDEX, tuple(sorted(annotations["index"].items())))
    index_bytes = index.to_bytes()
    _put(store, index_bytes)
    index_desc = descriptor_of(index_bytes, OCI_INDEX).replace_annotations(annotations["index-descriptor"])
    return dataclasses.replace(image, index=index_desc, extra=(attestation, config, *layers))


def _statement_layers(
    store: Store, statements: Sequence[Statement], subjects: list[dict[str, object]]
) -> list[Descriptor]:
    """Each statement over `subjects` as an in-toto layer, stored."""
    from lamina.oci.image import canonical_json, descriptor_of

    layers: list[Descriptor] = []
    for statement in statements:
        body = {
            "_type": STATEMENT_TYPE,
            "predicateType": statement.predicate_type,
            "subject": subjects,
            "predicate": statement.predicate,
        }
        data = canonical_json(body)
        _put(store, data)
        layers.append(
            descriptor_of(data, IN_TOTO_LAYER).replace_annotations({PREDICATE_TYPE: statement.predicate_type})
        )
    return layers


def _attestation_manifest(
    image: ExportedImage, layers: list[Descriptor], artifact: bool
) -> tuple[Descriptor, bytes, bytes]:
    """The attestation manifest over `layers`: (its config, the config's bytes, its bytes)."""
    from lamina.oci.image import OCI_CONFIG, OCI_EMPTY, OCI_MANIFEST, Manifest, canonical_json, descriptor_of

    config_obj = {
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [str(layer.digest) for layer in layers]},
    }
    config_bytes = canonical_json(config_obj)
    config = descriptor_of(config_bytes, OCI_CONFIG)
    if artifact:  # oci-artifact=true: the empty config, artifactType and subject, as BuildKit's
        config_bytes = b"{}"
        config = descriptor_of(config_bytes, OCI_EMPTY)
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ATTESTATION_ARTIFACT,
            "config": {**config.to_json(), "data": "e30="},
            "layers": [layer.to_json() for layer in layers],
            "subject": {
                "mediaType": image.manifest.media_type,
                "digest": str(image.manifest.digest),
                "size": image.manifest.size,
            },
        }
        manifest_bytes = canonical_json(document)
    else:
        manifest_bytes = Manifest(config, tuple(layers)).to_bytes()
    return config, config_bytes, manifest_bytes


def export_all(
    store: Store,
    image: CommittedImage,
    layers: Sequence[ImageLayer],
    outputs: Sequence[OutputSpec],
    build_compression: str,
    epoch: int | None,
    platform: Platform,
    statements: Sequence[Statement] = (),
    tags: Sequence[str] = (),
) -> tuple[ExportedImage | None, ...]:
    """The image of each output (None for local and tar, which take the layer dirs)."""
    return tuple(
        export_image(
            store,
            image,
            layers,
            output,
            build_compression,
            epoch,
            platform,
            statements,
            list(dict.fromkeys([*output.names, *tags])),
        )
        if output.is_image
        else None
        for output in outputs
    )


def attested_key(name: str) -> str:
    return f"attested-index:{name}"


def remember_index(store: Store, names: Sequence[str], image: object) -> None:
    """The store names an image by its manifest; an image with attestations also has an index,
    which a push sends instead (engine.push): remembered per name, with the manifest it goes with."""
    index = getattr(image, "index", None)
    manifest = getattr(image, "manifest", None)
    if index is None or manifest is None:
        return
    record = json.dumps({"manifest": str(manifest.digest), "index": str(index.digest)})
    for name in names:
        store.cache_put(attested_key(name), record, refs=[index.digest])


def image_purl(ref: str, platform: str = "") -> str:
    """A reference as BuildKit's purl.RefToPURL writes it: pkg:docker/NS/NAME@TAG?platform=..."""
    from urllib.parse import quote

    from lamina.oci.reference import parse_reference

    parsed = parse_reference(ref)
    name = parsed.repository
    if parsed.registry == "docker.io" and name.startswith("library/"):
        name = name[len("library/") :]
    elif parsed.registry != "docker.io":
        name = f"{parsed.registry}/{name}"
    qualifiers = []
    version = parsed.tag or ""  # a bare name is `latest` already
    if parsed.digest is not None:
        qualifiers.append(f"digest={quote(str(parsed.digest), safe='')}")
    if platform:
        qualifiers.append(f"platform={quote(platform, safe='')}")
    purl = f"pkg:docker/{quote(name, safe='/')}"
    if version:
        purl += f"@{quote(version, safe='')}"
    if qualifiers:
        purl += "?" + "&".join(qualifiers)
    return purl


def attestation_files(
    statements: Sequence[Statement], epoch: int | None, prefix: str = ""
) -> Callable[[Path], None]:
    """What BuildKit's local and tar exporters add for attestations: each statement as a file at
    the root of the tree (`provenance.json`, mode 0600, indented as Go's MarshalIndent), its
    subjects every regular file of the tree by path and sha256, in walk order."""

    def add(root: Path) -> None:
        import hashlib
        import os
        import stat

        subjects: list[dict[str, object]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                subjects.append({"name": rel, "digest": {"sha256": digest.hexdigest()}})
        for statement in statements:
            body = {
                "_type": STATEMENT_TYPE,
                "predicateType": statement.predicate_type,
                "subject": subjects,
                "predicate": statement.predicate,
            }
            target = root / f"{prefix}{statement.filename}"  # attestation-prefix=
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(body, indent=2, ensure_ascii=False))
            os.chmod(target, 0o600)
            if epoch is not None:
                os.utime(target, (epoch, epoch), follow_symlinks=False)

    return add


def platform_index(
    store: Store, images: Sequence[tuple[Platform, ExportedImage]], output: OutputSpec | None, main: int = 0
) -> ExportedImage:
    """One image index over each platform's image, as BuildKit exports a multi-platform build:
    an entry per platform (its manifest descriptor with `platform`, then its attestation
    manifest when it has one), the output's `index` and `index-descriptor` annotations. The
    result reads as image `main` (what manifest.json and a single-image reader take) with the
    index on top and the other platforms' blobs (and every attestation's) as `extra`."""
    from lamina.oci.image import DOCKER_MANIFEST_LIST, OCI_INDEX, Index, descriptor_of

    annotations: dict[str, dict[str, str]] = {"index": {}, "index-descriptor": {}}
    for annotation in output.annotations if output is not None else ():
        if annotation.kind in annotations:
            annotations[annotation.kind][annotation.key] = annotation.value
    media_type = OCI_INDEX if output is None or output.oci_types else DOCKER_MANIFEST_LIST
    entries: list[Descriptor] = []
    for platform, image in images:
        entries.append(dataclasses.replace(image.manifest, platform=platform))
        if image.index is not None:  # attested (_with_attestations): its attestation manifest next
            entries.append(image.extra[0])
    data = Index(tuple(entries), media_type, tuple(sorted(annotations["index"].items()))).to_bytes()
    _put(store, data)
    index = descriptor_of(data, media_type).replace_annotations(annotations["index-descriptor"])
    first = images[main][1]
    extra = [
        blob
        for i, (_, image) in enumerate(images)
        for blob in (() if i == main else (image.manifest, image.config, *image.layers)) + image.extra
    ]
    return ExportedImage(first.manifest, first.config, first.layers, index, tuple(extra))
