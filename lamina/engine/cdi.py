"""CDI devices for `RUN --device=NAME[,required]`, as BuildKit's cdidevices manager gives them.

Specs are read from the CDI directories (`/etc/cdi`, `/var/run/cdi`; `$LAMINA_CDI_SPEC_DIRS`,
colon-separated, instead: the part of buildkitd.toml's `cdi.specDirs` a daemonless
builder takes from its environment), JSON always, YAML when PyYAML is installed. A
device is `KIND=NAME` (`vendor.com/class=foo`); `--device` names one, `KIND` (the first
of its kind), `KIND=*` (all of them) or a class (the annotation
`org.mobyproject.buildkit.device.class`). A device not found fails the build when
`required`, else the RUN goes without it. A device is injected only when the build
has the `device` entitlement (`--allow device`) or the device's spec annotates it
`org.mobyproject.buildkit.device.autoallow: true`.

What a device gives a RUN (its spec's and its own `containerEdits`): `env` entries,
`deviceNodes` (the host's node bound at its path) and `mounts` (bind mounts, `ro` in
their options read-only). Edits lamina cannot make (hooks, additionalGIDs, intelRdt)
are refused in one line naming the spec file, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lamina.errors import BuildError

ENV_VAR = "LAMINA_CDI_SPEC_DIRS"
DEFAULT_DIRS = ("/etc/cdi", "/var/run/cdi")
CLASS_ANNOTATION = "org.mobyproject.buildkit.device.class"
AUTOALLOW_ANNOTATION = "org.mobyproject.buildkit.device.autoallow"
_MAX_SPEC = 1 << 20
_UNSUPPORTED_EDITS = ("hooks", "additionalGIDs", "intelRdt")


@dataclasses.dataclass(frozen=True, slots=True)
class Edits:
    """What the injected devices add to a RUN."""

    env: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()  # device node paths, bound from the host at the same path
    mounts: tuple[tuple[str, str, bool], ...] = ()  # (host path, container path, read-only)


@dataclasses.dataclass(frozen=True, slots=True)
class _Device:
    name: str  # KIND=NAME
    annotations: tuple[tuple[str, str], ...]
    edits: dict[str, Any]  # the device's containerEdits
    spec_edits: dict[str, Any]  # its spec's containerEdits
    source: str  # the spec file

    @property
    def auto_allowed(self) -> bool:
        return dict(self.annotations).get(AUTOALLOW_ANNOTATION, "").lower() in ("1", "t", "true")


def spec_dirs(environ: Mapping[str, str]) -> tuple[str, ...]:
    value = environ.get(ENV_VAR)
    return tuple(d for d in value.split(":") if d) if value is not None else DEFAULT_DIRS


def load(dirs: Iterable[str]) -> list[_Device]:
    """Every device of the specs in `dirs` (later directories win for a name, as CDI's cache)."""
    found: dict[str, _Device] = {}
    for directory in dirs:
        folder = Path(directory)
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
                for device in _spec_devices(path):
                    found[device.name] = device
    return list(found.values())


def resolve(
    devices: Iterable[tuple[str, bool]], known: list[_Device], allowed: bool, where: str
) -> list[str]:
    """The device names `--device` values (name, required) select, checked against the entitlement."""
    chosen: list[_Device] = []
    for name, required in devices:
        matches = _select(name, known)
        if not matches and required:
            raise BuildError(f"{where}: required device {name!r} is not registered (CDI specs: {ENV_VAR})")
        chosen += [device for device in matches if device not in chosen]
    for device in chosen:
        if not allowed and not device.auto_allowed:
            raise BuildError(
                f"{where}: device {device.name} is requested by the build but not allowed: "
                "lamina build --allow device (or annotate it "
                f"{AUTOALLOW_ANNOTATION}: true in {device.source})"
            )
    return [device.name for device in chosen]


def edits(names: Iterable[str], known: list[_Device]) -> Edits:
    """The containerEdits of the devices `names` (each spec's once, then each device's)."""
    by_name = {device.name: device for device in known}
    env: list[str] = []
    nodes: list[str] = []
    mounts: list[tuple[str, str, bool]] = []
    seen_specs: set[str] = set()
    for name in names:
        device = by_name[name]
        parts = [device.edits]
        if device.source not in seen_specs:
            seen_specs.add(device.source)
            parts.insert(0, device.spec_edits)
        for part in parts:
            env += [str(entry) for entry in part.get("env") or []]
            nodes += [_node_path(node, device.source) for node in part.get("deviceNodes") or []]
            mounts += [_mount(mount, device.source) for mount in part.get("mounts") or []]
    return Edits(tuple(env), tuple(dict.fromkeys(nodes)), tuple(mounts))


def _select(name: str, known: list[_Device]) -> list[_Device]:
    """BuildKit's parseDevice: a qualified name, KIND (its first), KIND=* (all), else a class."""
    kind, _, device = name.partition("=")
    out: list[_Device] = []
    if "/" in kind:  # vendor.com/class: a qualified kind
        of_kind = [d for d in known if d.name.startswith(kind + "=")]
        if device == "":
            out = of_kind[:1]
        elif device == "*":
            out = of_kind
        else:
            out = [d for d in known if d.name == name]
    if not out:
        out = [d for d in known if dict(d.annotations).get(CLASS_ANNOTATION) == name]
    return out


def _spec_devices(path: Path) -> list[_Device]:
    spec = _read_spec(path)
    kind = spec.get("kind")
    if not isinstance(kind, str) or "/" not in kind:
        raise BuildError(f"CDI spec {path}: kind must be vendor/class, not {kind!r}")
    spec_edits = _edits(spec.get("containerEdits"), path)
    out = []
    for raw in spec.get("devices") or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise BuildError(f"CDI spec {path}: a device without a name")
        annotations = {**(spec.get("annotations") or {}), **(raw.get("annotations") or {})}
        pairs = tuple(
            sorted(
                (str(k), str(v).lower() if isinstance(v, bool) else str(v)) for k, v in annotations.items()
            )
        )
        out.append(
            _Device(
                f"{kind}={raw['name']}", pairs, _edits(raw.get("containerEdits"), path), spec_edits, str(path)
            )
        )
    return out


def _read_spec(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        data = file.read(_MAX_SPEC + 1)
    if len(data) > _MAX_SPEC:
        raise BuildError(f"CDI spec {path}: larger than {_MAX_SPEC} bytes")
    if path.suffix == ".json":
        try:
            spec = json.loads(data)
        except ValueError as err:
            raise BuildError(f"CDI spec {path}: {err}") from None
    else:
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise BuildError(
                f"CDI spec {path}: a YAML spec needs PyYAML (pip install pyyaml), or write it as .json"
            ) from None
        try:
            spec = yaml.safe_load(data)
        except yaml.YAMLError as err:
            raise BuildError(f"CDI spec {path}: {err}") from None
    if not isinstance(spec, dict):
        raise BuildError(f"CDI spec {path}: not a mapping")
    return spec


def _edits(raw: object, path: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BuildError(f"CDI spec {path}: containerEdits must be a mapping")
    for key in _UNSUPPORTED_EDITS:
        if raw.get(key):
            raise BuildError(f"CDI spec {path}: containerEdits.{key} is not supported by lamina")
    return raw


def _node_path(node: object, source: str) -> str:
    path = node.get("path") if isinstance(node, dict) else None
    if not isinstance(path, str) or not os.path.isabs(path):
        raise BuildError(f"CDI spec {source}: a device node needs an absolute path")
    if node.get("hostPath", path) != path or any(k in node for k in ("major", "minor", "type")):  # type: ignore[union-attr]
        raise BuildError(
            f"CDI spec {source}: device node {path}: only the host's node at the same path is bound"
        )
    return path


def _mount(mount: object, source: str) -> tuple[str, str, bool]:
    if not isinstance(mount, dict):
        raise BuildError(f"CDI spec {source}: a mount must be a mapping")
    host, target = mount.get("hostPath"), mount.get("containerPath")
    if not isinstance(host, str) or not isinstance(target, str):
        raise BuildError(f"CDI spec {source}: a mount needs hostPath and containerPath")
    options = [str(o) for o in mount.get("options") or []]
    unknown = [o for o in options if o not in ("ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec")]
    if unknown or mount.get("type") not in (None, "bind"):
        raise BuildError(f"CDI spec {source}: mount {target}: only bind mounts (ro/rw) are supported")
    return host, target, "ro" in options
