"""`-o/--output` specs, parsed as buildx does (writing them is lamina.engine.output).

    -o type=oci,dest=img.tar         OCI archive (also carries manifest.json)
    -o type=docker,dest=img.tar      the same with docker media types, for `docker load`
    -o type=local,dest=DIR           the target's root filesystem
    -o type=tar,dest=rootfs.tar      the root filesystem as one tar
    -o type=image[,name=a:b]         the local image store (the default)
    -o type=registry,name=r/a:b      the store, then pushed (type=image,push=true)
    -o DIR                           shorthand for type=local,dest=DIR
    -o -                             shorthand for type=tar to stdout

The image types take BuildKit's exporter attributes: compression=gzip|zstd|
uncompressed, compression-level=, force-compression=, oci-mediatypes=,
annotation[-manifest|-manifest-descriptor|-index|-index-descriptor][[os/arch]].KEY=,
push=, registry.insecure= (type=image), tar= (oci, docker); local and tar
take platform-split=. An attribute BuildKit knows and lamina cannot honour is
refused with one line naming it (_REFUSED), never ignored.

`dest=-` writes the archive to stdout. A no-op rebuild parses its outputs
and writes none: this module keeps that path light.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from lamina.errors import OutputError


class OutputType(enum.Enum):
    IMAGE = "image"
    OCI = "oci"
    DOCKER = "docker"
    LOCAL = "local"
    TAR = "tar"


# Where an annotation goes, as BuildKit's exptypes names the levels.
ANNOTATION_KINDS = ("manifest", "manifest-descriptor", "index", "index-descriptor")


@dataclasses.dataclass(frozen=True, slots=True)
class Annotation:
    """`annotation[-KIND][[PLATFORM]].KEY=VALUE` of an output, or buildx's `--annotation`."""

    kind: str  # one of ANNOTATION_KINDS
    key: str
    value: str
    platform: str = ""  # "os/arch[/variant]" when qualified; only the build's platform exists


@dataclasses.dataclass(frozen=True, slots=True)
class OutputSpec:
    type: OutputType
    dest: str = ""  # a path, or "-" for stdout; "" for type=image
    names: tuple[str, ...] = ()  # name=... (comma-joined, or repeated)
    compression: str = ""  # gzip, zstd or none; "" means the build's --compression
    tar: bool = True  # type=oci,tar=false writes a layout directory
    compression_level: int | None = None
    force_compression: bool = False  # recompress base-image layers too
    oci_mediatypes: bool | None = None  # None: the type's default (see oci_types)
    annotations: tuple[Annotation, ...] = ()
    push: bool = False  # type=image,push=true and type=registry
    insecure: bool = False  # registry.insecure=true: plain HTTP for the push
    # type=local/tar: the tree under linux_amd64/; None: not said (true with several platforms)
    platform_split: bool | None = None
    oci_artifact: bool = False  # attestation manifests as OCI artifacts (artifactType, subject)
    attestation_prefix: str = ""  # type=local/tar: prefix of provenance.json's name
    push_by_digest: bool = False  # push=true without a tag: the manifest under its digest
    # source-date-epoch=: this output's SOURCE_DATE_EPOCH ("" for none); None: the build's
    source_date_epoch: str | None = None

    def epoch(self, build_epoch: int | None) -> int | None:
        """The SOURCE_DATE_EPOCH this output's layers are written with (BuildKit's exporter
        attribute wins over the build's)."""
        if self.source_date_epoch is None:
            return build_epoch
        return int(self.source_date_epoch) if self.source_date_epoch else None

    @property
    def to_stdout(self) -> bool:
        return self.dest == "-"

    @property
    def oci_types(self) -> bool:
        """OCI media types unless asked otherwise; docker's for type=docker, as BuildKit.

        BuildKit's type=image defaults to docker's types too (without attestations);
        lamina's store holds OCI types, so type=image keeps them unless
        `oci-mediatypes=false` (README: deliberate differences)."""
        if self.oci_mediatypes is not None:
            return self.oci_mediatypes
        return self.type is not OutputType.DOCKER

    @property
    def has_image_attributes(self) -> bool:
        """Asks for an image other than the committed one (so a no-op rebuild cannot be replayed)."""
        return bool(
            self.compression
            or self.compression_level is not None
            or self.force_compression
            or self.oci_mediatypes is not None
            or self.annotations
            or self.source_date_epoch is not None
        )

    @property
    def is_image(self) -> bool:
        return self.type in (OutputType.IMAGE, OutputType.OCI, OutputType.DOCKER)


_IMAGE_KEYS = {
    "name",
    "compression",
    "compression-level",
    "force-compression",
    "oci-mediatypes",
    "rewrite-timestamp",
    "oci-artifact",
    "source-date-epoch",
}
_KEYS: dict[OutputType, set[str]] = {
    OutputType.IMAGE: _IMAGE_KEYS | {"push", "push-by-digest", "registry.insecure", "unpack", "store"},
    OutputType.OCI: _IMAGE_KEYS | {"dest", "tar"},
    OutputType.DOCKER: _IMAGE_KEYS | {"dest", "tar"},
    OutputType.LOCAL: {"dest", "platform-split", "mode", "attestation-prefix"},
    OutputType.TAR: {"dest", "platform-split", "attestation-prefix"},
}
# Attributes BuildKit (or buildx) takes that lamina cannot honour: refused, never ignored.
_REFUSED = {
    "dangling-name-prefix": "lamina's store names images only by name=/-t",
    "danging-name-empty-only": "lamina's store names images only by name=/-t",
    "name-canonical": "lamina's store names images only by name=/-t",
    "attestation-inline": "attestations are attached only with --provenance",
    "prefer-nondist-layers": "lamina writes only distributable layer media types",
    "context": "there is no docker context to load into; write the archive with dest=",
    "buildinfo": "build info is not recorded",
    "buildinfo-attrs": "build info is not recorded",
}
_COMPRESSIONS = {"gzip": "gzip", "zstd": "zstd", "uncompressed": "none"}
_MAX_LEVEL = {"gzip": 9, "zstd": 22, "none": 0}


def _bool(spec: str, key: str, value: str) -> bool:
    """A bool as Go's strconv.ParseBool reads it (BuildKit's attribute parser)."""
    lowered = value.strip()
    if lowered in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if lowered in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise OutputError(f"invalid --output {spec!r}: non-bool value {value!r} specified for {key}")


def _split_fields(spec: str) -> list[str]:
    """The comma-separated fields of a spec, quoted ones (`"name=a,b"`) kept whole, as buildx's CSV."""
    import csv

    try:
        rows = list(csv.reader([spec], skipinitialspace=False, strict=True))
    except csv.Error as err:
        raise OutputError(f"invalid --output {spec!r}: {err}") from None
    return rows[0] if rows else []


_ANNOTATION_KEY = re.compile(r"^annotation(?:-([a-z-]+))?(?:\[([A-Za-z0-9_/-]+)\])?\.(\S+)$")


def parse_annotation_attr(key: str, value: str) -> Annotation | None:
    """`annotation[-KIND][[PLATFORM]].KEY` as BuildKit's ParseAnnotationKey reads it; None if not one."""
    match = _ANNOTATION_KEY.match(key)
    if match is None:
        return None
    kind, platform, name = match.group(1) or "manifest", match.group(2) or "", match.group(3)
    if kind not in ANNOTATION_KINDS:
        raise OutputError(f"unrecognized annotation type {kind}")
    return Annotation(kind, name, value, _platform(platform))


def _platform(text: str) -> str:
    if not text:
        return ""
    from lamina.errors import LaminaError
    from lamina.oci.image import Platform

    try:
        return str(Platform.parse(text))
    except LaminaError as err:
        raise OutputError(str(err)) from None


def parse_output(spec: str) -> OutputSpec:
    """One `-o` value: `type=...,dest=...`, or buildx's `DIR` / `-` shorthands."""
    text = spec.strip()
    if not text:
        raise OutputError("empty --output value")
    if text == "-":
        return OutputSpec(OutputType.TAR, dest="-")
    if "=" not in text:
        return OutputSpec(OutputType.LOCAL, dest=text)
    fields, annotations = _fields(spec, text)
    output_type, kind, push = _output_type(spec, fields)
    if annotations and not output_type_is_image(output_type):
        raise OutputError(f"invalid --output {spec!r}: type={kind} has no manifest to annotate")
    dest = _dest(spec, fields, output_type, kind)
    compression, level = _compression(spec, fields)
    tar_value = _bool(spec, "tar", fields.get("tar") or "true")
    force = "force-compression" in fields and (
        fields["force-compression"] == "" or _bool(spec, "force-compression", fields["force-compression"])
    )
    oci_types = (
        _bool(spec, "oci-mediatypes", fields["oci-mediatypes"]) if "oci-mediatypes" in fields else None
    )
    if "push" in fields:
        push = _bool(spec, "push", fields["push"])
    insecure = (
        _bool(spec, "registry.insecure", fields["registry.insecure"])
        if "registry.insecure" in fields
        else False
    )
    _refuse_unsupported(spec, fields)
    split = _bool(spec, "platform-split", fields["platform-split"]) if "platform-split" in fields else None
    names = tuple(name for name in fields.get("name", "").split(",") if name)
    artifact = _bool(spec, "oci-artifact", fields["oci-artifact"]) if "oci-artifact" in fields else False
    by_digest = _bool(spec, "push-by-digest", fields.get("push-by-digest") or "false")
    if by_digest and not push:
        raise OutputError("--output push-by-digest=true needs push=true (or type=registry)")
    if artifact and oci_types is False:
        raise OutputError('exporter option "oci-artifact=true" conflicts with "oci-mediatypes=false"')
    epoch = fields.get("source-date-epoch")
    if epoch and not (epoch.isascii() and epoch.isdigit()):
        raise OutputError(f"--output source-date-epoch={epoch}: invalid SOURCE_DATE_EPOCH: {epoch}")
    return OutputSpec(
        output_type,
        dest,
        names,
        compression,
        tar_value,
        compression_level=level,
        force_compression=force,
        oci_mediatypes=oci_types,
        annotations=tuple(annotations),
        push=push,
        insecure=insecure,
        platform_split=split,
        oci_artifact=artifact,
        attestation_prefix=fields.get("attestation-prefix", ""),
        push_by_digest=by_digest,
        source_date_epoch=epoch,
    )


def _fields(spec: str, text: str) -> tuple[dict[str, str], list[Annotation]]:
    """The spec's key=value fields (keys lowered; several name= joined by commas) and its
    annotation attributes."""
    fields: dict[str, str] = {}
    annotations: list[Annotation] = []
    for part in _split_fields(text):
        key, sep, value = part.partition("=")
        key = key.strip().lower() if not key.strip().startswith("annotation") else key.strip()
        if not sep:
            raise OutputError(f"invalid --output {spec!r}: {part!r} is not key=value")
        if key.startswith("annotation"):
            annotation = parse_annotation_attr(key, value)
            if annotation is None:
                raise OutputError(f"invalid --output {spec!r}: {key!r} is not annotation[-TYPE].KEY")
            annotations.append(annotation)
            continue
        if key == "name" and "name" in fields:
            fields["name"] += "," + value
        else:
            fields[key] = value
    return fields, annotations


def _output_type(spec: str, fields: dict[str, str]) -> tuple[OutputType, str, bool]:
    """(the exporter, the type as given but registry, whether type=registry asks a push),
    type= taken out of `fields`; every other key must be one the exporter takes."""
    kind = fields.pop("type", "")
    if not kind:
        raise OutputError(f"invalid --output {spec!r}: missing type=")
    push = False
    if kind == "registry":  # BuildKit: the image exporter with push=true
        kind, push = "image", True
    try:
        output_type = OutputType(kind)
    except ValueError:
        choices = ", ".join([*(t.value for t in OutputType), "registry"])
        raise OutputError(f"invalid --output {spec!r}: unknown type {kind!r} (use {choices})") from None
    for key in fields:
        if key in _REFUSED:
            raise OutputError(f"--output {key}= is not supported: {_REFUSED[key]}")
        if key == "source-date-epoch" and output_type in (OutputType.LOCAL, OutputType.TAR):
            raise OutputError(
                f"--output {key}= is not supported for type={kind}: set SOURCE_DATE_EPOCH for the build"
            )
        if key not in _KEYS[output_type]:
            raise OutputError(f"invalid --output {spec!r}: unknown key {key!r} for type={kind}")
    return output_type, kind, push


def _dest(spec: str, fields: Mapping[str, str], output_type: OutputType, kind: str) -> str:
    """dest=, `-` (stdout) for a file exporter without one; every exporter but image needs one."""
    dest = fields.get("dest", "")
    to_file = output_type is OutputType.TAR or (
        output_type is OutputType.OCI and _bool(spec, "tar", fields.get("tar") or "true")
    )
    if not dest and to_file:
        dest = "-"  # buildx: a file exporter without dest= writes to stdout (refused on a terminal)
    if output_type is not OutputType.IMAGE and not dest:
        raise OutputError(f"invalid --output {spec!r}: type={kind} needs dest=")
    return dest


def _compression(spec: str, fields: Mapping[str, str]) -> tuple[str, int | None]:
    """compression= (as lamina names it; "" when not given) and compression-level=."""
    compression = fields.get("compression", "")
    if compression == "estargz":
        raise OutputError("--output compression=estargz is not supported: use gzip, zstd or uncompressed")
    if compression and compression not in _COMPRESSIONS:
        raise OutputError(f"invalid --output {spec!r}: compression must be gzip, zstd or uncompressed")
    compression = _COMPRESSIONS.get(compression, "")
    level: int | None = None
    if "compression-level" in fields:
        try:
            level = int(fields["compression-level"])
        except ValueError:
            raise OutputError(
                f"non-integer value {fields['compression-level']} specified for compression-level"
            ) from None
    return compression, level


def _refuse_unsupported(spec: str, fields: Mapping[str, str]) -> None:
    """unpack= (either value holds), store=false, rewrite-timestamp=false and mode= other than copy."""
    # unpack= asks containerd to unpack the image into its snapshotter (buildx's --push passes
    # unpack=false); lamina has no such step: an image's layers are the build's own directories,
    # so either value describes what happens. store=false would drop the image from the store.
    if "unpack" in fields:
        _bool(spec, "unpack", fields["unpack"])
    if "store" in fields and not _bool(spec, "store", fields["store"]):
        raise OutputError("--output store=false is not supported: in lamina's store the image always goes")
    if "rewrite-timestamp" in fields and not _bool(spec, "rewrite-timestamp", fields["rewrite-timestamp"]):
        raise OutputError(
            "--output rewrite-timestamp=false is not supported: with SOURCE_DATE_EPOCH set, "
            "lamina always clamps the times of the files its steps write"
        )
    if fields.get("mode", "copy") != "copy":
        raise OutputError(
            f"--output mode={fields['mode']} is not supported: a local export only adds files (mode=copy)"
        )


def output_type_is_image(kind: OutputType) -> bool:
    return kind in (OutputType.IMAGE, OutputType.OCI, OutputType.DOCKER)


def check_image_attrs(output: OutputSpec, build_compression: str) -> None:
    """Refuse attribute combinations BuildKit refuses, before the build: one line each."""
    compression = output.compression or build_compression
    if output.compression_level is not None:
        top = _MAX_LEVEL.get(compression, 0)
        low = -7 if compression == "zstd" else 0
        if compression == "none":
            raise OutputError("--output compression-level= has no meaning for uncompressed layers")
        if not low <= output.compression_level <= top:
            raise OutputError(
                f"--output compression-level={output.compression_level}: {compression} takes {low}..{top}"
            )
    if not output.oci_types:
        extra = [a for a in output.annotations if a.kind != "manifest"]
        if extra:
            raise OutputError('cannot export annotations with "oci-mediatypes=false"')


def parse_outputs(specs: Sequence[str]) -> tuple[OutputSpec, ...]:
    outputs = tuple(parse_output(spec) for spec in specs)
    if sum(1 for output in outputs if output.to_stdout) > 1:
        raise OutputError("only one --output can write to stdout")
    for output in outputs:
        check_dest(output)
    return outputs


def check_dest(output: OutputSpec) -> None:
    """Refuse a destination that cannot be written, before the build rather than after it."""
    if output.type is OutputType.IMAGE or output.to_stdout:
        return
    dest = Path(output.dest)
    what = f"--output type={output.type.value},dest={output.dest}"
    if output.type is OutputType.LOCAL or not output.tar:
        if dest.exists() and not dest.is_dir():
            raise OutputError(f"{what}: {dest} exists and is not a directory")
        return
    if dest.is_dir():
        raise OutputError(f"{what}: {dest} is a directory (a file is written here)")
    if not dest.parent.is_dir():
        raise OutputError(f"{what}: {missing_dir(str(dest.parent))}")


def missing_dir(path: str) -> str:
    """Why `path`, not a directory, cannot hold an output: missing, or something else."""
    import os

    return f"{path} is not a directory" if os.path.lexists(path) else f"directory {path} does not exist"


_FLAG_TYPE = re.compile(r"^([a-z-]+)(?:\[([A-Za-z0-9_/-]+)\])?$")


def parse_annotation_flags(values: Sequence[str]) -> tuple[Annotation, ...]:
    """buildx's `--annotation [TYPE[,TYPE...]:]KEY=VALUE` (TYPE may carry `[os/arch]`);
    no TYPE means the manifest, as buildx passes `annotation.KEY`."""
    out: list[Annotation] = []
    for text in values:
        if not text:
            continue
        key, sep, value = text.partition("=")
        if not sep or not key.rpartition(":")[2]:  # no `=`, or an empty KEY (`=x`, `manifest:=x`)
            raise OutputError(f'parse annotations: invalid annotation "{text}", expected key=value')
        types, colon, name = key.partition(":")
        if not colon:
            out.append(Annotation("manifest", key, value))
            continue
        for part in types.split(","):
            match = _FLAG_TYPE.match(part)
            if match is None:
                raise OutputError(
                    f'parse annotations: invalid annotation type "{part}", '
                    "expected type and optional platform in square brackets"
                )
            if match.group(1) not in ANNOTATION_KINDS:
                raise OutputError(f'parse annotations: unknown annotation type "{match.group(1)}"')
            out.append(Annotation(match.group(1), name, value, _platform(match.group(2) or "")))
    return tuple(out)


def with_annotations(
    outputs: Sequence[OutputSpec], annotations: Sequence[Annotation]
) -> tuple[OutputSpec, ...]:
    """`--annotation`s added to every image output (buildx adds them to every output's
    attributes); with no `-o` at all, to the store's image, the default output."""
    if not annotations:
        return tuple(outputs)
    if not outputs:
        outputs = (OutputSpec(OutputType.IMAGE),)
    if not any(output.is_image for output in outputs):
        raise OutputError("--annotation: no output of this build is an image (type=local and tar have none)")
    return tuple(
        dataclasses.replace(output, annotations=(*annotations, *output.annotations))
        if output.is_image
        else output
        for output in outputs
    )


def check_outputs(outputs: Sequence[OutputSpec], build_compression: str, attestations: bool) -> None:
    """What BuildKit's exporters refuse, refused before the build (one line each)."""
    import os

    for output in outputs:
        if output.to_stdout and os.isatty(1):  # as buildx: never an archive on the terminal
            raise OutputError(
                f"dest file is required for {output.type.value} exporter. refusing to write to console"
            )
        if not output.is_image:
            continue
        check_image_attrs(output, build_compression)
        if output.type is OutputType.IMAGE and any(
            a.kind in ("manifest-descriptor", "index-descriptor") for a in output.annotations
        ):
            raise OutputError(
                "--output type=image: descriptor annotations are not kept by lamina's image store "
                "(write them into a layout with -o type=oci)"
            )
        platforms = {a.platform for a in output.annotations if a.platform}
        if platforms:
            from lamina.oci.image import host_platform

            for platform in sorted(platforms - {str(host_platform())}):
                raise OutputError(f"invalid annotation: no platform {platform} found in source")
        kinds = {a.kind for a in output.annotations}
        if not attestations and kinds & {"index", "index-descriptor"}:
            raise OutputError("index annotations not supported for single platform export")
        if attestations and output.type is OutputType.DOCKER:
            raise OutputError("docker exporter does not currently support exporting manifest lists")
        if attestations and not output.oci_types:
            raise OutputError('cannot export attestations with "oci-mediatypes=false"')
