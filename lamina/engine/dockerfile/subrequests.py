"""`--call targets` and `--call outline`: what a Dockerfile offers, as BuildKit's frontend subrequests.

`targets(dockerfile)` lists every stage (name, description, whether it is the
default, its base, platform and line); `outline(dockerfile, ...)` names the
target and the build args, secrets and ssh ids it consumes, each with its
description. A description is the comment right above a FROM or ARG that
starts with the stage's or arg's name (`# GO_VERSION sets the Go version`).
Both return BuildKit's JSON shape (`to_json`) and print as buildx does
(`print_targets`, `print_outline`). Pure functions over a parsed Dockerfile.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping, Sequence

from lamina.engine.dockerfile.checks import StageSteps, Step, expand_recording, find_stage, reachable, split
from lamina.engine.dockerfile.instructions import ArgInstruction, EnvInstruction, MountType, RunInstruction
from lamina.engine.dockerfile.parser import Dockerfile, Node
from lamina.errors import InstructionError, LaminaError, Location


def doc_comment(comments: Sequence[str], name: str) -> str:
    """BuildKit's getDocComment: the rest of the first comment line that starts with `name `."""
    if not name:
        return ""
    for line in comments:
        if line.startswith(name + " "):
            return line[len(name) + 1 :]
    return ""


def _location(node: Node) -> dict[str, object]:
    return {"ranges": [{"start": {"line": node.start_line}, "end": {"line": node.end_line}}]}


def _source(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _named(stage: StageSteps) -> dict[str, object]:
    """A stage's name and the description its doc comment gives, where it has them."""
    entry: dict[str, object] = {}
    if stage.name:
        entry["name"] = stage.name
    description = doc_comment(stage.step.node.comments, stage.name or "")
    if description:
        entry["description"] = description
    return entry


def targets(dockerfile: Dockerfile, data: bytes) -> dict[str, object]:
    """BuildKit's ListTargets: every stage, the last one the default."""
    _, stages = split(dockerfile)
    listed = []
    for stage in stages:
        entry = _named(stage)
        if stage.index == len(stages) - 1:
            entry["default"] = True
        entry["base"] = stage.from_.image
        if stage.from_.platform:
            entry["platform"] = stage.from_.platform
        entry["location"] = _location(stage.step.node)
        listed.append(entry)
    return {"targets": listed, "sources": [_source(data)]}


def print_targets(result: Mapping[str, object]) -> str:
    rows = [("TARGET", "DESCRIPTION")]
    for entry in result["targets"]:  # type: ignore[attr-defined]
        name = entry.get("name", "")
        if entry.get("default"):
            name = f"{name} (default)" if name else "(default)"
        rows.append((name, entry.get("description", "")))
    return _tabulate(rows, padding=1)


def _tabulate(rows: Sequence[Sequence[str]], padding: int) -> str:
    """Go's tabwriter with minwidth 0 and `padding` blanks: every column but the last aligned."""
    widths = [max(len(row[i]) for row in rows) + padding for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("".join(cells) + row[-1])
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True, slots=True)
class _Arg:
    name: str
    value: str | None
    description: str
    line: int
    deps: frozenset[str] = frozenset()


@dataclasses.dataclass(slots=True)
class _View:
    """A stage as the outline sees it: its args (with their deps), the names it reads, its env."""

    infos: dict[str, _Arg]
    used: set[str]
    env: dict[str, str]  # ARG and ENV values so far, to expand defaults and mount ids
    mounts: list[tuple[MountType, str, bool, Node]]  # secret and ssh mounts: kind, id, required, RUN


def _outline_step(
    view: _View, step: Step, build_args: Mapping[str, str], scope: Mapping[str, str], escape: str
) -> None:
    instruction = step.instruction

    def expand(word: str) -> str:
        return expand_recording(word, view.env, escape)[0] or ""

    if isinstance(instruction, ArgInstruction):
        for decl in instruction.args:
            view.used.add(decl.name)
            description = doc_comment(step.node.comments, decl.name)
            if decl.name in build_args:
                value: str | None = build_args[decl.name]
            elif decl.default is not None:
                value = expand(decl.default)
            elif decl.name in scope:
                view.env[decl.name] = scope[decl.name]
                continue  # the global ARG's own entry stands
            else:
                value = None
            if value is not None:
                view.env[decl.name] = value
            view.infos[decl.name] = _Arg(decl.name, value, description, step.node.start_line)
    elif isinstance(instruction, EnvInstruction):
        view.env.update((kv.key, kv.value) for kv in instruction.expand(expand).env)
    elif isinstance(instruction, RunInstruction):
        try:
            mounts = instruction.expand(expand).mounts
        except LaminaError:
            return  # the build stops at it
        for mount in mounts:
            if mount.type in (MountType.SECRET, MountType.SSH):
                view.mounts.append((mount.type, mount.id, mount.required, step.node))


def outline(
    dockerfile: Dockerfile,
    data: bytes,
    *,
    target: str | None,
    build_args: Mapping[str, str],
    predefined: Mapping[str, str],
) -> dict[str, object]:
    """BuildKit's Dockerfile2Outline: the target and the build args, secrets and ssh ids it reads."""
    meta, stages = split(dockerfile)
    escape = dockerfile.escape
    index = _target_index(dockerfile, stages, target)
    scope = dict(predefined)
    scope.setdefault("TARGETSTAGE", stages[index].name or "default")
    scope.update((k, v) for k, v in build_args.items() if k in scope)
    meta_infos = _meta_args(meta, build_args, scope, escape)
    views = _stage_views(stages, meta_infos, build_args, scope, escape)

    def base_name(stage: StageSteps) -> str:
        return expand_recording(stage.from_.image, scope, escape)[0] or ""

    wanted = sorted(reachable(stages, index, base_name), key=lambda i: (i != index, i))
    args = _used_args(views, wanted)
    secrets: dict[str, tuple[bool, Node]] = {}
    ssh: dict[str, tuple[bool, Node]] = {}
    for i in sorted(wanted):
        for kind, name, required, node in views[i].mounts:
            (secrets if kind is MountType.SECRET else ssh).setdefault(name, (required, node))
    result = _named(stages[index])
    if args:
        result["args"] = [
            {
                "name": a.name,
                **({"description": a.description} if a.description else {}),
                **({"value": a.value} if a.value else {}),
                "location": {"ranges": [{"start": {"line": a.line}, "end": {"line": a.line}}]},
            }
            for a in sorted(args.values(), key=lambda a: a.line)
        ]
    for key, found_ids in (("secrets", secrets), ("ssh", ssh)):
        if found_ids:
            result[key] = [
                {"name": name, **({"required": True} if required else {}), "location": _location(node)}
                for name, (required, node) in sorted(found_ids.items(), key=lambda kv: kv[1][1].start_line)
            ]
    result["sources"] = [_source(data)]
    return result


def _target_index(dockerfile: Dockerfile, stages: Sequence[StageSteps], target: str | None) -> int:
    """The index of the `target` stage (default the last)."""
    if target is None:
        return len(stages) - 1
    found = find_stage(stages, target)
    if found is None:
        raise InstructionError(f"target stage {target!r} could not be found", Location(dockerfile.path, 0))
    return found.index


def _meta_args(
    meta: Sequence[Step], build_args: Mapping[str, str], scope: dict[str, str], escape: str
) -> dict[str, _Arg]:
    """The global ARGs (before the first FROM), each with the ARGs its default reads; their
    values go into `scope`."""
    meta_infos: dict[str, _Arg] = {}
    for step in meta:
        assert isinstance(step.instruction, ArgInstruction)
        for decl in step.instruction.args:
            description = doc_comment(step.node.comments, decl.name)
            deps: frozenset[str] = frozenset()
            value: str | None = None
            if decl.name in build_args:
                value = build_args[decl.name]
            elif decl.default is not None:
                expanded, recorder = expand_recording(decl.default, scope, escape)
                value = expanded if expanded is not None else decl.default
                deps = frozenset(recorder.matched) - {decl.name}
                if decl.name in recorder.matched and decl.name in meta_infos:
                    deps |= meta_infos[decl.name].deps
            if value is not None:
                scope[decl.name] = value
            meta_infos[decl.name] = _Arg(decl.name, value, description, step.node.start_line, deps)
    return meta_infos


def _stage_views(
    stages: Sequence[StageSteps],
    meta_infos: Mapping[str, _Arg],
    build_args: Mapping[str, str],
    scope: Mapping[str, str],
    escape: str,
) -> dict[int, _View]:
    """Each stage's view (by index), starting from its base stage's when FROM names one."""
    views: dict[int, _View] = {}
    for stage in stages:
        base = find_stage(stages[: stage.index], expand_recording(stage.from_.image, scope, escape)[0] or "")
        parent = views.get(base.index) if base is not None else None
        view = _View(dict(meta_infos), set(), {}, [])
        if parent is not None:
            view = _View(dict(parent.infos), set(parent.used), dict(parent.env), [])
        for word in (stage.from_.image, stage.from_.platform or ""):
            view.used |= set(expand_recording(word, scope, escape)[1].matched)
        for step in stage.steps:
            _outline_step(view, step, build_args, scope, escape)
        views[stage.index] = view
    return views


def _used_args(views: Mapping[int, _View], wanted: Sequence[int]) -> dict[str, _Arg]:
    """The ARGs the `wanted` stages read, with the ARGs their defaults read in turn."""
    args: dict[str, _Arg] = {}
    for i in wanted:
        view = views[i]
        pending = list(view.used)
        seen: set[str] = set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in view.infos:
                pending.extend(view.infos[name].deps)
                args.setdefault(name, view.infos[name])
    return args


def print_outline(result: Mapping[str, object]) -> str:
    out = []
    if result.get("name") or result.get("description"):
        rows = [("TARGET:", str(result.get("name") or "(default)"))]
        if result.get("description"):
            rows.append(("DESCRIPTION:", str(result["description"])))
        out.append(_tabulate(rows, padding=1) + "\n")
    if result.get("args"):
        rows = [("BUILD ARG", "VALUE", "DESCRIPTION")]
        rows += [(a["name"], a.get("value", ""), a.get("description", "")) for a in result["args"]]  # type: ignore[attr-defined]
        out.append(_tabulate(rows, padding=3) + "\n")
    for key, title in (("secrets", "SECRET"), ("ssh", "SSH")):
        if result.get(key):
            rows = [(title, "REQUIRED")]
            rows += [(s["name"], "true" if s.get("required") else "") for s in result[key]]  # type: ignore[attr-defined]
            out.append(_tabulate(rows, padding=3) + "\n")
    return "".join(out)
