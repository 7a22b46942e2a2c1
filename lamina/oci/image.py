"""OCI image documents: descriptors, manifests, indexes, image configs.

Values here are frozen and know how to turn into and out of JSON. Nothing
here touches a file.

Canonical bytes. BuildKit, containerd and docker write these documents with
Go's `encoding/json`: compact (no spaces), struct fields in declaration order,
map keys (labels, annotations, ExposedPorts, Volumes) sorted, and `<`, `>`,
`&`, U+2028, U+2029 escaped as `\\u003c`-style sequences. `canonical_json()`
does the same, so a document lamina writes hashes the same way every time
and looks like one a Go tool wrote. Documents read from elsewhere are kept
as the bytes they came in (their digest is over those bytes); these values
are for building new documents and for reading fields.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from lamina.errors import ImageFormatError
from lamina.oci.digest import Digest, InvalidDigest

# Media types, OCI and the docker v2 schema2 ones that mean the same thing.
OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# Annotations that name an image in a layout's index.json.
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# A manifest or config larger than this is refused unread: real ones are KBs.
MAX_DOCUMENT = 4 * 1024 * 1024

_ENV = re.compile(r"^[^=]+=.*$", re.DOTALL)
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


# --- canonical JSON -------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it (see the module docstring).

    Dicts keep their insertion order: callers build them in Go struct order
    and sort map-typed fields themselves (`_sorted_map`).
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # Bytes that were not UTF-8 (a Dockerfile line, a file name) arrive as lone
        # surrogates; Go's encoder writes U+FFFD for invalid UTF-8, and so do we.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def _sorted_map(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return dict(sorted(pairs))


def parse_document(data: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object of at most MAX_DOCUMENT bytes; `what` names it in errors."""
    if len(data) > MAX_DOCUMENT:
        raise ImageFormatError(f"{what}: {len(data)} bytes, more than the {MAX_DOCUMENT} allowed")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageFormatError(f"{what}: not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ImageFormatError(f"{what}: not a JSON object")
    return obj


def _get(
    obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str, default: Any = None
) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    # bool is an int in Python; JSON true is never a valid size.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ImageFormatError(f"{what}: field {key!r} has the wrong type")
    return value


def _str_map(obj: Mapping[str, Any], key: str, what: str) -> tuple[tuple[str, str], ...]:
    value = _get(obj, key, dict, what, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ImageFormatError(f"{what}: {key!r} must map strings to strings")
    return tuple(sorted(value.items()))


def _str_list(obj: Mapping[str, Any], key: str, what: str) -> tuple[str, ...] | None:
    value = _get(obj, key, list, what)
    if value is None:
        return None
    if not all(isinstance(v, str) for v in value):
        raise ImageFormatError(f"{what}: {key!r} must be a list of strings")
    return tuple(value)


def _digest(text: Any, what: str) -> Digest:
    if not isinstance(text, str):
        raise ImageFormatError(f"{what}: digest missing or not a string")
    try:
        return Digest.parse(text)
    except InvalidDigest as err:
        raise ImageFormatError(f"{what}: {err}") from err


# --- descriptors, platforms -------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Platform:
    architecture: str = "amd64"
    os: str = "linux"
    variant: str = ""
    os_version: str = ""

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            obj["os.version"] = self.os_version
        if self.variant:
            obj["variant"] = self.variant
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], what: str = "platform") -> Platform:
        return cls(
            architecture=_get(obj, "architecture", str, what, ""),
            os=_get(obj, "os", str, what, ""),
            variant=_get(obj, "variant", str, what, ""),
            os_version=_get(obj, "os.version", str, what, ""),
        )

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`os/arch[/variant]`, as --platform takes it."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageFormatError(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        return cls(architecture=parts[1], os=parts[0], variant=parts[2] if len(parts) == 3 else "")

    def normalized(self) -> Platform:
        """The platform as containerd normalises it: aarch64 and arm64/v8 are arm64, x86_64 is
        amd64, a bare arm is arm/v7; an image and a --platform compare in this form."""
        arch, variant = self.architecture.lower(), self.variant.lower()
        arch = {"aarch64": "arm64", "x86_64": "amd64", "x86-64": "amd64", "i386": "386"}.get(arch, arch)
        if arch == "arm64" and variant == "v8":
            variant = ""
        if arch == "arm" and not variant:
            variant = "v7"
        return Platform(arch, self.os.lower() or "linux", variant, self.os_version)


def host_platform() -> Platform:
    """The platform of this machine, as BuildKit names it (`linux/amd64`, `linux/arm64`,
    `linux/arm/v7`): arm64 without its implied v8, as containerd normalises it."""
    import platform

    machine = platform.machine().lower()
    arch, variant = {
        "x86_64": ("amd64", ""),
        "amd64": ("amd64", ""),
        "aarch64": ("arm64", ""),
        "arm64": ("arm64", ""),
        "armv7l": ("arm", "v7"),
        "armv6l": ("arm", "v6"),
        "i386": ("386", ""),
        "i686": ("386", ""),
    }.get(machine, (machine, ""))
    return Platform(architecture=arch, os="linux", variant=variant)


# What a platform also runs, best first (containerd's platforms.Only): an arm/v7 CPU runs
# v6 and v5 code.
_ALSO_RUNS = {("arm", "v8"): ("v7", "v6", "v5"), ("arm", "v7"): ("v6", "v5"), ("arm", "v6"): ("v5",)}


def match_platform(entries: Iterable[Descriptor], want: Platform) -> Descriptor | None:
    """The entry of an index for platform `want`, or None: the same os and architecture
    (normalised), the exact variant first, then one `want` also runs; entries with no
    platform (attestations, artifacts) never match."""
    target = want.normalized()
    same = [
        (d, d.platform.normalized())
        for d in entries
        if d.platform is not None and d.platform.normalized().os == target.os
    ]
    same = [(d, p) for d, p in same if p.architecture == target.architecture and _os_version_runs(p, target)]
    for variant in (target.variant, *_ALSO_RUNS.get((target.architecture, target.variant), ())):
        for descriptor, platform in same:
            if platform.variant == variant:
                return descriptor
    return None


def platform_matches(have: Platform, want: Platform) -> bool:
    """Whether an image of platform `have` is one for `want` (match_platform's rule)."""
    h, w = have.normalized(), want.normalized()
    variants = (w.variant, *_ALSO_RUNS.get((w.architecture, w.variant), ()))
    return (
        (h.os, h.architecture) == (w.os, w.architecture) and h.variant in variants and _os_version_runs(h, w)
    )


# Windows Server LTSC builds whose hosts run the previous LTSC's containers (containerd's
# compatLTSCReleases): 2022, 2025.
_LTSC_BUILDS = (20348, 26100)


def _windows_version(text: str) -> tuple[int, int, int] | None:
    """major.minor.build of a Windows os.version (more parts ignored), None when not one."""
    parts = text.split(".")
    try:
        major, minor, build = (int(part) for part in parts[:3])
    except ValueError:
        return None
    return (
        (major, minor, build) if len(parts) >= 3 and major < 256 and minor < 256 and build < 65536 else None
    )


def _os_version_runs(have: Platform, want: Platform) -> bool:
    """Whether an image of os.version `have` runs where `want` asks (containerd's Windows
    matcher; other systems' versions are not compared): either unset, the same major.minor,
    and the same build, or from a host of LTSC 2022 on, a build between the LTSC before it and its own."""
    if want.os != "windows" or not have.os_version:
        return True
    host, image = _windows_version(want.os_version), _windows_version(have.os_version)
    if host is None:
        return True
    if image is None or host[:2] != image[:2]:
        return False
    if host[2] < _LTSC_BUILDS[0]:
        return host[2] == image[2]
    oldest = max((b for b in _LTSC_BUILDS if b < host[2]), default=_LTSC_BUILDS[0])
    return oldest <= image[2] <= host[2]


def platforms_of(entries: Iterable[Descriptor]) -> str:
    """The platforms an index holds, for an error: `linux/amd64, linux/arm64` or `nothing`."""
    return ", ".join(sorted({str(d.platform) for d in entries if d.platform is not None})) or "nothing"


@dataclasses.dataclass(frozen=True, slots=True)
class Descriptor:
    """A typed pointer to a blob: media type, digest, exact size."""

    media_type: str
    digest: Digest
    size: int
    annotations: tuple[tuple[str, str], ...] = ()  # sorted by key
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)

    def replace_annotations(self, annotations: Mapping[str, str]) -> Descriptor:
        return dataclasses.replace(self, annotations=tuple(sorted(annotations.items())))

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.urls:
            obj["urls"] = list(self.urls)
        if self.annotations:
            obj["annotations"] = _sorted_map(self.annotations)
        if self.platform is not None:
            obj["platform"] = self.platform.to_json()
        return obj

    @classmethod
    def from_json(cls, obj: Any, what: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageFormatError(f"{what}: not a JSON object")
        size = _get(obj, "size", int, what)
        if size is None or size < 0:
            raise ImageFormatError(f"{what}: size missing or negative")
        platform = _get(obj, "platform", dict, what)
        return cls(
            media_type=_get(obj, "mediaType", str, what, ""),
            digest=_digest(obj.get("digest"), what),
            size=size,
            annotations=_str_map(obj, "annotations", what),
            platform=Platform.from_json(platform, what) if platform is not None else None,
            urls=_str_list(obj, "urls", what) or (),
        )


def descriptor_of(data: bytes, media_type: str) -> Descriptor:
    """The descriptor of an in-memory document."""
    return Descriptor(media_type, Digest.of_bytes(data), len(data))


# --- manifest, index ---------------------------------------------------------------


def _versioned(
    media_type: str, body: dict[str, Any], annotations: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """A schemaVersion 2 document (manifest or index) in Go struct order."""
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type, **body}
    if annotations:
        obj["annotations"] = _sorted_map(annotations)
    return obj


def _parse_versioned(
    data: bytes, what: str, oci_type: str, media_types: frozenset[str], kind: str
) -> tuple[dict[str, Any], str]:
    """The JSON object of a schemaVersion 2 document and its media type, one of
    `media_types`; `oci_type` when it has none (the field is optional)."""
    obj = parse_document(data, what)
    if obj.get("schemaVersion") != 2:
        raise ImageFormatError(f"{what}: schemaVersion must be 2")
    media_type = _get(obj, "mediaType", str, what, oci_type)
    if media_type not in media_types:
        raise ImageFormatError(f"{what}: media type {media_type!r} is not {kind}")
    return obj, media_type


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest.

    An image with no layers (`FROM scratch` and only metadata) gets
    `"layers": []`, as BuildKit writes it and docker, podman and skopeo
    accept it, although the spec's JSON schema says minItems 1 (its prose
    only says SHOULD). Deliberate: an empty layer would change the image.
    """

    config: Descriptor
    layers: tuple[Descriptor, ...]
    media_type: str = OCI_MANIFEST
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        body = {"config": self.config.to_json(), "layers": [layer.to_json() for layer in self.layers]}
        return _versioned(self.media_type, body, self.annotations)

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "manifest") -> Manifest:
        obj, media_type = _parse_versioned(data, what, OCI_MANIFEST, MANIFEST_TYPES, "an image manifest")
        layers = _get(obj, "layers", list, what, [])
        return cls(
            config=Descriptor.from_json(obj.get("config"), f"{what}: config"),
            layers=tuple(Descriptor.from_json(d, f"{what}: layer {i}") for i, d in enumerate(layers)),
            media_type=media_type,
            annotations=_str_map(obj, "annotations", what),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Index:
    manifests: tuple[Descriptor, ...]
    media_type: str = OCI_INDEX
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        body = {"manifests": [m.to_json() for m in self.manifests]}
        return _versioned(self.media_type, body, self.annotations)

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "index") -> Index:
        obj, media_type = _parse_versioned(data, what, OCI_INDEX, INDEX_TYPES, "an image index")
        manifests = _get(obj, "manifests", list, what, [])
        return cls(
            manifests=tuple(
                Descriptor.from_json(d, f"{what}: manifest {i}") for i, d in enumerate(manifests)
            ),
            media_type=media_type,
            annotations=_str_map(obj, "annotations", what),
        )


# --- image config ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    created: str | None = None
    created_by: str = ""
    author: str = ""
    comment: str = ""
    empty_layer: bool = False

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        if self.created:
            obj["created"] = self.created
        if self.created_by:
            obj["created_by"] = self.created_by
        if self.author:
            obj["author"] = self.author
        if self.comment:
            obj["comment"] = self.comment
        if self.empty_layer:
            obj["empty_layer"] = True
        return obj

    @classmethod
    def from_json(cls, obj: Any, what: str) -> History:
        if not isinstance(obj, dict):
            raise ImageFormatError(f"{what}: not a JSON object")
        return cls(
            created=_get(obj, "created", str, what),
            created_by=_get(obj, "created_by", str, what, ""),
            author=_get(obj, "author", str, what, ""),
            comment=_get(obj, "comment", str, what, ""),
            empty_layer=_get(obj, "empty_layer", bool, what, False),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Healthcheck:
    test: tuple[str, ...] = ()
    interval: int = 0  # nanoseconds, as docker stores them
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"Test": list(self.test)}
        for key, value in (
            ("Interval", self.interval),
            ("Timeout", self.timeout),
            ("StartPeriod", self.start_period),
            ("StartInterval", self.start_interval),
            ("Retries", self.retries),
        ):
            if value:
                obj[key] = value
        return obj

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Healthcheck:
        if not isinstance(obj, dict):
            raise ImageFormatError(f"{what}: Healthcheck is not a JSON object")
        return cls(
            test=_str_list(obj, "Test", what) or (),
            interval=_get(obj, "Interval", int, what, 0),
            timeout=_get(obj, "Timeout", int, what, 0),
            start_period=_get(obj, "StartPeriod", int, what, 0),
            start_interval=_get(obj, "StartInterval", int, what, 0),
            retries=_get(obj, "Retries", int, what, 0),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerConfig:
    """The `config` member of an image config: how to run the image.

    `None` for Entrypoint/Cmd means "unset" (inherit); `()` means "set to
    empty". Env keeps its order; Labels, ExposedPorts and Volumes are sets
    or maps and are kept sorted.
    """

    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    volumes: tuple[str, ...] = ()
    working_dir: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    stop_signal: str = ""
    args_escaped: bool = False
    healthcheck: Healthcheck | None = None
    on_build: tuple[str, ...] = ()
    shell: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        # Field order of ocispec.ImageConfig then docker's extension (BuildKit's dockerspec).
        obj: dict[str, Any] = {}
        if self.user:
            obj["User"] = self.user
        if self.exposed_ports:
            obj["ExposedPorts"] = {port: {} for port in sorted(self.exposed_ports)}
        if self.env:
            obj["Env"] = list(self.env)
        if self.entrypoint is not None:
            obj["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            obj["Cmd"] = list(self.cmd)
        if self.volumes:
            obj["Volumes"] = {volume: {} for volume in sorted(self.volumes)}
        if self.working_dir:
            obj["WorkingDir"] = self.working_dir
        if self.labels:
            obj["Labels"] = _sorted_map(self.labels)
        if self.stop_signal:
            obj["StopSignal"] = self.stop_signal
        if self.args_escaped:
            obj["ArgsEscaped"] = True
        if self.healthcheck is not None:
            obj["Healthcheck"] = self.healthcheck.to_json()
        if self.on_build:
            obj["OnBuild"] = list(self.on_build)
        if self.shell:
            obj["Shell"] = list(self.shell)
        return obj

    @classmethod
    def from_json(cls, obj: Any, what: str) -> ContainerConfig:
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise ImageFormatError(f"{what}: not a JSON object")
        healthcheck = obj.get("Healthcheck")
        return cls(
            user=_get(obj, "User", str, what, ""),
            exposed_ports=tuple(sorted(_get(obj, "ExposedPorts", dict, what, {}))),
            env=_str_list(obj, "Env", what) or (),
            entrypoint=_str_list(obj, "Entrypoint", what),
            cmd=_str_list(obj, "Cmd", what),
            volumes=tuple(sorted(_get(obj, "Volumes", dict, what, {}))),
            working_dir=_get(obj, "WorkingDir", str, what, ""),
            labels=_str_map(obj, "Labels", what),
            stop_signal=_get(obj, "StopSignal", str, what, ""),
            args_escaped=_get(obj, "ArgsEscaped", bool, what, False),
            healthcheck=Healthcheck.from_json(healthcheck, what) if healthcheck is not None else None,
            on_build=_str_list(obj, "OnBuild", what) or (),
            shell=_str_list(obj, "Shell", what) or (),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ImageConfig:
    """An image config (`application/vnd.oci.image.config.v1+json`)."""

    architecture: str = "amd64"
    os: str = "linux"
    variant: str = ""
    created: str | None = None  # RFC 3339, UTC
    author: str = ""
    config: ContainerConfig = ContainerConfig()
    diff_ids: tuple[Digest, ...] = ()
    history: tuple[History, ...] = ()
    # Further top-level fields, (name, JSON text), written after the others: an inline build
    # cache (lamina.cache.remote.INLINE_FIELD) as BuildKit writes moby.buildkit.cache.v0.
    # Not read back from a config: a base image's never reaches the images built on it.
    extra: tuple[tuple[str, str], ...] = ()
    # The target's OS version (`os.version`, Windows' 10.0.17763.1234), as BuildKit writes it.
    os_version: str = ""

    @property
    def platform(self) -> Platform:
        return Platform(self.architecture, self.os, self.variant, self.os_version)

    def to_json(self) -> dict[str, Any]:
        # ocispec.Image field order, with the embedded Platform's fields in place.
        obj: dict[str, Any] = {}
        if self.created:
            obj["created"] = self.created
        if self.author:
            obj["author"] = self.author
        obj["architecture"] = self.architecture
        obj["os"] = self.os
        if self.os_version:
            obj["os.version"] = self.os_version
        if self.variant:
            obj["variant"] = self.variant
        obj["config"] = self.config.to_json()
        obj["rootfs"] = {"type": "layers", "diff_ids": [str(d) for d in self.diff_ids]}
        if self.history:
            obj["history"] = [h.to_json() for h in self.history]
        for name, text in self.extra:
            obj[name] = json.loads(text)
        return obj

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "image config") -> ImageConfig:
        obj = parse_document(data, what)
        rootfs = _get(obj, "rootfs", dict, what)
        if rootfs is None or rootfs.get("type") != "layers":
            raise ImageFormatError(f"{what}: rootfs.type must be 'layers'")
        diff_ids = _get(rootfs, "diff_ids", list, what, [])
        history = _get(obj, "history", list, what, [])
        return cls(
            architecture=_get(obj, "architecture", str, what, ""),
            os=_get(obj, "os", str, what, ""),
            variant=_get(obj, "variant", str, what, ""),
            os_version=_get(obj, "os.version", str, what, ""),
            created=_get(obj, "created", str, what),
            author=_get(obj, "author", str, what, ""),
            config=ContainerConfig.from_json(obj.get("config"), f"{what}: config"),
            diff_ids=tuple(_digest(d, f"{what}: diff_id {i}") for i, d in enumerate(diff_ids)),
            history=tuple(History.from_json(h, f"{what}: history {i}") for i, h in enumerate(history)),
        )


def default_config(platform: Platform = Platform()) -> ImageConfig:
    """The config of an empty image (`FROM scratch`) as BuildKit starts it."""
    return ImageConfig(
        architecture=platform.architecture,
        os=platform.os,
        variant=platform.variant,
        config=ContainerConfig(env=(DEFAULT_PATH,), working_dir="/"),
    )


def format_time(epoch_seconds: int) -> str:
    """RFC 3339 in UTC with a Z, as Go's time.Time marshals a whole second."""
    moment = datetime.datetime.fromtimestamp(epoch_seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def is_rfc3339(text: str) -> bool:
    if not _RFC3339.match(text):
        return False
    try:
        datetime.datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
    except ValueError:
        return False
    return True


def is_env_entry(text: str) -> bool:
    return bool(_ENV.match(text))


def chain_ids(diff_ids: Iterable[Digest]) -> tuple[Digest, ...]:
    """ChainID of every prefix: ChainID(L0) = DiffID(L0), then sha256("<parent> <diff_id>")."""
    out: list[Digest] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append(Digest.of_bytes(f"{out[-1]} {diff_id}".encode()))
    return tuple(out)


def chain_id(diff_ids: Iterable[Digest]) -> Digest | None:
    """ChainID of the whole stack, None for no layers."""
    ids = chain_ids(diff_ids)
    return ids[-1] if ids else None
