"""Stages -> a build plan: the stage DAG, ARG scoping and target pruning.

`make_plan` is a pure function over a parsed Dockerfile. The resulting
`Plan` is what the executor runs (the one plan type: `lamina plan` prints
it, the executor schedules its `waves` and hands each `PlannedStage` to
steps.dispatch.run_stage):

- every stage as a `PlannedStage` (instructions, base, dependencies), by index;
- `order`: the stages the target needs, dependencies first;
- `waves`: the same stages grouped so that each wave only needs earlier waves
  (the stages of one wave can build concurrently);
- `skipped`: stages the target does not reach (`needed` maps the others by
  index; `names` maps every stage name, lower case, to its index);
- `global_args`: the global ARG scope (platform ARGs, then the ARGs before
  the first FROM with --build-arg applied), used to expand FROM lines and to
  give a stage's `ARG NAME` (no default) its value; `resolve_arg` applies the
  precedence rules when the executor meets an ARG.

Dependencies come from `FROM <stage>`, `COPY --from=<stage|index>` and
`RUN --mount=from=<stage>`. A `--from` naming neither a stage nor an index
is an image reference (listed in `PlannedStage.images`). As in BuildKit,
`--from` is never expanded: a word with a variable (COPY) or a `$` before its
end (RUN --mount) is refused with BuildKit's workaround (a stage FROM a global
ARG), so no value a base image's ENV holds can change the graph. That ENV is
seen where BuildKit sees it, by the executor (ARG defaults, WORKDIR, paths,
mount values; tests/test_base_image_env.py).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from lamina.engine.dockerfile.instructions import (
    ArgDecl,
    ArgInstruction,
    CopyInstruction,
    EnvInstruction,
    Expander,
    ExposeInstruction,
    FromInstruction,
    Instruction,
    KeyValue,
    RunInstruction,
    Stage,
    StopsignalInstruction,
    check_signal,
    parse_ports,
    parse_stages,
)
from lamina.engine.dockerfile.parser import Dockerfile
from lamina.errors import DockerfileError, ExpansionError, InstructionError, Location, PlanError
from lamina.oci.image import Platform, host_platform

PROXY_ARGS = frozenset(
    {
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "FTP_PROXY",
        "ftp_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    }
)
PLATFORM_ARGS = (
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETOSVERSION",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDOSVERSION",
    "BUILDARCH",
    "BUILDVARIANT",
)
# Build args BuildKit itself reads: never reported as unused.
BUILTIN_ARGS = frozenset({"SOURCE_DATE_EPOCH", "TARGETSTAGE"})
SCRATCH = "scratch"


# How users and images spell architectures, as containerd's platforms.Normalize reads them.
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm",
                 "i386": "386", "i686": "386"}  # fmt: skip


def normalize_platform(platform: Platform) -> Platform:
    """`platform` as BuildKit names it: linux/aarch64 -> linux/arm64, arm64/v8 -> arm64,
    arm -> arm/v7, armel -> arm/v6, x86_64 -> amd64 (containerd's Normalize)."""
    arch = platform.architecture.lower()
    variant = platform.variant.lower()
    if arch == "armel":
        variant = variant or "v6"
    elif arch in ("armhf", "arm"):
        variant = variant or "v7"
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch == "arm64" and variant == "v8":
        variant = ""
    if arch == "amd64" and variant == "v1":
        variant = ""
    return dataclasses.replace(platform, os=platform.os.lower(), architecture=arch, variant=variant)


_OS_NAMES = frozenset({"linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris", "illumos"})
# containerd's knownArchs: a lone word is one of them (or an OS) or no platform at all.
_ARCH_NAMES = frozenset(
    (
        *("386", "amd64", "amd64p32", "arm", "armbe", "arm64", "arm64be", "ppc64", "ppc64le", "loong64"),
        *("mips", "mipsle", "mips64", "mips64le", "mips64p32", "mips64p32le", "ppc", "riscv", "riscv64"),
        *("s390", "s390x", "sparc", "sparc64", "wasm"),
    )
)


def format_all(platform: Platform) -> str:
    """`os[(os.version)]/arch[/variant]`, as containerd's platforms.FormatAll (TARGETPLATFORM)."""
    text = str(platform)
    if not platform.os_version:
        return text
    return platform.os + f"({platform.os_version})" + text[len(platform.os) :]


_OS_VERSION = re.compile(r"([^()/]+)\(([^()]*)\)(/.*)?")


def parse_platform(text: str) -> Platform:
    """One platform as containerd's platforms.Parse takes it, normalised: `os/arch[/variant]`
    (the OS may carry its version, `windows(10.0.20348)/amd64`), or a lone OS (this host's
    architecture) or a lone architecture (linux)."""
    versioned = _OS_VERSION.fullmatch(text.strip())
    if versioned is not None:
        os_name, version, rest = versioned.groups()
        bare = parse_platform(os_name + (rest or ""))
        return dataclasses.replace(bare, os_version=version)
    parts = text.strip().lower().split("/")
    if len(parts) == 1 and parts[0]:
        host = host_platform()
        if parts[0] in _OS_NAMES:
            return normalize_platform(dataclasses.replace(host, os=parts[0]))
        if parts[0] not in _ARCH_NAMES and parts[0] not in _ARCH_ALIASES:
            raise PlanError(f"{parts[0]}: unknown operating system or architecture")
        return normalize_platform(Platform(architecture=parts[0], os="linux"))
    return normalize_platform(Platform.parse(text))


def parse_platforms(texts: Iterable[str]) -> tuple[Platform, ...]:
    """`--platform a,b c`: each `os/arch[/variant]` normalised, duplicates dropped, in order."""
    from lamina.errors import LaminaError

    found: dict[str, Platform] = {}
    for text in texts:
        for part in text.split(","):
            if not part.strip():
                continue
            try:
                # buildx's platformutil: `local` is this machine's platform
                platform = host_platform() if part.strip() == "local" else parse_platform(part)
            except LaminaError as err:
                raise PlanError(f"--platform {part.strip()}: {err}") from None
            found.setdefault(format_all(platform), platform)
    return tuple(found.values())


def platform_args(target: Platform, build: Platform) -> tuple[KeyValue, ...]:
    # BuildKit's defaultArgs: TARGETPLATFORM is FormatAll (with an OS version), BUILDPLATFORM Format.
    return (
        KeyValue("TARGETPLATFORM", format_all(target)),
        KeyValue("TARGETOS", target.os),
        KeyValue("TARGETOSVERSION", target.os_version),
        KeyValue("TARGETARCH", target.architecture),
        KeyValue("TARGETVARIANT", target.variant),
        KeyValue("BUILDPLATFORM", str(build)),
        KeyValue("BUILDOS", build.os),
        KeyValue("BUILDOSVERSION", build.os_version),
        KeyValue("BUILDARCH", build.architecture),
        KeyValue("BUILDVARIANT", build.variant),
    )


class BaseKind(enum.Enum):
    IMAGE = "image"
    STAGE = "stage"
    SCRATCH = "scratch"


@dataclasses.dataclass(frozen=True, slots=True)
class Base:
    """What a stage starts from: an image reference, an earlier stage, or nothing."""

    kind: BaseKind
    image: str | None = None  # the reference after ARG expansion, as written
    stage: int | None = None

    def describe(self, plan: Plan | None = None) -> str:
        if self.kind is BaseKind.STAGE:
            assert self.stage is not None
            name = plan.stages[self.stage].display_name if plan is not None else f"stage-{self.stage}"
            return f"stage {name}"
        return self.image or SCRATCH


class DependencyKind(enum.Enum):
    FROM = "FROM"
    COPY_FROM = "COPY --from"
    MOUNT_FROM = "RUN --mount from"


@dataclasses.dataclass(frozen=True, slots=True)
class Dependency:
    stage: int
    kind: DependencyKind
    location: Location


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedStage:
    """One stage as the executor sees it.

    `instructions` excludes the FROM (which is `from_`, expanded). `args`
    holds the values the stage's own ARG lines take, resolved statically (a
    default that refers to a base image's ENV expands to empty here).
    """

    index: int
    name: str | None
    from_: FromInstruction
    instructions: tuple[Instruction, ...]
    base: Base
    platform: str | None
    dependencies: tuple[Dependency, ...]
    images: tuple[str, ...]  # image references read with COPY --from / mount from=
    args: tuple[KeyValue, ...]
    # What the stage builds for: FROM --platform, else its base stage's, else the target's; FROM
    # scratch always the target's (BuildKit's dispatchState.platform). Its cache keys and base
    # images are this platform's.
    stage_platform: Platform

    @property
    def deps(self) -> tuple[int, ...]:
        """Indices of the stages this one needs, ascending."""
        return tuple(sorted({d.stage for d in self.dependencies}))

    @property
    def display_name(self) -> str:
        return self.name if self.name is not None else f"stage-{self.index}"

    @property
    def location(self) -> Location:
        return self.from_.location

    @property
    def base_image(self) -> str | None:
        """The image reference (expanded) the stage starts from; None for a stage or scratch."""
        return self.base.image if self.base.kind is BaseKind.IMAGE else None

    @property
    def base_stage(self) -> int | None:
        """The index of the stage this one is built FROM, if any."""
        return self.base.stage if self.base.kind is BaseKind.STAGE else None


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    path: str  # the Dockerfile, for messages
    context: str
    stages: tuple[PlannedStage, ...]  # every stage, by index
    target: int
    order: tuple[int, ...]  # stages to build, each after what it needs
    waves: tuple[tuple[int, ...], ...]
    skipped: tuple[int, ...]
    global_args: Mapping[str, str]  # read-only, in declaration order
    build_args: Mapping[str, str]  # --build-arg values, read-only
    target_platform: Platform
    build_platform: Platform
    escape: str = "\\"
    syntax: str | None = None
    warnings: tuple[str, ...] = ()

    def stage(self, ref: str | int) -> PlannedStage:
        """A stage by index or (case-insensitive) name."""
        found = _find_stage(self.stages, ref)
        if found is None:
            raise PlanError(f"no stage {ref!r} in {self.path}")
        return found

    @property
    def needed(self) -> Mapping[int, PlannedStage]:
        """The stages the target needs, by index (an ONBUILD trigger may still name another)."""
        return {index: self.stages[index] for index in self.order}

    @property
    def names(self) -> Mapping[str, int]:
        """Stage name (lower case) -> index, for every named stage."""
        return {s.name.lower(): s.index for s in self.stages if s.name}

    @property
    def proxy_args(self) -> tuple[KeyValue, ...]:
        """Proxy build args: in every RUN's environment without an ARG line,
        but kept out of cache keys and history unless a stage declares them."""
        return tuple(KeyValue(key, value) for key, value in self.build_args.items() if key in PROXY_ARGS)

    def identity(self, index: int) -> tuple[object, ...]:
        """What makes stage `index` the same stage in another target platform's plan: its
        index, platform, expanded FROM, ARG values and the identities of what it needs. A
        `FROM --platform=$BUILDPLATFORM` stage that reads no TARGET* ARG has one identity for
        every target, so a multi-platform build runs it once. (What a base image's ONBUILD
        triggers read, e.g. `ARG TARGETARCH`, executor.Executor._identity adds.)"""
        stage = self.stages[index]
        return (
            index,
            format_all(stage.stage_platform),
            # COPY --from=<image> reads the image of the target platform (an implicit stage)
            str(self.target_platform) if stage.images else "",
            stage.from_.image,
            stage.args,
            tuple(self.identity(dep) for dep in stage.deps),
        )

    def resolve_arg(self, decl: ArgDecl, expander: Expander) -> str | None:
        """The value an in-stage `ARG` takes; None when declared without one.

        --build-arg beats the default; without a default the global value
        (a pre-FROM ARG or a platform ARG) is taken; `expander` expands the
        default with what the stage has set so far.
        """
        return arg_value(decl, self.build_args, expander, self.global_args)


def arg_value(
    decl: ArgDecl, build_args: Mapping[str, str], expand: Expander, outer: Mapping[str, str]
) -> str | None:
    """What an ARG line sets `decl.name` to: the --build-arg, else its default
    expanded, else the value from the outer scope; None when none of them."""
    if decl.name in build_args:
        return build_args[decl.name]
    if decl.default is not None:
        return expand(decl.default)
    return outer.get(decl.name)


_S = TypeVar("_S", Stage, PlannedStage)


def _stage_index(text: str) -> int | None:
    """`text` as a stage index: ASCII digits only (str.isdigit also takes `²`,
    which int() then refuses); a very long one is some index past the end."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0")
    return int(digits or "0") if len(digits) <= 18 else 10**18


def _find_stage(stages: Sequence[_S], ref: str | int) -> _S | None:
    items = stages
    index = ref if isinstance(ref, int) else _stage_index(ref)
    if index is not None:
        return items[index] if 0 <= index < len(items) else None
    wanted = ref.lower()
    for stage in reversed(items):  # a duplicated name means its last stage, as BuildKit's statesByName
        if stage.name == wanted:
            return stage
    return None


def parse_build_args(specs: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`K=V` -> {K: V}; a bare `K` takes K from the environment, like docker."""
    import os

    env = os.environ if environ is None else environ
    args: dict[str, str] = {}
    for spec in specs:
        key, eq, value = spec.partition("=")
        if not key:
            raise PlanError(f"invalid --build-arg {spec!r}: expected KEY=VALUE")
        if eq:
            args[key] = value
        elif key in env:
            args[key] = env[key]
    return args


# --- planning -------------------------------------------------------------------------


def _expander(env: Mapping[str, str], escape: str, location: Location) -> Expander:
    from lamina.engine.dockerfile.shell import expand_word

    def expand(word: str) -> str:
        try:
            return expand_word(word, env, escape)
        except ExpansionError as err:
            raise InstructionError(str(err), location) from None

    return expand


def _global_scope(
    meta_args: Iterable[ArgInstruction],
    build_args: Mapping[str, str],
    predefined: Iterable[KeyValue],
    escape: str,
) -> tuple[dict[str, str], set[str]]:
    """The values visible to FROM lines and the names the meta ARGs declare."""
    scope = {kv.key: kv.value for kv in predefined}
    declared: set[str] = set()
    for instruction in meta_args:
        expand = _expander(scope, escape, instruction.location)
        # Every name of one ARG line sees the scope from before that line.
        values: dict[str, str] = {}
        for decl in instruction.args:
            declared.add(decl.name)
            value = arg_value(decl, build_args, expand, scope)
            if value is not None:
                values[decl.name] = value
        scope.update(values)
    return scope, declared


@dataclasses.dataclass(slots=True)
class _StageWalk:
    """What one stage's own lines tell statically: its ARG values and its --from uses."""

    args: list[KeyValue] = dataclasses.field(default_factory=list)
    froms: list[tuple[str, DependencyKind, Location]] = dataclasses.field(default_factory=list)
    declared: set[str] = dataclasses.field(default_factory=set)


def _walk_stage(
    stage: Stage, scope: Mapping[str, str], build_args: Mapping[str, str], escape: str
) -> _StageWalk:
    walk = _StageWalk()
    env: dict[str, str] = {}
    for instruction in stage.instructions:
        expand = _expander(env, escape, instruction.location)
        if isinstance(instruction, ArgInstruction):
            for decl in instruction.args:
                walk.declared.add(decl.name)
                value = arg_value(decl, build_args, expand, scope)
                if value is not None:
                    env[decl.name] = value
                    walk.args.append(KeyValue(decl.name, value))
        elif isinstance(instruction, EnvInstruction):
            env.update((kv.key, kv.value) for kv in instruction.expand(expand).env)
        elif isinstance(instruction, CopyInstruction) and instruction.from_ is not None:
            # BuildKit's toCommand: --from is a literal; a word the shell would change is refused.
            if _expander({}, escape, instruction.location)(instruction.from_) != instruction.from_:
                raise InstructionError(
                    f"COPY --from={instruction.from_}: variable expansion is not supported for --from,"
                    " define a new stage with FROM using ARG from global scope as a workaround",
                    instruction.location,
                )
            walk.froms.append((instruction.from_, DependencyKind.COPY_FROM, instruction.location))
        elif isinstance(instruction, RunInstruction):
            for mount in instruction.mounts:  # `from` is a literal: no expansion needed
                if mount.from_:
                    walk.froms.append((mount.from_, DependencyKind.MOUNT_FROM, instruction.location))
    return walk


# The frontends lamina's own front end stands for: docker/dockerfile and
# docker/dockerfile-upstream, any tag or digest, with or without docker.io/.
_DOCKERFILE_FRONTEND = re.compile(
    r"(?:(?:docker\.io|index\.docker\.io|registry-1\.docker\.io)/)?docker/dockerfile(?:-upstream)?"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


def is_dockerfile_frontend(ref: str) -> bool:
    """Whether a `# syntax=` (or BUILDKIT_SYNTAX) image is the docker/dockerfile front end."""
    return _DOCKERFILE_FRONTEND.fullmatch(ref.strip()) is not None


def _check_syntax(dockerfile: Dockerfile) -> None:
    """`# syntax=` naming another frontend image: BuildKit would run that image; lamina cannot."""
    for directive in dockerfile.directives:
        if directive.name == "syntax" and not _DOCKERFILE_FRONTEND.fullmatch(directive.value.strip()):
            raise InstructionError(
                f"# syntax={directive.value}: lamina builds with its own Dockerfile front end and cannot"
                " run another frontend image (only docker/dockerfile[:tag] is understood)",
                Location(dockerfile.path, directive.line),
            )


_PLATFORM_PART = re.compile(r"[A-Za-z0-9_.-]+")


def _check_platform_value(written: str, value: str, scope: Mapping[str, str], location: Location) -> None:
    """`FROM --platform=` expanding to nothing or to no platform is an error, as BuildKit's (not ignored)."""
    from lamina.engine.dockerfile.instructions import suggest
    from lamina.engine.dockerfile.shell import referenced_names

    if not value:
        message = f"empty platform value from expression {written}"
        unset = sorted(name for name in referenced_names(written) if name not in scope)
        hint = suggest(unset[0], scope) if unset else None
        raise InstructionError(message + (f" (did you mean {hint}?)" if hint else ""), location)
    for part in value.split("/"):
        if not _PLATFORM_PART.fullmatch(part):
            raise InstructionError(
                f"failed to parse platform {written}: {_go_quote(part)} is an invalid component of"
                f' {_go_quote(value)}: platform specifier component must match "^[A-Za-z0-9_.-]+$"',
                location,
            )


def _go_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_reference(text: str, location: Location, what: str) -> None:
    from lamina.errors import InvalidReference
    from lamina.oci.reference import parse_reference

    try:
        parse_reference(text)
    except InvalidReference as err:
        raise InstructionError(f"{what}: {err}", location) from None


def _resolve_from(
    text: str, kind: DependencyKind, location: Location, stages: tuple[Stage, ...]
) -> Dependency | str:
    """A --from value -> a dependency on a stage, or an image reference."""
    if not text:
        raise InstructionError(f"{kind.value}: empty stage or image name", location)
    index = _stage_index(text)
    if index is not None:
        if index >= len(stages):
            raise PlanError(
                f"{location}: {kind.value}={text}: there is no stage {index} ({len(stages)} stages)"
            )
        return Dependency(index, kind, location)
    stage = _find_stage(stages, text)
    if stage is not None:
        return Dependency(stage.index, kind, location)
    _check_reference(text, location, f"{kind.value}={text}")
    return text


def make_plan(
    dockerfile: Dockerfile,
    *,
    target: str | None = None,
    build_args: Mapping[str, str] | None = None,
    context: str = ".",
    target_platform: Platform | None = None,
    build_platform: Platform | None = None,
) -> Plan:
    """Plan the build of `target` (default: the last stage) from a parsed Dockerfile.

    One pass in BuildKit's order, kept in one function as the global ARG scope it
    grows (TARGETSTAGE, the target) is what every later part reads.
    """
    build_args = dict(build_args or {})
    if "BUILDKIT_SYNTAX" not in build_args:  # the build arg stands for the directive (buildchecks)
        _check_syntax(dockerfile)
    parsed = parse_stages(dockerfile)
    stages = parsed.stages
    build = build_platform or host_platform()
    target_platform = target_platform or build
    predefined = platform_args(target_platform, build)
    escape = dockerfile.escape
    scope, meta_declared = _global_scope(parsed.meta_args, build_args, predefined, escape)
    target_index = len(stages) - 1
    # BuildKit's defaultArgs: the target's name, else the last stage's, else "default".
    scope.setdefault("TARGETSTAGE", (stages[target_index].name if stages else "") or "default")
    if target is not None:
        found = _find_stage(stages, target)  # a name, or an index (names cannot start with a digit)
        if found is None:
            names = ", ".join(s.name for s in stages if s.name) or "none"
            raise PlanError(
                f"target stage {target!r} could not be found in {dockerfile.path} (named stages: {names})"
            )
        target_index = found.index
        if stages[target_index].name:
            scope["TARGETSTAGE"] = stages[target_index].name or "default"

    declared = set(meta_declared)
    planned: list[PlannedStage] = []
    walks: list[_StageWalk] = []
    for stage in stages:  # in file order: the first stage in error is the one named
        one, walk = _plan_stage(stage, stages, scope, build_args, escape, (target_platform, planned))
        planned.append(one)
        walks.append(walk)
    order = _topological_order(planned, target_index, dockerfile.path)
    needed = set(order)
    _check_needed(planned, stages, order, escape)
    for index in order:
        declared |= walks[index].declared
    unused = sorted(k for k in build_args if k not in declared and k not in PROXY_ARGS and not _builtin(k))
    warnings = []
    if unused:
        warnings.append(f"build args not consumed by any stage the target needs: {', '.join(unused)}")
    return Plan(
        path=dockerfile.path,
        context=context,
        stages=tuple(planned),
        target=target_index,
        order=order,
        waves=_waves(planned, order),
        skipped=tuple(i for i in range(len(planned)) if i not in needed),
        global_args=types.MappingProxyType(dict(scope)),
        build_args=types.MappingProxyType(dict(build_args)),
        target_platform=target_platform,
        build_platform=build,
        escape=escape,
        syntax=dockerfile.directive("syntax"),
        warnings=tuple(warnings),
    )


def _plan_stage(
    stage: Stage,
    stages: Sequence[Stage],
    scope: Mapping[str, str],
    build_args: Mapping[str, str],
    escape: str,
    platforms: tuple[Platform, Sequence[PlannedStage]],
) -> tuple[PlannedStage, _StageWalk]:
    """One stage planned: its FROM expanded and resolved (image, earlier stage or scratch),
    then its lines walked for ARG values and `--from` references (stages it needs, images
    it reads)."""
    location = stage.from_.location
    from_ = stage.from_.expand(_expander(scope, escape, location))
    if not from_.image:
        raise InstructionError(f"base name ({stage.from_.image}) should not be blank", location)
    target_platform, earlier_planned = platforms
    platform = target_platform
    if from_.platform is not None:
        _check_platform_value(stage.from_.platform or "", from_.platform, scope, location)
        platform = _stage_platform(stage.from_.platform or "", from_.platform, location)
    dependencies: list[Dependency] = []
    earlier = _find_stage(stages[: stage.index], from_.image)
    if earlier is not None and _stage_index(from_.image) is None:
        base = Base(BaseKind.STAGE, stage=earlier.index)
        dependencies.append(Dependency(earlier.index, DependencyKind.FROM, location))
        if from_.platform is None:  # a stage built FROM another builds for its platform (BuildKit)
            platform = earlier_planned[earlier.index].stage_platform
    elif from_.image == SCRATCH:
        base = Base(BaseKind.SCRATCH)
        platform = target_platform  # BuildKit's convert.go: scratch is the target's, --platform or not
    else:
        _check_reference(from_.image, location, "FROM")
        base = Base(BaseKind.IMAGE, image=from_.image)
    walk = _walk_stage(stage, scope, build_args, escape)
    images: list[str] = []
    for text, kind, where in walk.froms:
        resolved = _resolve_from(text, kind, where, tuple(stages))
        if isinstance(resolved, str):
            images.append(resolved)
        elif resolved.stage == stage.index:
            raise PlanError(f"{where}: {kind.value}={text}: a stage cannot depend on itself")
        else:
            dependencies.append(resolved)
    planned = PlannedStage(
        index=stage.index,
        name=stage.name,
        from_=from_,
        instructions=stage.instructions,
        base=base,
        platform=from_.platform,
        dependencies=tuple(dependencies),
        images=tuple(dict.fromkeys(images)),
        args=tuple(walk.args),
        stage_platform=platform,
    )
    return planned, walk


def _stage_platform(written: str, value: str, location: Location) -> Platform:
    from lamina.errors import LaminaError

    try:
        return parse_platform(value)
    except LaminaError:
        raise InstructionError(
            f"failed to parse platform {written}: {_go_quote(value)}: expected os/arch[/variant]", location
        ) from None


def _check_needed(
    planned: list[PlannedStage], stages: Sequence[Stage], order: Sequence[int], escape: str
) -> None:
    """What BuildKit refuses in the stages the target needs, before anything runs."""
    for index in order:
        # BuildKit dispatches the stages in file order and copies only from one
        # already dispatched (convert.go); a RUN --mount=from may look ahead.
        for dep in planned[index].dependencies:
            if dep.kind is DependencyKind.COPY_FROM and dep.stage > index:
                source, current = stages[dep.stage], stages[index]
                raise PlanError(
                    f"{dep.location}: cannot copy from stage {source.name or dep.stage!s},"
                    f" it needs to be defined before current stage {current.name or index!s}"
                )
    for index in order:
        for instruction in stages[index].instructions:
            _check_literal_words(instruction, escape)


def _check_literal_words(instruction: Instruction, escape: str) -> None:
    """STOPSIGNAL and EXPOSE words that read no variable are final already:
    check them before anything runs, at their line (the executor checks the
    others once expanded). Only stages the target needs, as BuildKit."""
    from lamina.engine.dockerfile.shell import expand_word, referenced_names

    if isinstance(instruction, StopsignalInstruction):
        words: tuple[str, ...] = (instruction.signal,)
    elif isinstance(instruction, ExposeInstruction):
        words = instruction.ports
    else:
        return
    try:
        if any(referenced_names(word, escape) for word in words):
            return
        expanded = instruction.expand(lambda word: expand_word(word, {}, escape))
        if isinstance(expanded, StopsignalInstruction):
            check_signal(expanded.signal)
        else:
            parse_ports(expanded.ports)
    except ExpansionError as err:
        raise InstructionError(str(err), instruction.location) from None
    except DockerfileError as err:
        raise err.with_location(instruction.location) from None


def _builtin(name: str) -> bool:
    return name in BUILTIN_ARGS or name in PLATFORM_ARGS or name.startswith("BUILDKIT_")


def _topological_order(stages: list[PlannedStage], target: int, path: str) -> tuple[int, ...]:
    """Stages reachable from `target`, dependencies first, ties by file order."""
    order: list[int] = []
    state: dict[int, str] = {}  # "visiting" or "done"

    def visit(index: int, chain: tuple[int, ...]) -> None:
        mark = state.get(index)
        if mark == "done":
            return
        if mark == "visiting":
            names = " -> ".join(stages[i].display_name for i in (*chain, index))
            raise PlanError(f"{path}: circular dependency between stages: {names}")
        state[index] = "visiting"
        for dep in stages[index].deps:
            visit(dep, (*chain, index))
        state[index] = "done"
        order.append(index)

    visit(target, ())
    # Depth-first post-order already puts dependencies first; sorting by
    # (wave, index) keeps the order stable and readable.
    level = _levels(stages, order)
    return tuple(sorted(order, key=lambda i: (level[i], i)))


def _levels(stages: list[PlannedStage], order: Iterable[int]) -> dict[int, int]:
    level: dict[int, int] = {}
    for index in order:  # dependencies come before dependents in `order`
        deps = stages[index].deps
        level[index] = 1 + max((level[d] for d in deps), default=-1)
    return level


def _waves(stages: list[PlannedStage], order: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    level = _levels(stages, order)
    count = max(level.values(), default=-1) + 1
    return tuple(tuple(i for i in order if level[i] == n) for n in range(count))


# --- rendering --------------------------------------------------------------------------


def _dep_text(plan: Plan, dep: Dependency) -> str:
    return f"{plan.stages[dep.stage].display_name} ({dep.kind.value}, line {dep.location.line})"


def to_text(plan: Plan) -> str:
    """The `lamina plan` report for people."""
    names = {s.index: s.display_name for s in plan.stages}
    lines = [
        f"Dockerfile: {plan.path}",
        f"target: {names[plan.target]} (stage {plan.target})",
        f"platform: {plan.target_platform} (build platform {plan.build_platform})",
        "",
        "stages:",
    ]
    for stage in plan.stages:
        skipped = "  [skipped]" if stage.index in plan.skipped else ""
        platform = f" --platform={stage.platform}" if stage.platform else ""
        lines.append(
            f"  {stage.index}  {stage.display_name}  FROM{platform} {stage.base.describe(plan)}{skipped}"
        )
        lines.append(
            f"       line {stage.location.line}, {len(stage.instructions)} instructions,"
            f" builds for {stage.stage_platform}"
        )
        deps = ", ".join(_dep_text(plan, d) for d in stage.dependencies)
        lines.append(f"       needs: {deps or '-'}")
        if stage.images:
            lines.append(f"       images: {', '.join(stage.images)}")
    lines += ["", "run order: " + " -> ".join(names[i] for i in plan.order), "concurrency waves:"]
    for number, wave in enumerate(plan.waves, 1):
        lines.append(f"  {number}: {', '.join(names[i] for i in wave)}")
    lines.append("skipped: " + (", ".join(names[i] for i in plan.skipped) or "-"))
    return "\n".join(lines) + "\n"


def to_json(plan: Plan) -> dict[str, object]:
    """The `lamina plan --format json` document."""
    return {
        "dockerfile": plan.path,
        "context": plan.context,
        "syntax": plan.syntax,
        "target": plan.target,
        "target_platform": str(plan.target_platform),
        "build_platform": str(plan.build_platform),
        "stages": [
            {
                "index": s.index,
                "name": s.name,
                "line": s.location.line,
                "base": {"kind": s.base.kind.value, "image": s.base.image, "stage": s.base.stage},
                "platform": s.platform,
                "stage_platform": str(s.stage_platform),
                "deps": list(s.deps),
                "dependencies": [
                    {"stage": d.stage, "kind": d.kind.value, "line": d.location.line} for d in s.dependencies
                ],
                "images": list(s.images),
                "instructions": [{"keyword": i.name, "line": i.location.line} for i in s.instructions],
                "args": {kv.key: kv.value for kv in s.args},
                "skipped": s.index in plan.skipped,
            }
            for s in plan.stages
        ],
        "order": list(plan.order),
        "waves": [list(w) for w in plan.waves],
        "skipped": list(plan.skipped),
        "global_args": dict(plan.global_args),
        "warnings": list(plan.warnings),
    }


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(plan: Plan) -> str:
    """The stage graph for Graphviz: stages as boxes, images as ellipses, skipped greyed."""
    lines = ["digraph stages {", "  rankdir=LR;", "  node [shape=box];"]
    images: dict[str, str] = {}
    for stage in plan.stages:
        label = f"{stage.index}: {stage.display_name}"
        if stage.base.kind is not BaseKind.STAGE:
            label += f"\\nFROM {stage.base.describe()}"
        style = ", style=dashed, color=gray, fontcolor=gray" if stage.index in plan.skipped else ""
        if stage.index == plan.target:
            style += ", penwidth=2"
        lines.append(f'  s{stage.index} [label="{label}"{style}];')
    for stage in plan.stages:
        for dep in stage.dependencies:
            lines.append(f"  s{dep.stage} -> s{stage.index} [label={_dot_quote(dep.kind.value)}];")
        for image in stage.images:
            node = images.setdefault(image, f"i{len(images)}")
            lines.append(f"  {node} -> s{stage.index} [style=dotted];")
    for image, node in images.items():
        lines.append(f"  {node} [shape=ellipse, label={_dot_quote(image)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
