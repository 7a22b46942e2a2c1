"""The values that cross the engine's boundaries, and what a step is given.

Types only, and the constants every step reads (the platform in each cache
key, the proxy ARGs kept out of keys and history). Steps, the remote cache
and the replay memo import this module, never the executor: the executor
makes these values and runs the steps over them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import Location, PlanError
from lamina.oci.image import host_platform

if TYPE_CHECKING:
    from lamina.engine.dockerfile.instructions import Instruction
    from lamina.engine.output import ImageLayer
    from lamina.engine.outputspec import OutputSpec
    from lamina.oci.image import ImageConfig
    from lamina.oci.reference import Reference

PROXY_ARGS = frozenset(
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for name in (base, base.lower())
)

PLATFORM = str(host_platform())  # in every cache key


# --- options and results ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SecretSpec:
    id: str
    source: Path


def parse_secret(spec: str) -> SecretSpec:
    """`--secret id=ID,src=PATH` (also `source=`, `type=file`, or `env=VAR`)."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise PlanError(f"invalid --secret {spec!r}: {part!r} is not key=value")
        fields[key.strip().lower()] = value
    secret_id = fields.get("id", "")
    if not secret_id:
        raise PlanError(f"invalid --secret {spec!r}: missing id=")
    source = fields.get("src") or fields.get("source")
    if source is None and "env" in fields:
        source = "env:" + fields["env"]
    if source is None:
        raise PlanError(f"invalid --secret {spec!r}: missing src=")
    if fields.get("type", "file") not in ("file", "env"):
        raise PlanError(f"invalid --secret {spec!r}: type must be file or env")
    return SecretSpec(secret_id, Path(source))


@dataclasses.dataclass(frozen=True, slots=True)
class CacheSpec:
    """One `--cache-to` or `--cache-from` value."""

    ref: Reference
    mode: str = "min"  # --cache-to only
    ignore_error: bool = False  # --cache-to only: a failed export is a warning


@dataclasses.dataclass(frozen=True, slots=True)
class BuildOptions:
    context: Path
    dockerfile: Path | None = None
    target: str | None = None
    build_args: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    no_cache: bool = False
    no_cache_filter: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    secrets: tuple[SecretSpec, ...] = ()
    network: str = "default"  # RUN's network: default (its own), host or none
    allow: frozenset[str] = frozenset()  # entitlements: network.host, security.insecure
    compression: str = "gzip"
    jobs: int = 1
    pull: bool = False
    cache_root: Path = Path(".lamina-cache")
    source_date_epoch: int | None = None
    # Makes a registry client when a base image must be pulled; None: never pull.
    client_factory: Callable[[], Any] | None = None
    dry_run: bool = False  # say which steps would run and why; run none, make no image
    # Registry cache (engine.remote_cache): refs to import from on a miss, refs to export to.
    cache_from: tuple[CacheSpec, ...] = ()
    cache_to: tuple[CacheSpec, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class StepRecord:
    stage: str
    index: int  # 1-based within the stage
    instruction: str
    cached: bool
    seconds: float
    key: str = ""
    reason: str = ""  # --dry-run: why the step would run


@dataclasses.dataclass(frozen=True, slots=True)
class BuildResult:
    """What a build made: the target image's digests and config, and every step's fate."""

    image_digest: str  # the manifest digest
    config_digest: str  # the image ID, as `docker build` prints it
    config: ImageConfig
    names: tuple[str, ...]
    steps: tuple[StepRecord, ...]
    seconds: float
    target: str
    pushed: tuple[tuple[str, str], ...] = ()  # (reference, digest the registry confirmed) per --push

    @property
    def steps_cached(self) -> int:
        return sum(1 for step in self.steps if step.cached)

    @property
    def steps_run(self) -> int:
        return sum(1 for step in self.steps if not step.cached)

    def metadata(self) -> dict[str, Any]:
        """The `--metadata-file` document, with buildx's keys where they exist."""
        return {
            "containerimage.digest": self.image_digest,
            "containerimage.config.digest": self.config_digest,
            "image.name": ",".join(self.names),
            "lamina.build.target": self.target,
            "lamina.build.seconds": round(self.seconds, 3),
            "lamina.build.steps": [
                {
                    "stage": step.stage,
                    "step": step.index,
                    "instruction": step.instruction,
                    "cache": "cached" if step.cached else "run",
                    "seconds": round(step.seconds, 3),
                }
                for step in self.steps
            ],
            **({"lamina.push": [{"ref": ref, "digest": d} for ref, d in self.pushed]} if self.pushed else {}),
        }


# --- stage state --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class StageOutcome:
    """A finished stage: what a later stage, COPY --from or an output needs of it."""

    name: str
    config: ImageConfig
    layers: tuple[ImageLayer, ...]
    key: str  # the chain key after the last filesystem step
    created: str | None
    args: tuple[tuple[str, str | None], ...]  # ARGs declared, passed to stages built FROM it

    @property
    def layer_dirs(self) -> tuple[Path, ...]:
        return tuple(layer.path for layer in self.layers)


@dataclasses.dataclass(slots=True)
class StageState:
    name: str
    config: ImageConfig
    layers: list[ImageLayer]
    key: str
    created: str | None
    args: dict[str, str | None]
    total: int
    index: int = 0
    cmd_set: bool = False
    no_cache: bool = False

    def outcome(self) -> StageOutcome:
        return StageOutcome(
            self.name, self.config, tuple(self.layers), self.key, self.created, tuple(self.args.items())
        )


@dataclasses.dataclass(frozen=True, slots=True)
class CacheResult:
    layer: str | None  # hex naming the layer dir in the store, None when the step changed nothing
    created: str
    inputs: str  # KeyInputs JSON, to explain a later miss

    def to_json(self) -> str:
        return json.dumps({"layer": self.layer, "created": self.created, "inputs": self.inputs})

    @classmethod
    def from_json(cls, text: str) -> CacheResult | None:
        try:
            record = json.loads(text)
            return cls(record["layer"], record["created"], record["inputs"])
        except (ValueError, KeyError, TypeError):
            return None  # a result from another version of lamina is a miss


# --- the plan -------------------------------------------------------------------------------


# Instructions that make a layer; the others only change the config.
FILESYSTEM_STEPS = frozenset({"RUN", "COPY", "ADD", "WORKDIR"})


# --- the plan ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class StagePlan:
    index: int
    name: str  # display name: the stage's name, or stage-N
    instructions: tuple[Instruction, ...]
    location: Location
    base_image: str | None  # an image reference (expanded), None for a stage or scratch
    base_stage: int | None
    deps: tuple[int, ...]  # every stage this one needs first (base, --from, mounts)


@dataclasses.dataclass(frozen=True, slots=True)
class BuildPlan:
    path: str  # the Dockerfile's display path
    escape: str
    stages: Mapping[int, StagePlan]  # only the stages the target needs
    target: int
    waves: tuple[tuple[int, ...], ...]
    global_args: Mapping[str, str]  # meta ARGs (with build-arg overrides) and platform ARGs
    build_args: Mapping[str, str]
    names: Mapping[str, int]  # stage name (lower case) -> index
    warnings: tuple[str, ...] = ()
    # Stages the target does not reach as written; an ONBUILD trigger of a base image may still name one.
    unplanned: Mapping[int, StagePlan] = dataclasses.field(default_factory=dict)
