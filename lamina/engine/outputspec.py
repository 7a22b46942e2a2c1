"""`-o/--output` specs, parsed as buildx does (writing them is lamina.engine.output).

    -o type=oci,dest=img.tar         OCI archive (also carries manifest.json)
    -o type=docker,dest=img.tar      docker-archive, for `docker load`
    -o type=local,dest=DIR           the target's root filesystem
    -o type=tar,dest=rootfs.tar      the root filesystem as one tar
    -o type=image[,name=a:b]         the local image store (the default)
    -o DIR                           shorthand for type=local,dest=DIR
    -o -                             shorthand for type=tar to stdout

`dest=-` writes the archive to stdout. A no-op rebuild parses its outputs
and writes none: this module keeps that path light.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path

from lamina.errors import OutputError


class OutputType(enum.Enum):
    IMAGE = "image"
    OCI = "oci"
    DOCKER = "docker"
    LOCAL = "local"
    TAR = "tar"


@dataclasses.dataclass(frozen=True, slots=True)
class OutputSpec:
    type: OutputType
    dest: str = ""  # a path, or "-" for stdout; "" for type=image
    names: tuple[str, ...] = ()  # name=... (comma-joined in buildx; quoted form not supported)
    compression: str = ""  # "" means the build's --compression
    tar: bool = True  # type=oci,tar=false writes a layout directory

    @property
    def to_stdout(self) -> bool:
        return self.dest == "-"


_KNOWN_KEYS = {"type", "dest", "name", "compression", "tar", "oci-mediatypes", "force-compression"}


def parse_output(spec: str) -> OutputSpec:
    """One `-o` value: `type=...,dest=...`, or buildx's `DIR` / `-` shorthands."""
    text = spec.strip()
    if not text:
        raise OutputError("empty --output value")
    if text == "-":
        return OutputSpec(OutputType.TAR, dest="-")
    if "=" not in text:
        return OutputSpec(OutputType.LOCAL, dest=text)
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise OutputError(f"invalid --output {spec!r}: {part!r} is not key=value")
        if key not in _KNOWN_KEYS:
            raise OutputError(f"invalid --output {spec!r}: unknown key {key!r}")
        if key == "name" and "name" in fields:
            fields["name"] += "," + value
        else:
            fields[key] = value
    kind = fields.get("type", "")
    if not kind:
        raise OutputError(f"invalid --output {spec!r}: missing type=")
    if kind == "registry":
        raise OutputError("--output type=registry is not supported: build, then `lamina push`")
    try:
        output_type = OutputType(kind)
    except ValueError:
        choices = ", ".join(t.value for t in OutputType)
        raise OutputError(f"invalid --output {spec!r}: unknown type {kind!r} (use {choices})") from None
    dest = fields.get("dest", "")
    if output_type is not OutputType.IMAGE and not dest:
        raise OutputError(f"invalid --output {spec!r}: type={kind} needs dest=")
    compression = fields.get("compression", "")
    if compression and compression not in ("gzip", "zstd", "uncompressed", "none"):
        raise OutputError(f"invalid --output {spec!r}: compression must be gzip, zstd or uncompressed")
    if compression == "uncompressed":
        compression = "none"
    tar_value = fields.get("tar", "true").lower()
    if tar_value not in ("true", "false"):
        raise OutputError(f"invalid --output {spec!r}: tar must be true or false")
    names = tuple(name for name in fields.get("name", "").split(",") if name)
    return OutputSpec(output_type, dest, names, compression, tar_value == "true")


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
        raise OutputError(f"{what}: directory {dest.parent} does not exist")
