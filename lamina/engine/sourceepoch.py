"""SOURCE_DATE_EPOCH given as a source rather than a number, resolved before the build.

As BuildKit's Dockerfile frontend (dockerfile2llb/epoch.go, docs/build-repro.md):
the value is the `SOURCE_DATE_EPOCH` build arg (buildx passes the environment's
as that), else the Dockerfile's global `ARG SOURCE_DATE_EPOCH=...` default, and it is
- a number: that time;
- `context`: the main context's time: a git context's commit time, an HTTP context's
  Last-Modified, else the newest regular file of the archive it serves; a local
  context has none, which leaves SOURCE_DATE_EPOCH unset;
- the name of a `--build-context`: that source's time the same way (an http(s) URL or
  a git URL, timed when it is fetched; an image or a directory has none);
- the name of a stage: one that is `FROM scratch` with only ARGs and exactly one ADD
  of an http(s) or git URL (BuildKit's "source-only" stage), whose source's time it is;
- anything else is an error (`invalid SOURCE_DATE_EPOCH: X`).
The number found replaces the value every `ARG SOURCE_DATE_EPOCH` sees (none: empty).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.sourcetimes import NAME, commit_time, http_epoch
from lamina.errors import PlanError

# tempfile (which imports shutil) and subprocess are imported where a source is timed:
# every build, the no-op replay too, imports this module.

if TYPE_CHECKING:
    from lamina.engine.model import BuildOptions


def resolved(options: BuildOptions, data: bytes | None) -> BuildOptions:
    """`options` with SOURCE_DATE_EPOCH a number (or unset) when it was given as a source."""
    if options.source_date_epoch is not None or data is None:
        return options
    args = dict(options.build_args)
    text = args.get(NAME)
    plan = None
    if text is None:
        if NAME.encode() not in data:
            return options  # the common case: no default to read, no second parse
        plan = _plan(options, data)
        text = plan.global_args.get(NAME) or ""
    if not text or _number(text) is not None:
        return options  # a number or nothing: the executor takes it as it is
    from lamina.engine.steps.copyadd.gitadd import git_environ

    epoch = _from_source(text, options, plan or _plan(options, data), git_environ(options))
    args[NAME] = str(epoch) if epoch is not None else ""
    return dataclasses.replace(options, source_date_epoch=epoch, build_args=tuple(args.items()))


def _number(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _plan(options: BuildOptions, data: bytes) -> Any:
    from lamina.engine.steps.dispatch import make_plan

    return make_plan(options, data)


def _from_source(text: str, options: BuildOptions, plan: Any, environ: Mapping[str, str]) -> int | None:
    from lamina.engine.namedcontext import lookup

    if text == "context":
        return options.context_epoch
    named = lookup(options.build_contexts, text)
    if named is not None:
        return named.epoch  # found when it was fetched (engine.namedcontext)
    for stage in plan.stages:
        if stage.name is not None and stage.name == text.lower():
            url, checksum = _stage_source(stage, plan, options)
            return _url_epoch(url, checksum, environ)
    raise PlanError(f"invalid {NAME}: {text}")


def _stage_source(stage: Any, plan: Any, options: BuildOptions) -> tuple[str, str | None]:
    """The URL (and checksum) of the one ADD of a source-only stage; an error naming the stage's
    line says what makes it not one."""
    from lamina.engine.dockerfile.instructions import AddInstruction, ArgInstruction
    from lamina.engine.dockerfile.shell import expand_word

    where = f"{stage.location}: {NAME}={stage.name}"
    if stage.from_.image.lower() != "scratch":
        raise PlanError(f"{where}: {NAME} stage must use FROM scratch")
    env = {k: v for k, v in plan.global_args.items() if k != NAME}
    build_args = dict(options.build_args)
    found: tuple[str, str | None] | None = None
    for instruction in stage.instructions:
        if isinstance(instruction, ArgInstruction):
            for decl in instruction.args:
                if decl.name in build_args:
                    env[decl.name] = build_args[decl.name]
                elif decl.default is not None:
                    env[decl.name] = expand_word(decl.default, env, plan.escape)
        elif isinstance(instruction, AddInstruction):
            if found is not None:
                raise PlanError(f"{where}: {NAME} stage must contain exactly one remote ADD")
            if instruction.contents or len(instruction.sources) != 1:
                raise PlanError(f"{where}: {NAME} stage must contain exactly one remote ADD source")
            add = instruction.expand(lambda word: expand_word(word, env, plan.escape))
            found = (add.sources[0], add.checksum)
        else:
            raise PlanError(
                f"{where}: {NAME} stage does not meet source-only requirements: "
                f"unsupported {instruction.name.lower()} instruction"
            )
    if found is None:
        raise PlanError(f"{where}: {NAME} stage must contain exactly one remote ADD")
    if not _is_url(found[0]):
        raise PlanError(f"{where}: {NAME} stage source must be a single HTTP(S) or Git ADD")
    return found


def _is_url(text: str) -> bool:
    from lamina.engine.gitsource import is_git_url

    return is_git_url(text) or text.startswith(("http://", "https://"))


def _url_epoch(url: str, checksum: str | None, environ: Mapping[str, str]) -> int | None:
    """The time of a git or http(s) source; None for any other (an image, a directory)."""
    from lamina.engine.gitsource import is_git_url

    if is_git_url(url):
        return git_epoch(url, environ)
    if url.startswith(("http://", "https://")):
        return http_epoch(url, checksum)
    return None


def git_epoch(url: str, environ: Mapping[str, str]) -> int:
    """The committer time of the commit a git URL names (fetched into a scratch directory)."""
    import tempfile

    from lamina.engine.gitsource import checkout, parse_git_url

    with tempfile.TemporaryDirectory(prefix="lamina-epoch-") as work:
        repo = Path(work) / "git"
        checkout(parse_git_url(url), repo, environ, keep_git_dir=True)
        return commit_time(repo)
