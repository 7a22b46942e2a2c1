"""Build checks: BuildKit's Dockerfile linter rules, with its names, messages and lines.

`run_checks(dockerfile, ...)` walks a parsed Dockerfile as BuildKit's
dockerfile2llb does when it converts one (parse, then each stage's FROM, then
each instruction of the stages it dispatches) and returns the warnings its
linter would give, in the same order, plus the error a later step of the
conversion would stop at. It reads no files: the caller passes the
`.dockerignore` patterns and a function that says what a base image's config
holds (its Env and Shell), or None when that is not known here.

The configuration comes from the `# check=` directive, or replaces it, from the
`BUILDKIT_DOCKERFILE_CHECK` build arg; a `# check=` comment right above an
instruction adds skips for that instruction only, as BuildKit's
`WithMergedConfigFromComments`.

Which rules run where (BuildKit 0.15+):
- on every stage, as the Dockerfile is parsed: NoEmptyContinuation,
  MaintainerDeprecated, StageNameCasing, FromAsCasing,
  InvalidDefinitionDescription (experimental), DuplicateStageName,
  ReservedStageName, ConsistentInstructionCasing, InvalidDefaultArgInFrom,
  UndefinedArgInFrom, RedundantTargetPlatform, FromPlatformFlagConstDisallowed;
- on the stages dispatched (a build: those the target needs; `--call check`
  with no target: all): UndefinedVar, LegacyKeyValueFormat,
  SecretsUsedInArgOrEnv, WorkdirRelativePath, JSONArgsRecommended,
  MultipleInstructionsDisallowed, ExposeProtoCasing, ExposeInvalidFormat,
  CopyIgnoredFile.

InvalidBaseImagePlatform fires where the store holds the base image (BaseFacts
.platforms): a single image of another platform than the stage's, which BuildKit
(and lamina) then builds on as it is.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from lamina.engine.dockerfile.checkrules import (
    GO_FALSE,
    GO_TRUE,
    RULES,
    URL,
    CheckConfig,
    CheckWarning,
    Rule,
    comment_config,
    parse_check_options,
    violation,
)
from lamina.engine.dockerfile.instructions import (
    AddInstruction,
    ArgInstruction,
    CmdInstruction,
    CopyInstruction,
    EntrypointInstruction,
    EnvInstruction,
    ExposeInstruction,
    FromInstruction,
    HealthcheckInstruction,
    Instruction,
    LabelInstruction,
    RunInstruction,
    ShellInstruction,
    StopsignalInstruction,
    UserInstruction,
    VolumeInstruction,
    WorkdirInstruction,
    parse_instruction,
)
from lamina.engine.dockerfile.parser import Dockerfile, Node
from lamina.errors import DockerfileError, DockerfileSyntaxError, LaminaError, Location

__all__ = [
    "GO_FALSE",
    "GO_TRUE",
    "RULES",
    "URL",
    "BaseFacts",
    "CheckConfig",
    "CheckReport",
    "CheckWarning",
    "Rule",
    "comment_config",
    "config_for",
    "parse_check_options",
    "run_checks",
]


@dataclasses.dataclass(frozen=True, slots=True)
class BaseFacts:
    """What the checks need of a base image's config."""

    env: tuple[str, ...]  # KEY=value
    shell: tuple[str, ...]
    platforms: tuple[str, ...] = ()  # the image's platforms (normalised; several for an index)


BaseLookup = Callable[[str], "BaseFacts | None"]  # image reference -> facts, None: unknown


@dataclasses.dataclass(frozen=True, slots=True)
class CheckReport:
    warnings: tuple[CheckWarning, ...]
    config: CheckConfig
    # The error the conversion stops at (a bad instruction, a missing target): after the warnings.
    error: LaminaError | None = None

    def violation(self, path: str) -> DockerfileError | None:
        """`error=true` with warnings: BuildKit's `lint violation found for rules: …` error."""
        return violation(self.warnings, self.config.error, path)


def config_for(dockerfile: Dockerfile, build_args: Mapping[str, str]) -> CheckConfig:
    """The build's check config: BUILDKIT_DOCKERFILE_CHECK when given, else the `# check=` directive."""
    if "BUILDKIT_DOCKERFILE_CHECK" in build_args:
        try:
            return parse_check_options(build_args["BUILDKIT_DOCKERFILE_CHECK"])
        except ValueError as err:
            raise DockerfileError(
                f"failed to parse BUILDKIT_DOCKERFILE_CHECK: {err}", Location(dockerfile.path, 0)
            ) from None
    for directive in dockerfile.directives:
        if directive.name == "check":
            try:
                return parse_check_options(directive.value)
            except ValueError as err:
                raise DockerfileSyntaxError(
                    f"failed to parse check options: {err}", Location(dockerfile.path, directive.line)
                ) from None
    return CheckConfig()


# --- the walk ------------------------------------------------------------------------------------


class _Linter:
    def __init__(self, config: CheckConfig) -> None:
        self.config = config
        self.found: list[CheckWarning] = []

    def run(self, config: CheckConfig, name: str, detail: str, start: int, end: int | None = None) -> None:
        if config.enabled(RULES[name]):
            self.found.append(CheckWarning(name, detail, start, start if end is None else end))


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """An instruction with its node: the lines and the words as written."""

    node: Node
    instruction: Instruction


@dataclasses.dataclass(slots=True)
class StageSteps:
    """A FROM and the instructions up to the next one."""

    index: int
    step: Step  # the FROM
    steps: list[Step]

    @property
    def from_(self) -> FromInstruction:
        assert isinstance(self.step.instruction, FromInstruction)
        return self.step.instruction

    @property
    def name(self) -> str | None:
        return self.from_.stage_name


@dataclasses.dataclass(slots=True)
class _State:
    """What a dispatched stage has so far, as far as the rules look."""

    env: dict[str, str]
    declared: list[str]  # ARG names of the stage, in order
    shell: tuple[str, ...]
    workdir_set: bool = False
    used: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # CMD/... -> lines


class Recorder(collections.abc.Mapping[str, str]):
    """An environment that notes which names a word read and which of them were unset."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.matched: dict[str, None] = {}
        self.unmatched: dict[str, None] = {}

    def __getitem__(self, key: str) -> str:
        if key in self._env:
            self.matched[key] = None
            return self._env[key]
        self.unmatched[key] = None
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def expand_recording(word: str, env: Mapping[str, str], escape: str) -> tuple[str | None, Recorder]:
    from lamina.engine.dockerfile.shell import expand_word

    recorder = Recorder(env)
    try:
        return expand_word(word, recorder, escape), recorder
    except LaminaError:
        return None, recorder


# Default PATH BuildKit sets in a stage whose image has none (system.DefaultPathEnv on Linux).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_RESERVED_STAGE_NAMES = frozenset({"context", "scratch"})
_NON_ENV_ARGS = frozenset({"BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"})
_SECRET_DENY = re.compile(
    r"(?:_|^)(?:apikey|auth|credential|credentials|key|password|pword|passwd|secret|token)(?:_|$)", re.I
)
_SECRET_ALLOW = re.compile(r"(?:_|^)(?:public|file|version)(?:_|$)", re.I)


def split(dockerfile: Dockerfile) -> tuple[list[Step], list[StageSteps]]:
    """The ARGs before the first FROM, and the stages; an invalid instruction raises."""
    meta: list[Step] = []
    stages: list[StageSteps] = []
    for node in dockerfile.children:
        _place(Step(node, parse_instruction(node, dockerfile.path)), meta, stages)
    if not stages:
        raise DockerfileError("dockerfile contains no stages to build", Location(dockerfile.path, 0))
    return meta, stages


def _place(step: Step, meta: list[Step], stages: list[StageSteps]) -> None:
    """A FROM starts a stage; another step joins the last stage, or the ARGs before the first."""
    if isinstance(step.instruction, FromInstruction):
        stages.append(StageSteps(len(stages), step, []))
    elif stages:
        stages[-1].steps.append(step)
    else:
        meta.append(step)


def run_checks(
    dockerfile: Dockerfile,
    *,
    config: CheckConfig,
    build_args: Mapping[str, str] | None = None,
    predefined: Mapping[str, str] | None = None,
    target: str | None = None,
    all_stages: bool = False,
    ignore: Sequence[str] | None = None,
    base_facts: BaseLookup | None = None,
) -> CheckReport:
    """Every warning BuildKit's linter gives for this Dockerfile, in its order.

    `predefined` holds the platform ARGs (BUILDPLATFORM, TARGETPLATFORM, ...);
    `ignore` the build's .dockerignore patterns (`!` for exceptions), None
    when it has none; `all_stages` dispatches every stage, as `--call check`
    does when no target is given.
    """
    build_args = dict(build_args or {})
    lint = _Linter(config)
    path = dockerfile.path
    for message in dockerfile.warnings:
        line = _warning_line(message, path)
        lint.run(config, "NoEmptyContinuation", "Empty continuation line", line)

    meta: list[Step] = []
    stages: list[StageSteps] = []
    for node in dockerfile.children:
        try:
            instruction = parse_instruction(node, path)
        except LaminaError as err:
            return CheckReport(tuple(lint.found), config, err)
        own = comment_config(config, node.comments)
        _parse_time(lint, own, node, instruction)
        _place(Step(node, instruction), meta, stages)
    if not stages:
        return CheckReport(tuple(lint.found), config, None)

    _stage_names(lint, stages)
    _command_casing(lint, stages)
    escape = dockerfile.escape
    target_index = len(stages) - 1
    if target is not None:
        found = find_stage(stages, target)
        if found is None:
            err = DockerfileError(f"target stage {target!r} could not be found", Location(path, 0))
            return CheckReport(tuple(lint.found), config, err)
        target_index = found.index
    scope = _predefined_scope(predefined, build_args, stages[target_index])
    _default_base_names(lint, stages, meta, scope, escape)
    global_args, meta_keys = _meta_args(meta, scope, build_args, escape)
    for stage in stages:
        _from_args(
            lint, comment_config(config, stage.step.node.comments), stage, global_args, meta_keys, escape
        )

    every = all_stages and target is None
    _dispatch_stages(lint, stages, target_index, every, global_args, build_args, escape, ignore, base_facts)
    return CheckReport(tuple(lint.found), config, None)


def _predefined_scope(
    predefined: Mapping[str, str] | None, build_args: Mapping[str, str], target: StageSteps
) -> dict[str, str]:
    """The platform ARGs and TARGETSTAGE, with the build args that set them."""
    scope = dict(predefined or {})
    scope.setdefault("TARGETSTAGE", target.name or "default")
    for key in list(scope):
        if key in build_args:
            scope[key] = build_args[key]
    return scope


def _dispatch_stages(
    lint: _Linter,
    stages: list[StageSteps],
    target_index: int,
    every: bool,
    global_args: Mapping[str, str],
    build_args: Mapping[str, str],
    escape: str,
    ignore: Sequence[str] | None,
    base_facts: BaseLookup | None,
) -> None:
    """Dispatch the target's stages (`every` stage with `--call check` and no target) in
    order, each from its base stage's state."""
    if every:
        wanted = set(range(len(stages)))
    else:
        wanted = reachable(
            stages, target_index, lambda s: expand_recording(s.from_.image, global_args, escape)[0] or ""
        )
    states: dict[int, _State | None] = {}
    for stage in stages:
        if stage.index not in wanted:
            continue
        states[stage.index] = _dispatch(
            lint, stage, stages, states, global_args, build_args, escape, ignore, base_facts
        )


def _warning_line(message: str, path: str) -> int:
    """The line of a parser warning `PATH:LINE: ...` (the line where the instruction ends)."""
    rest = message.removeprefix(path + ":")
    number = rest.split(":", 1)[0]
    return int(number) if number.isdigit() else 0


def _lines(node: Node) -> tuple[int, int]:
    return node.start_line, node.end_line


def _parse_time(lint: _Linter, config: CheckConfig, node: Node, instruction: Instruction) -> None:
    start, end = _lines(node)
    if node.name == "maintainer":
        lint.run(
            config,
            "MaintainerDeprecated",
            "Maintainer instruction is deprecated in favor of using label",
            start,
            end,
        )
    elif isinstance(instruction, FromInstruction):
        args = node.args
        if len(args) == 3 and args[2] != args[2].lower():
            lint.run(config, "StageNameCasing", f"Stage name '{args[2]}' should be lowercase", start, end)
        keyword = node.keyword
        if len(args) >= 3 and keyword in (keyword.lower(), keyword.upper()):
            wanted = args[1].lower() if keyword == keyword.lower() else args[1].upper()
            if args[1] != wanted:
                detail = f"'{args[1]}' and '{keyword}' keywords' casing do not match"
                lint.run(config, "FromAsCasing", detail, start, end)
        if instruction.stage_name is not None:
            _definition_description(lint, config, "FROM", [instruction.stage_name], node)
    elif isinstance(instruction, ArgInstruction):
        _definition_description(lint, config, "ARG", [d.name for d in instruction.args], node)


def _definition_description(
    lint: _Linter, config: CheckConfig, what: str, keys: list[str], node: Node
) -> None:
    if not node.comments or not keys:
        return
    if node.comments[-1].split(" ")[0] in keys:
        return
    example = keys[0] if len(keys) == 1 else "<arg_key>"
    detail = f"Comment for {what} should follow the format: `# {example} <description>`"
    lint.run(config, "InvalidDefinitionDescription", detail, *_lines(node))


def _stage_names(lint: _Linter, stages: list[StageSteps]) -> None:
    seen: set[str] = set()
    for stage in stages:
        name = stage.name
        if not name:
            continue
        start, end = _lines(stage.step.node)
        if name in _RESERVED_STAGE_NAMES:
            detail = f'Stage name should not use the same name as reserved stage "{name}"'
            lint.run(lint.config, "ReservedStageName", detail, start, end)
        if name in seen:
            detail = f'Duplicate stage name "{name}", stage names should be unique'
            lint.run(lint.config, "DuplicateStageName", detail, start, end)
        seen.add(name)


def _command_casing(lint: _Linter, stages: list[StageSteps]) -> None:
    keywords = [step.node for stage in stages for step in (stage.step, *stage.steps)]
    lower = sum(1 for n in keywords if n.keyword == n.keyword.lower())
    upper = sum(1 for n in keywords if n.keyword != n.keyword.lower() and n.keyword == n.keyword.upper())
    majority_lower = lower > upper
    for node in keywords:
        keyword = node.keyword
        casing = ""
        if majority_lower and keyword.lower() != keyword:
            casing = "lowercase"
        elif not majority_lower and keyword.upper() != keyword:
            casing = "uppercase"
        if casing:
            detail = f"Command '{keyword}' should match the case of the command majority ({casing})"
            lint.run(lint.config, "ConsistentInstructionCasing", detail, *_lines(node))


def find_stage(stages: list[StageSteps], ref: str) -> StageSteps | None:
    if ref.isdigit() and ref.isascii():
        index = int(ref)
        return stages[index] if index < len(stages) else None
    found = None
    for stage in stages:
        if stage.name == ref.lower():
            found = stage  # the last of duplicate names, as BuildKit's statesByName
    return found


def reachable(
    stages: list[StageSteps], target: int, base_name: Callable[[StageSteps], str] | None = None
) -> set[int]:
    """The stages the target needs: its base stages, COPY --from and RUN --mount from= stages.

    `base_name` gives a stage's FROM name after expansion with the global ARGs
    (`FROM build-${TARGETOS}`); without it the name is taken as written.
    """
    wanted: set[int] = set()
    pending = [target]
    while pending:
        index = pending.pop()
        if index in wanted:
            continue
        wanted.add(index)
        stage = stages[index]
        base = find_stage(stages[:index], base_name(stage) if base_name else stage.from_.image)
        if base is not None:
            pending.append(base.index)
        refs: list[str] = []
        for step in stage.steps:
            instruction = step.instruction
            if isinstance(instruction, CopyInstruction) and instruction.from_:
                refs.append(instruction.from_)
            elif isinstance(instruction, RunInstruction):
                refs.extend(m.from_ for m in instruction.mounts if m.from_)
        for ref in refs:
            found = find_stage(stages, ref)
            if found is not None and found.index != index:
                pending.append(found.index)
    return wanted


def _meta_args(
    meta: list[Step], scope: Mapping[str, str], build_args: Mapping[str, str], escape: str
) -> tuple[dict[str, str], set[str]]:
    """BuildKit's buildMetaArgs: the global scope FROM lines see, and every name a meta ARG declares."""
    values = dict(scope)
    keys: set[str] = set()
    for step in meta:
        assert isinstance(step.instruction, ArgInstruction)
        for decl in step.instruction.args:
            keys.add(decl.name)
            if decl.name in build_args:
                values[decl.name] = build_args[decl.name]
            elif decl.default is not None:
                expanded, _ = expand_recording(decl.default, values, escape)
                if expanded is None:
                    continue
                values[decl.name] = expanded
    return values, keys


def _default_base_names(
    lint: _Linter, stages: list[StageSteps], meta: list[Step], scope: Mapping[str, str], escape: str
) -> None:
    """InvalidDefaultArgInFrom: each FROM with the meta ARGs' defaults only must name an image."""
    from lamina.errors import InvalidReference
    from lamina.oci.reference import parse_reference

    defaults, _ = _meta_args(meta, scope, {}, escape)
    for stage in stages:
        name, _ = expand_recording(stage.from_.image, defaults, escape)
        if name is None:
            return  # the build stops at this error later; the check gives up, as BuildKit's
        valid = bool(name) and name == name.strip()
        if valid and name != "scratch":
            try:
                parse_reference(name)
                valid = _normalized_name_ok(name)
            except InvalidReference:
                valid = False
        if not valid:
            detail = f"Default value for ARG {stage.from_.image} results in empty or invalid base image name"
            lint.run(lint.config, "InvalidDefaultArgInFrom", detail, *_lines(stage.step.node))


def _normalized_name_ok(name: str) -> bool:
    """What ParseNormalizedNamed refuses beyond the grammar: upper case in the path, a 64-hex name."""
    path = name.split("@", 1)[0]
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path = path[: len(path) - len(last)] + last.split(":", 1)[0]
    first, _, rest = path.partition("/")
    repo = rest if rest and ("." in first or ":" in first or first == "localhost") else path
    if repo != repo.lower():
        return False
    return not re.fullmatch(r"[a-f0-9]{64}", repo)


def _from_args(
    lint: _Linter,
    config: CheckConfig,
    stage: StageSteps,
    global_args: Mapping[str, str],
    meta_keys: set[str],
    escape: str,
) -> None:
    from_ = stage.from_
    start, end = _lines(stage.step.node)
    known = sorted(meta_keys | set(global_args))
    _, recorder = expand_recording(from_.image, global_args, escape)
    _undeclared_in_from(lint, config, recorder, known, start, end)
    if not from_.platform:
        return
    result, recorder = expand_recording(from_.platform, global_args, escape)
    _undeclared_in_from(lint, config, recorder, known, start, end)
    if result is None:
        return
    only = len(recorder.matched) == 1 and not recorder.unmatched and "TARGETPLATFORM" in recorder.matched
    if only and result == global_args.get("TARGETPLATFORM"):
        detail = (
            f"Setting platform to predefined {from_.platform} in FROM is redundant as this is the default"
            " behavior"
        )
        lint.run(config, "RedundantTargetPlatform", detail, start, end)
    if not recorder.matched and not recorder.unmatched:
        parts = result.lower().split("/")
        if len(parts) < 2 or not all(parts):
            return  # not a platform: the build fails on it later
        name = stage.name or ""
        if parts[0] in name or parts[1] in name:
            return
        detail = f'FROM --platform flag should not use constant value "{result}"'
        lint.run(config, "FromPlatformFlagConstDisallowed", detail, start, end)


def _undeclared_in_from(
    lint: _Linter, config: CheckConfig, recorder: Recorder, known: list[str], start: int, end: int
) -> None:
    for name in recorder.unmatched:
        if name in known:
            continue
        detail = f"FROM argument '{name}' is not declared"
        hint = _suggest(name, known)
        if hint:
            detail += f" (did you mean {hint}?)"
        lint.run(config, "UndefinedArgInFrom", detail, start, end)


def _suggest(word: str, options: Iterable[str]) -> str:
    """BuildKit's suggest.Search, case-sensitive: the closest option fewer than 3 edits away."""
    best, best_distance = "", 3
    for option in options:
        if option == word:
            return ""
        distance = _levenshtein(word, option)
        if distance < best_distance:
            best, best_distance = option, distance
    return best


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# --- dispatch-time rules ---------------------------------------------------------------------------

# The instructions whose words BuildKit expands as it dispatches them (SupportsSingleWordExpansion),
# ARG apart: an unset name they read is an UndefinedVar.
_EXPANDED = (
    EnvInstruction,
    LabelInstruction,
    AddInstruction,
    CopyInstruction,
    WorkdirInstruction,
    RunInstruction,
    UserInstruction,
    VolumeInstruction,
    StopsignalInstruction,
)
_ONCE = (CmdInstruction, EntrypointInstruction, HealthcheckInstruction)


def _dispatch(
    lint: _Linter,
    stage: StageSteps,
    stages: list[StageSteps],
    states: Mapping[int, _State | None],
    global_args: Mapping[str, str],
    build_args: Mapping[str, str],
    escape: str,
    ignore: Sequence[str] | None,
    base_facts: BaseLookup | None,
) -> _State | None:
    """Walk one stage's instructions as dispatchStages does; None when its base image is unknown here."""
    image, _ = expand_recording(stage.from_.image, global_args, escape)
    base = find_stage(stages[: stage.index], image) if image else None
    if base is not None and base.index in states:
        parent = states[base.index]
        if parent is None:
            return None
        state = _State(dict(parent.env), list(parent.declared), parent.shell, parent.workdir_set)
    elif image == "scratch" or base is not None:
        state = _State({}, [], ())
    else:
        facts = base_facts(image) if base_facts is not None and image else None
        if facts is None:
            # The image's config is not in the store before it is pulled, so neither its ENV
            # (UndefinedVar) nor its SHELL (JSONArgsRecommended) is known: skip the stage's
            # dispatch-time rules rather than guess. BuildKit resolves the config first; lamina
            # runs them again once the build has pulled it (engine.buildchecks.after_build).
            return None
        _base_platform(lint, stage, image, facts, global_args, escape)
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in facts.env)
        state = _State(env, [], facts.shell)
    state.env.setdefault("PATH", DEFAULT_PATH)
    for step in stage.steps:
        _dispatch_step(lint, state, step, global_args, build_args, escape, ignore)
    return state


def _base_platform(
    lint: _Linter,
    stage: StageSteps,
    image: str,
    facts: BaseFacts,
    global_args: Mapping[str, str],
    escape: str,
) -> None:
    """InvalidBaseImagePlatform: the base holds no image of the stage's platform (FROM
    --platform, else TARGETPLATFORM), as BuildKit's validateBaseImagePlatform."""
    from lamina.oci.image import Platform

    written = stage.from_.platform
    expected = (
        expand_recording(written, global_args, escape)[0] if written else global_args.get("TARGETPLATFORM")
    )
    if not expected or not facts.platforms:
        return
    try:
        want = str(Platform.parse(expected).normalized())
    except DockerfileError:
        return  # not a platform: the build says so
    if want in facts.platforms:
        return
    config = comment_config(lint.config, stage.step.node.comments)
    start, end = _lines(stage.step.node)
    have = facts.platforms[0]
    detail = f'Base image {image} was pulled with platform "{have}", expected "{want}" for current build'
    lint.run(config, "InvalidBaseImagePlatform", detail, start, end)


def _dispatch_step(
    lint: _Linter,
    state: _State,
    step: Step,
    global_args: Mapping[str, str],
    build_args: Mapping[str, str],
    escape: str,
    ignore: Sequence[str] | None,
) -> None:
    node, instruction = step.node, step.instruction
    config = comment_config(lint.config, node.comments)
    start, end = _lines(node)
    name = node.keyword  # the instruction as written, as BuildKit's c.Name()

    def expander(word: str) -> str:
        result, recorder = expand_recording(word, state.env, escape)
        _undefined(lint, config, recorder, state, start, end)
        if result is None:
            raise DockerfileError("expansion failed")  # the build reports it; the checks stop here
        return result

    expanded: Instruction = instruction
    if isinstance(instruction, _EXPANDED):
        try:
            expanded = instruction.expand(expander)
        except LaminaError:
            return
        if isinstance(expanded, (CopyInstruction, AddInstruction)):
            _heredoc_variables(lint, config, state, instruction, start, end)

    if isinstance(expanded, EnvInstruction):
        for i, pair in enumerate(expanded.env):
            if node.args[3 * i + 2] == "":
                detail = f'"{name} key=value" should be used instead of legacy "{name} key value" format'
                lint.run(config, "LegacyKeyValueFormat", detail, start, end)
            _secret(lint, config, "ENV", pair.key, start, end)
            state.env[pair.key] = pair.value
    elif isinstance(expanded, LabelInstruction):
        for i in range(len(expanded.labels)):
            if node.args[3 * i + 2] == "":
                detail = f'"{name} key=value" should be used instead of legacy "{name} key value" format'
                lint.run(config, "LegacyKeyValueFormat", detail, start, end)
    elif isinstance(expanded, ArgInstruction):
        _dispatch_arg(lint, config, state, expanded, global_args, build_args, escape, start, end)
    elif isinstance(expanded, WorkdirInstruction):
        if not state.workdir_set and not expanded.path.startswith("/"):
            detail = (
                f'Relative workdir "{expanded.path}" can have unexpected results if the base image changes'
            )
            lint.run(config, "WorkdirRelativePath", detail, start, end)
        state.workdir_set = True
    elif isinstance(expanded, ShellInstruction):
        state.shell = expanded.shell
    elif isinstance(expanded, ExposeInstruction):
        _expose(lint, config, expanded, state, escape, start, end)
    elif isinstance(expanded, (CopyInstruction, AddInstruction)) and ignore and not _from_stage(expanded):
        _ignored_sources(lint, config, expanded, ignore, start, end)
    _once_and_json_args(lint, config, state, expanded, name, start, end)


def _heredoc_variables(
    lint: _Linter, config: CheckConfig, state: _State, instruction: Instruction, start: int, end: int
) -> None:
    """UndefinedVar for the variables a COPY/ADD heredoc expands."""
    for content in instruction.contents:
        if content.expand:
            _, recorder = expand_recording(content.data, state.env, "\\")
            _undefined(lint, config, recorder, state, start, end)


def _dispatch_arg(
    lint: _Linter,
    config: CheckConfig,
    state: _State,
    arg: ArgInstruction,
    global_args: Mapping[str, str],
    build_args: Mapping[str, str],
    escape: str,
    start: int,
    end: int,
) -> None:
    """An ARG's declarations into the stage's state (SecretsUsedInArgOrEnv, UndefinedVar)."""
    for decl in arg.args:
        _secret(lint, config, "ARG", decl.name, start, end)
        value: str | None = None
        if decl.name in build_args:
            value = build_args[decl.name]
        elif decl.default is not None:
            result, recorder = expand_recording(decl.default, state.env, escape)
            _undefined(lint, config, recorder, state, start, end)
            if result is None:
                return
            value = result
        elif decl.name in global_args:
            value = global_args[decl.name]
        if value is not None and decl.name not in _NON_ENV_ARGS:
            state.env[decl.name] = value
        state.declared.append(decl.name)


def _once_and_json_args(
    lint: _Linter, config: CheckConfig, state: _State, expanded: Instruction, name: str, start: int, end: int
) -> None:
    """MultipleInstructionsDisallowed (CMD, ENTRYPOINT, HEALTHCHECK) and JSONArgsRecommended."""
    if isinstance(expanded, _ONCE):
        kind = type(expanded).__name__
        earlier = state.used.get(kind)
        if earlier is not None:
            detail = (
                f"Multiple {name} instructions should not be used in the same stage because only the last"
                " one will be used"
            )
            lint.run(config, "MultipleInstructionsDisallowed", detail, *earlier)
        state.used[kind] = (start, end)
    shell_form = isinstance(expanded, (CmdInstruction, EntrypointInstruction)) and not expanded.exec_form
    if shell_form and not state.shell:
        detail = f"JSON arguments recommended for {name} to prevent unintended behavior related to OS signals"
        lint.run(config, "JSONArgsRecommended", detail, start, end)


def _from_stage(instruction: CopyInstruction | AddInstruction) -> bool:
    return isinstance(instruction, CopyInstruction) and bool(instruction.from_)


def _undefined(
    lint: _Linter, config: CheckConfig, recorder: Recorder, state: _State, start: int, end: int
) -> None:
    for name in recorder.unmatched:
        if name in state.declared or name in _NON_ENV_ARGS:
            continue
        detail = f"Usage of undefined variable '${name}'"
        hint = _suggest(name, state.env)
        if hint:
            detail += f" (did you mean ${hint}?)"
        lint.run(config, "UndefinedVar", detail, start, end)


def _secret(lint: _Linter, config: CheckConfig, what: str, key: str, start: int, end: int) -> None:
    if _SECRET_DENY.search(key) and not _SECRET_ALLOW.search(key):
        detail = f'Do not use ARG or ENV instructions for sensitive data ({what} "{key}")'
        lint.run(config, "SecretsUsedInArgOrEnv", detail, start, end)


def _expose(
    lint: _Linter,
    config: CheckConfig,
    expose: ExposeInstruction,
    state: _State,
    escape: str,
    start: int,
    end: int,
) -> None:
    for port in expose.ports:
        parts = port.split(":")
        container = parts[-1]
        ip = ":".join(parts[:-2]) if len(parts) > 2 else ""
        host = parts[-2] if len(parts) > 1 else ""
        proto = container.partition("/")[2]
        if proto != proto.lower():
            lint.run(
                config,
                "ExposeProtoCasing",
                f"Defined protocol '{port}' in EXPOSE instruction should be lowercase",
                start,
                end,
            )
        if ip or host:
            detail = (
                f"EXPOSE instruction should not define an IP address or host-port mapping, found '{port}'"
            )
            lint.run(config, "ExposeInvalidFormat", detail, start, end)


def _ignored_sources(
    lint: _Linter,
    config: CheckConfig,
    instruction: CopyInstruction | AddInstruction,
    ignore: Sequence[str],
    start: int,
    end: int,
) -> None:
    """CopyIgnoredFile: a source the .dockerignore leaves out (not judged when it has `!` exceptions)."""
    from lamina.engine.dockerfile.ignore import DockerIgnore, clean_path

    if any(p.startswith("!") for p in ignore):
        return
    matcher = DockerIgnore(ignore)
    what = "Add" if isinstance(instruction, AddInstruction) else "Copy"
    for source in instruction.sources:
        if isinstance(instruction, AddInstruction) and _is_remote(source):
            continue
        src = clean_path(source)
        if src in (".", "/"):
            if not any(p in ("*", "**", "**/*") for p in ignore):
                continue
            excluded = True
        else:
            excluded = matcher.excludes(src)
        if excluded:
            detail = f'Attempting to {what} file "{src}" that is excluded by .dockerignore'
            lint.run(config, "CopyIgnoredFile", detail, start, end)


def _is_remote(source: str) -> bool:
    return (
        source.startswith(("http://", "https://", "git@", "git://"))
        or ".git#" in source
        or source.endswith(".git")
    )
