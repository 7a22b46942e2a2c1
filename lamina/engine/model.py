"""The values that cross the engine's boundaries, and what a step is given.

Types only, and the constant steps read (PLATFORM: the host's, a stage's
platform unless --platform or FROM --platform names another; a stage's own
is StageState.platform, in each of its cache keys). Steps, the step cache
and the replay memo import this module, never the executor: the executor
makes these values and runs the steps over them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lamina.errors import PlanError
from lamina.oci.image import host_platform

if TYPE_CHECKING:
    import threading

    from lamina.cache.remote import CacheSpec
    from lamina.cache.statcache import StatCache
    from lamina.cache.store import Store
    from lamina.engine.cachekey import KeyInputs
    from lamina.engine.context import SourceTree
    from lamina.engine.namedcontext import NamedContext
    from lamina.engine.output import ImageLayer
    from lamina.engine.outputspec import OutputSpec
    from lamina.engine.plan import Plan
    from lamina.engine.progress import ProgressSink
    from lamina.engine.sandbox.isolation import Isolation
    from lamina.engine.sandbox.spec import Ulimit
    from lamina.engine.sourcepolicy import Policy
    from lamina.engine.sshforward import SshAgent
    from lamina.oci.image import ImageConfig, Platform

PLATFORM = str(host_platform())  # the host's: a stage's platform unless --platform says otherwise


# --- options and results ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SecretSpec:
    id: str
    source: Path  # a file, or `env:VAR`
    # An env secret's value as the build's environment had it (None: read os.environ when used).
    value: str | None = dataclasses.field(default=None, repr=False, compare=False)


def parse_secret(spec: str, environ: Mapping[str, str] | None = None) -> SecretSpec:
    """`--secret` as buildx reads it: `id=ID[,src=PATH|source=PATH][,env=VAR][,type=file|env]`,
    CSV fields. With neither src nor env, ID names an environment variable when `environ` (default
    os.environ) has it, else a file (BuildKit's secretsprovider.NewStore). An env secret's source
    is `env:VAR`; `env=` wins over `src=`, as there."""
    import csv
    import os

    try:
        parts = next(csv.reader([spec]))
    except (csv.Error, StopIteration):
        raise PlanError(f"invalid --secret {spec!r}: not CSV") from None
    fields: dict[str, str] = {}
    kind = ""
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.lower()
        if not sep:
            raise PlanError(f"invalid --secret {spec!r}: field {part!r} must be a key=value pair")
        if key == "type":
            if value not in ("file", "env"):
                raise PlanError(f"invalid --secret {spec!r}: unsupported secret type {value!r}")
            kind = value
        elif key in ("id", "src", "source", "env"):
            fields["source" if key == "src" else key] = value
        else:
            raise PlanError(f"invalid --secret {spec!r}: unexpected key {key!r} in {part!r}")
    if kind == "env" and not fields.get("env"):
        fields["env"] = fields.pop("source", "")
    secret_id = fields.get("id", "")
    if not secret_id:
        raise PlanError(f"invalid --secret {spec!r}: missing id=")
    env, source = fields.get("env", ""), fields.get("source", "")
    if not env and not source:
        env = secret_id if secret_id in (os.environ if environ is None else environ) else ""
        source = "" if env else secret_id
    if not env:
        return SecretSpec(secret_id, Path(source))
    value = None if environ is None else environ.get(env, "")  # unset: empty, as BuildKit's os.Getenv
    return SecretSpec(secret_id, Path("env:" + env), value)


@dataclasses.dataclass(frozen=True, slots=True)
class BuildOptions:
    context: Path
    dockerfile: Path | None = None
    target: str | None = None
    build_args: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    # --provenance: its attributes (mode=min|max, builder-id=, reproducible=); None attaches none.
    provenance: tuple[tuple[str, str], ...] | None = None
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
    # Registry cache (cache.remote): refs to import from on a miss, refs to export to.
    cache_from: tuple[CacheSpec, ...] = ()
    cache_to: tuple[CacheSpec, ...] = ()
    # Build inputs as buildx takes them (engine.sshforward, sandbox.spec, engine.namedcontext):
    ssh: tuple[SshAgent, ...] = ()  # --ssh: agents RUN --mount=type=ssh reaches, by id
    add_hosts: tuple[tuple[str, str], ...] = ()  # --add-host NAME:IP, appended to RUN's /etc/hosts
    ulimits: tuple[Ulimit, ...] = ()  # --ulimit NAME=SOFT:HARD for every RUN
    shm_size: int = 0  # --shm-size: bytes of RUN's /dev/shm; 0 is the default 64 MiB
    cgroup_parent: str = ""  # --cgroup-parent: every RUN in /<it>/buildkit/<id> (sandbox.cgroups)
    memory: int = 0  # the frontend attribute memory=: bytes a RUN's cgroup may use; 0: no limit
    build_contexts: tuple[NamedContext, ...] = ()  # --build-context NAME=...: images/stages replaced
    remote_context: bool = False  # a git or tar (stdin) context: BuildKit applies no .dockerignore
    # SOURCE_DATE_EPOCH=context (engine.sourceepoch): a git context's commit time, an HTTP one's
    # Last-Modified or newest file; None for a local context.
    context_epoch: int | None = None
    isolation: Isolation | None = None  # --isolation for RUN steps; None: $LAMINA_ISOLATION, else auto
    source_policy: Policy | None = None  # $EXPERIMENTAL_BUILDKIT_SOURCE_POLICY (engine.sourcepolicy)
    cdi_dirs: tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")  # RUN --device's CDI specs (engine.cdi)
    sbom: tuple[tuple[str, str], ...] | None = None  # --sbom: generator= and its params (engine.sbom)
    # --platform: the target platforms, normalised (plan.parse_platforms); () builds the host's.
    platforms: tuple[Platform, ...] = ()
    # When only the store needs the image (executor._finish decides), leave its new layers
    # uncompressed and its manifest to the first reader (cache.store "Pending images");
    # `lamina build` sets it, the API only on request (its result names the manifest).
    lazy_image: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class StepRecord:
    stage: str
    index: int  # 1-based within the stage
    instruction: str
    cached: bool
    seconds: float
    key: str = ""
    reason: str = ""  # why the step ran (or, with --dry-run, would run); "" when cached


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
    checks: tuple[Any, ...] = ()  # build-check warnings (engine/dockerfile/checks.CheckWarning)
    # A multi-platform build's image index: image_digest is the index's and so is the image ID
    # (buildx's getImageID, as BuildKit gives no containerimage.config.digest for an index).
    index: bool = False
    # A lazy build's stored image whose manifest is made on first use (BuildOptions.lazy_image);
    # image_digest is "" then, as docker's moby exporter names only the image ID.
    pending: str = ""

    @property
    def steps_cached(self) -> int:
        return sum(1 for step in self.steps if step.cached)

    @property
    def steps_run(self) -> int:
        return sum(1 for step in self.steps if not step.cached)

    def metadata(self) -> dict[str, Any]:
        """The `--metadata-file` document, with buildx's keys where they exist."""
        document = {
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
                    **({"reason": step.reason} if step.reason else {}),
                }
                for step in self.steps
            ],
            **({"lamina.push": [{"ref": ref, "digest": d} for ref, d in self.pushed]} if self.pushed else {}),
            **({"buildx.build.warnings": [_warning_json(w) for w in self.checks]} if self.checks else {}),
        }
        if self.index:
            del document["containerimage.config.digest"]
        return document


def _warning_json(warning: Any) -> dict[str, Any]:
    """A build-check warning as buildx writes it to the metadata file (a VertexWarning: bytes in base64)."""
    import base64

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "level": 1,
        "short": b64(warning.short()),
        "detail": [b64(warning.description)],
        **({"url": warning.url} if warning.url else {}),
        "range": [{"start": {"line": warning.start_line}, "end": {"line": warning.end_line}}],
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
    base: str = ""  # "image REF@DIGEST", "stage NAME@KEY" or "scratch": names a changed base in a miss
    ran: str = ""  # the last step of this stage that ran (or will): names the cause of a later miss
    unknown: str = ""  # --dry-run: the step whose result cannot be known before it runs, if any
    platform: str = PLATFORM  # the stage's platform (plan.PlannedStage.stage_platform): in every key
    label: str = ""  # how progress names the stage when it is not its name: `linux/arm64 build`
    one_stage: bool = False  # the Dockerfile's only stage: BuildKit's progress names no stage

    @property
    def shown(self) -> str:
        """The stage as progress and step records name it (BuildKit's `[linux/arm64 build 2/4]`)."""
        return self.label or self.name

    @property
    def in_progress(self) -> str | None:
        """The stage as a progress label names it (progress.StepEvent.label); None: `shown`."""
        if not self.one_stage:
            return None
        return self.label.removesuffix(" " + self.name) if self.label else ""

    @property
    def in_errors(self) -> str:
        """The stage as an error names it: `build`, or `build (linux/arm64)` when progress names
        its platform (a multi-platform build)."""
        return f"{self.name} ({self.platform})" if self.label else self.name

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


# --- what a step is given --------------------------------------------------------------------


class StepCache(Protocol):
    """The step cache as a step sees it (engine.stepcache.BuildStepCache): look a key up
    (locally, then --cache-from), commit an upper dir as a step's layer, explain a miss."""

    def lookup(self, inputs: KeyInputs, state: StageState) -> CacheResult | None: ...
    def fetch_remote(self, inputs: KeyInputs, state: StageState) -> CacheResult | None: ...
    def fetch_defined(
        self, defined: KeyInputs, state: StageState
    ) -> tuple[CacheResult, KeyInputs] | None: ...
    def define(self, defined: KeyInputs, inputs: KeyInputs) -> None: ...
    def commit_layer(self, inputs: KeyInputs, state: StageState, upper: Path) -> CacheResult: ...
    def apply_result(
        self, state: StageState, inputs: KeyInputs, result: CacheResult, step: str = ""
    ) -> bool: ...
    def step_lock(self, key: str) -> AbstractContextManager[None]: ...
    def new_upper(self) -> Path: ...
    def step_position(self, state: StageState, instruction: Any, same_text: str = "") -> str: ...
    def remember_position(self, where: str, inputs: KeyInputs) -> None: ...
    def explain(
        self, where: str, inputs: KeyInputs, state: StageState, line: str = "", same_text: str = ""
    ) -> str: ...


@runtime_checkable
class StepHost(Protocol):
    """Everything a step may read and do; the executor is the one implementation.

    Steps and the base-image loader are given this and import it from here,
    never the executor, so that a step can be read (and tested) without the
    scheduler behind it.

    Read: the build options and plan, the store, the build context (opened on
    first use), other stages' outcomes (built on first use) and read-only
    trees of their files, the stage's `created` time. Do: report progress
    (`sink`, `warn_once`, `record`); look a step up in the cache, commit its
    layer and explain a miss through `cache` (a `StepCache`). A RUN's process
    is started by the step itself through the sandbox package.
    """

    options: BuildOptions
    plan: Plan  # the front end's plan (lamina.engine.plan), the one plan type
    store: Store
    sink: ProgressSink
    epoch: int | None  # SOURCE_DATE_EPOCH
    stop: threading.Event  # set on Ctrl-C: long copies poll it
    cache: StepCache  # the step cache: local index, --cache-from, miss explanations
    dirty: set[str]  # --dry-run: stages with a step that would run
    images: dict[tuple[str, str], StageOutcome]  # base images loaded by this build, by (ref, platform)
    totals: dict[str, int]  # stage name -> its filesystem steps, for the replay memo
    froms: dict[str, str]  # stage name -> `FROM image`, its step 1 (a stage from an image)
    pruned_cache_ids: dict[str, object]  # cache mount ids a RUN ignoring the cache emptied (steps.cachemount)
    temp_files: list[Path]  # removed when the build ends
    lost_owners: dict[Path, dict[str, tuple[int, int]]]  # stage_rootfs tree -> owners it could not keep
    fetched: dict[str, Any]  # ADD <url>: what this build fetched, by URL

    def outcome(self, index: int) -> StageOutcome: ...
    def image_lock(self, ref: str) -> threading.Lock: ...
    def context(self) -> SourceTree: ...
    def stat_cache(self) -> StatCache: ...
    def stage_rootfs(self, outcome: StageOutcome, paths: Sequence[str] = ("/",)) -> Path: ...
    def created(self, state: StageState) -> str | None: ...
    def warn_once(self, message: str) -> None: ...
    def record(self, record: StepRecord) -> None: ...
