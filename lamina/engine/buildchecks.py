"""Build checks for a build and for `--call check`: the front end's rules given the build's files.

`engine/dockerfile/checks.py` holds the rules and reads nothing; this module
gives them what a build has: the Dockerfile's text, the ignore file the
context uses, the build args, and the Env and Shell of base images already in
the store (an image not pulled yet is unknown, and the rules that need its
config skip that stage rather than guess).

`for_build` is called once per build, before the no-op replay, so a replayed
build shows the same warnings and `error=true` fails it the same way. What
the checks found is kept in the store's cache index (`build-checks:<hex>`,
keyed by every input they read) so that a no-op rebuild replays it without the
parser; as an index entry it is pruned like a build result (`lamina cache prune`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import LaminaError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from lamina.cache.store import Store
    from lamina.engine.dockerfile.checks import BaseFacts, CheckReport, CheckWarning
    from lamina.engine.dockerfile.parser import Dockerfile
    from lamina.engine.model import BuildOptions
    from lamina.engine.progress import ProgressSink


def platform_args(options: BuildOptions | None = None) -> dict[str, str]:
    """The automatic platform ARGs: the build is the host's, the target the first --platform
    (plan.platform_args, without importing the planner, which a replayed no-op build must not
    load)."""
    from lamina.oci.image import host_platform

    host = host_platform()
    target = options.platforms[0] if options is not None and options.platforms else host
    values = {}
    for prefix, platform in (("TARGET", target), ("BUILD", host)):
        shown = str(platform)
        if prefix == "TARGET" and platform.os_version:  # FormatAll, as plan.format_all
            shown = platform.os + f"({platform.os_version})" + shown[len(platform.os) :]
        values |= {
            f"{prefix}PLATFORM": shown,
            f"{prefix}OS": platform.os,
            f"{prefix}OSVERSION": platform.os_version,
            f"{prefix}ARCH": platform.architecture,
            f"{prefix}VARIANT": platform.variant,
        }
    return values


def display_path(options: BuildOptions) -> str:
    return shown_dockerfile(options.dockerfile or options.context / "Dockerfile", options.context)


def shown_dockerfile(path: Path, context: Path) -> str:
    """How messages name the Dockerfile `path`: as given; one read from stdin or from a fetched
    context (git, tar, http) as BuildKit does, by its path in the context ('Dockerfile',
    'sub/Dockerfile'), never contextsource.resolved()'s scratch directory, gone after the build."""
    parts = path.parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("lamina-context-") and parts[i + 1] in ("stdin", "git", "context"):
            return os.path.relpath(path, context) if context in path.parents else path.name
    return os.path.relpath(path) if not path.is_absolute() else str(path)


def ignore_patterns(context: Path, dockerfile: Path | None) -> tuple[str, ...] | None:
    """The patterns of the ignore file the build context uses (`!` for exceptions), None without one."""
    from lamina.engine.buildfiles import dockerfile_ignore_file
    from lamina.engine.dockerfile.ignore import read_ignore_file

    for candidate in (dockerfile_ignore_file(context, dockerfile), context / ".dockerignore"):
        try:
            text = candidate.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            continue
        try:
            return read_ignore_file(text, source=str(candidate)).patterns or None
        except LaminaError:
            return None  # the build reports a bad ignore file as it opens the context
    return None


def store_base_facts(
    store: Store, seen: dict[str, str | None] | None = None
) -> Callable[[str], BaseFacts | None]:
    """Env and Shell of an image in the store, by reference; None when it is not there.

    `seen` gets each reference looked up and its manifest digest (None: not in the store).
    """
    from lamina.cache.images import manifest_image
    from lamina.cache.platforms import image_platforms
    from lamina.engine.dockerfile.checks import BaseFacts
    from lamina.oci.image import Descriptor, ImageConfig, host_platform, match_platform

    def facts(ref: str) -> BaseFacts | None:
        record = _record(store, ref)
        if seen is not None:
            seen[ref] = str(record.manifest) if record is not None else None
        if record is None:
            return None
        try:
            stored = image_platforms(store, record.manifest)  # one, or each of an index
            descriptors = [Descriptor("", digest, 0, platform=p) for p, digest in stored]
            # ENV and SHELL of the host's image (an index's platforms rarely differ in them)
            chosen = match_platform(descriptors, host_platform()) or descriptors[0]
            config = ImageConfig.from_bytes(manifest_image(store, chosen.digest).config_bytes, ref)
        except (LaminaError, OSError, IndexError):
            return None
        platforms = tuple(str(p.normalized()) for p, _ in stored if p.architecture)
        return BaseFacts(config.config.env, config.config.shell, platforms)

    return facts


def _record(store: Store, ref: str) -> Any:
    from lamina.oci.reference import store_name

    try:
        return store.resolve(store_name(ref, pinned=True))
    except LaminaError:
        return None


def check(
    dockerfile: Dockerfile,
    options: BuildOptions,
    *,
    all_stages: bool,
    base_facts: Callable[[str], BaseFacts | None] | None,
) -> CheckReport:
    from lamina.engine.dockerfile.checks import config_for, run_checks

    build_args = dict(options.build_args)
    return run_checks(
        dockerfile,
        config=config_for(dockerfile, build_args),
        build_args=build_args,
        predefined=platform_args(options),
        target=options.target,
        all_stages=all_stages,
        ignore=ignore_patterns(options.context, options.dockerfile),
        base_facts=base_facts,
    )


def refuse_unsupported_build_args(build_args: Mapping[str, str]) -> None:
    """A --build-arg BuildKit gives a meaning lamina cannot honour is a one-line error naming it:
    of BuildKit's own build args (dockerui, dockerfile2llb), only a BUILDKIT_SYNTAX naming
    another front end is left; the others are honoured."""
    from lamina.errors import PlanError

    syntax = build_args.get("BUILDKIT_SYNTAX")
    if syntax:
        from lamina.engine.plan import is_dockerfile_frontend

        if not is_dockerfile_frontend(syntax):
            raise PlanError(
                f"--build-arg BUILDKIT_SYNTAX={syntax}: lamina builds with its own Dockerfile front end and"
                " cannot run another frontend image (only docker/dockerfile[:tag] is understood)"
            )


# Bump when a rule changes what it finds: a remembered finding of the old rules is then not replayed.
CHECKS_VERSION = "1"


def for_build(
    options: BuildOptions, data: bytes | None, store: Store, sink: ProgressSink
) -> tuple[CheckWarning, ...]:
    """Warn about what the checks find in the stages the build needs; raise when `error=true`.

    A Dockerfile that does not parse is left to the planner, which reports it.
    The findings are remembered in the store under everything they were made
    from (the Dockerfile, its ignore file, the build args and target, the base
    images the rules read), so that a no-op rebuild replays them without
    loading the instruction parser.
    """
    refuse_unsupported_build_args(dict(options.build_args))
    if data is None:
        return ()
    path = display_path(options)
    memo = _memo_key(options, data, path)
    remembered = _remembered(store, memo)
    if remembered is not None:
        warnings, error = remembered
    else:
        found = _check_for_build(options, data, path, store, memo)
        if found is None:
            return ()
        warnings, error = found
    if not warnings:  # the common case, where a no-op rebuild loads no rules (checkrules)
        return warnings
    from lamina.engine.dockerfile.checkrules import violation

    _show(sink, warnings)
    failure = violation(warnings, error, path)
    if failure is not None:
        sink.finish(None)
        raise failure
    return warnings


def after_build(
    options: BuildOptions,
    data: bytes | None,
    store: Store,
    sink: ProgressSink,
    earlier: tuple[CheckWarning, ...],
) -> tuple[CheckWarning, ...]:
    """Check again when the build pulled a base image the checks could not read before it.

    BuildKit resolves every base image's config before it converts the
    Dockerfile; lamina pulls during the build, so a stage on an image that was
    not in the store had its ENV and SHELL rules skipped. Those warnings come
    now, after the build (where buildx prints its warnings too); with
    `error=true` they fail it.
    """
    import json

    from lamina.engine.dockerfile.checkrules import violation

    if data is None:
        return earlier
    path = display_path(options)
    memo = _memo_key(options, data, path)
    try:
        entry = json.loads(store.cache_get(memo) or "")
        unknown = [ref for ref, digest in entry["bases"].items() if digest is None]
    except (ValueError, KeyError, TypeError, AttributeError):
        return earlier
    if not any(_record(store, ref) is not None for ref in unknown):
        return earlier
    found = _check_for_build(options, data, path, store, memo)
    if found is None:
        return earlier
    warnings, error = found
    new = tuple(w for w in warnings if w not in earlier)
    _show(sink, new)
    failure = violation(new, error, path)
    if failure is not None:
        raise failure
    return warnings


def _show(sink: ProgressSink, warnings: tuple[CheckWarning, ...]) -> None:
    """Each warning to `sink`: whole to a sink that takes checks, else as its one-line warning."""
    from lamina.engine.progress import CheckSink

    for warning in warnings:
        if isinstance(sink, CheckSink):
            sink.check(warning)
        else:
            sink.warn(warning.short())


def _check_for_build(
    options: BuildOptions, data: bytes, path: str, store: Store, memo: str
) -> tuple[tuple[CheckWarning, ...], bool] | None:
    """Run the checks and remember what they found; None when the Dockerfile does not parse."""
    import json

    from lamina.engine.dockerfile.parser import parse

    try:
        dockerfile = parse(data, path)
    except LaminaError:
        return None
    seen: dict[str, str | None] = {}
    report = check(dockerfile, options, all_stages=False, base_facts=store_base_facts(store, seen))
    if report.error is None:  # an instruction error: the planner stops the build at it
        entry = {
            "warnings": [w.to_dict() for w in report.warnings],
            "error": report.config.error,
            "bases": seen,
        }
        with contextlib.suppress(LaminaError):  # a full disk: only a later rebuild's speed needs it
            store.cache_put(memo, json.dumps(entry))
    return report.warnings, report.config.error


def _memo_key(options: BuildOptions, data: bytes, path: str) -> str:
    import hashlib
    import json

    from lamina.engine.buildfiles import dockerfile_ignore_file
    from lamina.engine.cachekey import build_checks_key

    ignore = b""
    for candidate in (
        dockerfile_ignore_file(options.context, options.dockerfile),
        options.context / ".dockerignore",
    ):
        try:
            ignore = candidate.read_bytes()
            break
        except OSError:
            continue
    digest = hashlib.sha256()
    key = [CHECKS_VERSION, path, options.target or "", sorted(options.build_args)]
    for part in (json.dumps(key).encode(), data, ignore):
        digest.update(len(part).to_bytes(8, "big") + part)
    return build_checks_key(digest.hexdigest())


def _remembered(store: Store, memo: str) -> tuple[tuple[CheckWarning, ...], bool] | None:
    """The findings kept for these inputs, unless a base image they read is another one now."""
    import json

    try:
        entry = json.loads(store.cache_get(memo) or "")
        for ref, digest in entry["bases"].items():
            record = _record(store, ref)
            if (str(record.manifest) if record is not None else None) != digest:
                return None
        if entry["warnings"] == []:  # nothing found: no rules module to load (checkrules)
            return (), bool(entry["error"])
        from lamina.engine.dockerfile.checkrules import CheckWarning

        return tuple(CheckWarning.from_dict(w) for w in entry["warnings"]), bool(entry["error"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# --- --call check|outline|targets ---------------------------------------------------------------


def print_source(path: str, data: bytes, start: int, end: int) -> str:
    """BuildKit's errdefs.Source.Print: the lines around a range, the range marked `>>>`."""
    lines = data.decode("utf-8", "replace").split("\n")
    if start < 1 or start > len(lines):
        return ""
    end = min(max(end, start), len(lines))
    first, last = start, end
    pad = 4 if start == end else 2
    p = 0
    while p < pad:
        if first > 1:
            first -= 1
            p += 1
        if last != len(lines):
            last += 1
            p += 1
        p += 1
    out = [f"{path}:{start}", "-" * 20]
    for number in range(first, last + 1):
        mark = ">>>" if start <= number <= end else "   "
        out.append(f" {number:3d} | {mark} {lines[number - 1]}")
    out.append("-" * 20)
    return "\n".join(out) + "\n"


def _check_result(
    report: CheckReport | None, error: LaminaError | None, path: str, data: bytes
) -> dict[str, object]:
    """BuildKit's lint.LintResults as JSON (`--call check,format=json`)."""
    import base64

    result: dict[str, object] = {
        "warnings": [
            {
                "ruleName": w.rule,
                "description": w.description,
                **({"url": w.url} if w.url else {}),
                "detail": w.detail,
                "location": {"ranges": [{"start": {"line": w.start_line}, "end": {"line": w.end_line}}]},
            }
            for w in (report.warnings if report is not None else ())
        ],
        "sources": [{"filename": path, "language": "Dockerfile", "data": base64.b64encode(data).decode()}],
    }
    if error is not None:
        line = getattr(getattr(error, "location", None), "line", 0) or 0
        build_error: dict[str, object] = {"message": str(error)}
        if line:
            build_error["location"] = {"ranges": [{"start": {"line": line}, "end": {"line": line}}]}
        result["buildError"] = build_error
    return result


def call(method: str, options: BuildOptions, store: Store | None) -> tuple[str, str, int]:
    """Run a frontend method instead of the build: (what to print on stdout, an error for stderr, status).

    `method` is buildx's `--call` value: `check`, `outline` or `targets`, optionally
    followed by `,format=json` and `,ignorestatus=true`.
    """
    import json

    from lamina.engine.dockerfile.parser import parse
    from lamina.engine.dockerfile.source import read_source
    from lamina.errors import PlanError

    name, fmt, ignore_status = parse_call(method)
    path = display_path(options)
    try:
        data = read_source(options.dockerfile or options.context / "Dockerfile")  # capped
    except OSError as err:
        raise PlanError(f"cannot read Dockerfile {path}: {err.strerror}") from None
    if name in ("outline", "targets"):
        return _subrequest(name, fmt, options, data, path), "", 0

    report: CheckReport | None = None
    error: LaminaError | None = None
    try:
        dockerfile = parse(data, path)
        report = check(
            dockerfile,
            options,
            all_stages=True,
            base_facts=store_base_facts(store) if store is not None else None,
        )
        error = report.error or report.violation(path)
    except LaminaError as err:
        error = err
    status = 1 if error is not None or (report is not None and report.warnings) else 0
    status = 0 if ignore_status else status
    if fmt == "json":
        return json.dumps(_check_result(report, error, path, data), indent=2) + "\n", "", status
    text, message = _check_text(report, error, path, data)
    return text, message, status


def _subrequest(name: str, fmt: str, options: BuildOptions, data: bytes, path: str) -> str:
    """`--call targets` or `--call outline`: what to print."""
    import json

    from lamina.engine.dockerfile import subrequests
    from lamina.engine.dockerfile.parser import parse

    dockerfile = parse(data, path)
    if name == "targets":
        result = subrequests.targets(dockerfile, data)
        text = subrequests.print_targets(result)
    else:
        result = subrequests.outline(
            dockerfile,
            data,
            target=options.target,
            build_args=dict(options.build_args),
            predefined=platform_args(options),
        )
        text = subrequests.print_outline(result)
    return json.dumps(result, indent=2) + "\n" if fmt == "json" else text


def _check_text(
    report: CheckReport | None, error: LaminaError | None, path: str, data: bytes
) -> tuple[str, str]:
    """`--call check` as text: (the warnings with their source lines, the error with its line)."""
    out = []
    warnings = sorted(report.warnings if report is not None else (), key=lambda w: w.start_line)
    if warnings:
        count = (
            "1 warning has been found!"
            if len(warnings) == 1
            else f"{len(warnings)} warnings have been found!"
        )
        out.append(f"Check complete, {count}\n")
    for w in warnings:
        out.append(f"\nWARNING: {w.rule}" + (f" - {w.url}" if w.url else "") + f"\n{w.detail}\n")
        out.append(print_source(path, data, w.start_line, w.end_line))
    message = ""
    if error is not None:
        line = getattr(getattr(error, "location", None), "line", 0) or 0
        message = str(error) + "\n"
        message += print_source(path, data, line, line) if line else ""
    elif not warnings:
        out.append("Check complete, no warnings found.\n")
    return "".join(out), message


def parse_call(value: str) -> tuple[str, str, bool]:
    """buildx's ParseCallFunc: `NAME[,format=json|text][,ignorestatus=BOOL]`; an error names the field."""
    from lamina.errors import PlanError

    name, fmt, ignore_status = "", "", False
    for field in value.split(","):
        key, sep, rest = field.partition("=")
        if sep and key == "format":
            fmt = rest
        elif sep and key == "ignorestatus":
            from lamina.engine.dockerfile.checks import GO_FALSE, GO_TRUE

            if rest not in GO_TRUE and rest not in GO_FALSE:
                raise PlanError(f"invalid ignorestatus print value: {rest}")
            ignore_status = rest in GO_TRUE
        elif sep:
            raise PlanError(f"invalid print field: {field}")
        elif name:
            raise PlanError(f"invalid print value: {value}")
        else:
            name = field
    name = "check" if name == "lint" else name
    if name not in ("build", "check", "outline", "targets"):
        raise PlanError(
            f"--call={value}: unknown method {name!r} (lamina's Dockerfile front end has build, check,"
            " outline and targets)"
        )
    if fmt not in ("", "json", "text"):
        raise PlanError(f"--call={value}: unknown format {fmt!r} (json or text)")
    return name, fmt, ignore_status
