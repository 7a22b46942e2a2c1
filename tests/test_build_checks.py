"""Build checks (engine/dockerfile/checks.py) against BuildKit's own lint cases.

Each `tests/conformance/buildkit-lint/<case>/` holds a Dockerfile, an optional
`dockerignore` and an `expected` file ported from BuildKit's
`frontend/dockerfile/dockerfile_check_test.go`. Lines of `expected`, tab-separated:

    warning  WHEN  LINE  RULE  DETAIL   a warning; WHEN is `both`, `build` (the
                                        stages a build dispatches) or `check`
                                        (`--call check`: every stage)
    build-arg  KEY=VALUE                a --build-arg of the case
    error  TEXT                         the build stops with an error containing TEXT

Not ported, with the reason:
- testBaseImagePlatformMismatch (InvalidBaseImagePlatform): its base must be in
  the store, which these cases do not fill; tests/test_multiplatform.py and
  tests/test_build_e2e.py::test_from_platform_base_of_another_platform assert it.
- the Windows variants of each case (nanoserver): lamina builds Linux images.

BuildKit's outline and targets tests (dockerfile_outline_test.go,
dockerfile_targets_test.go) are ported at the end; their DescribeDefinition
cases are not: `--call subrequests.describe` is refused (lamina's front end
has no other methods to describe).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from lamina.engine.dockerfile.checks import (
    BaseFacts,
    CheckConfig,
    CheckReport,
    config_for,
    parse_check_options,
    run_checks,
)
from lamina.engine.dockerfile.parser import parse
from lamina.errors import DockerfileError, LaminaError

CASES = Path(__file__).parent / "conformance" / "buildkit-lint"
PATH_ONLY = BaseFacts(("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",), ())


def _read_case(case: Path) -> tuple[list[tuple[str, int, str, str]], dict[str, str], str | None]:
    warnings: list[tuple[str, int, str, str]] = []
    build_args: dict[str, str] = {}
    error = None
    for line in (case / "expected").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        kind, _, rest = line.partition("\t")
        if kind == "warning":
            when, number, rule, detail = rest.split("\t")
            warnings.append((when, int(number), rule, detail))
        elif kind == "build-arg":
            key, _, value = rest.partition("=")
            build_args[key] = value
        elif kind == "error":
            error = rest
        else:
            raise AssertionError(f"{case.name}/expected: unknown line {line!r}")
    return warnings, build_args, error


def _predefined() -> dict[str, str]:
    from lamina.engine.plan import host_platform, platform_args

    host = host_platform()
    return {kv.key: kv.value for kv in platform_args(host, host)}


def _run(case: Path, build_args: dict[str, str], all_stages: bool) -> tuple[CheckReport, LaminaError | None]:
    ignore_file = case / "dockerignore"
    ignore = None
    if ignore_file.exists():
        from lamina.engine.dockerfile.ignore import read_ignore_file

        ignore = read_ignore_file(ignore_file.read_text()).patterns or None
    dockerfile = parse((case / "Dockerfile").read_bytes(), "Dockerfile")
    report = run_checks(
        dockerfile,
        config=config_for(dockerfile, build_args),
        build_args=build_args,
        predefined=_predefined(),
        all_stages=all_stages,
        ignore=ignore,
        base_facts=lambda ref: PATH_ONLY,
    )
    # The error a build stops at: the checks' own, the planner's, or error=true's violation.
    error = report.error
    if error is None:
        from lamina.engine.plan import make_plan

        try:
            make_plan(dockerfile, build_args=build_args)
        except LaminaError as err:
            error = err
    return report, error or report.violation(dockerfile.path)


@pytest.mark.parametrize("mode", ["build", "check"])
@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir()))
def test_buildkit_lint_case(case: str, mode: str) -> None:
    expected, build_args, error = _read_case(CASES / case)
    report, raised = _run(CASES / case, build_args, all_stages=mode == "check")
    got = sorted((w.start_line, w.rule, w.detail) for w in report.warnings)
    want = sorted((line, rule, detail) for when, line, rule, detail in expected if when in ("both", mode))
    assert got == want
    if error is None:
        assert raised is None
    else:
        assert raised is not None and error in str(raised)


def test_every_rule_has_a_case() -> None:
    """Each rule BuildKit's tests cover is named by at least one ported case."""
    from lamina.engine.dockerfile.checks import RULES

    named = {
        line.split("\t")[3]
        for case in CASES.iterdir()
        for line in (case / "expected").read_text().splitlines()
        if line.startswith("warning\t")
    }
    assert set(RULES) - named == {"InvalidBaseImagePlatform"}


def test_short_form_names_rule_and_line() -> None:
    dockerfile = parse(b"FROM scratch\nMAINTAINER me\n")
    report = run_checks(dockerfile, config=CheckConfig())
    (warning,) = report.warnings
    assert warning.short() == (
        "MaintainerDeprecated: Maintainer instruction is deprecated in favor of using label (line 2)"
    )
    assert warning.url == "https://docs.docker.com/go/dockerfile/rule/maintainer-deprecated/"


def test_warning_spans_the_instruction_lines() -> None:
    dockerfile = parse(b"FROM scratch\nENV a \\\n  b\n")
    (warning,) = run_checks(dockerfile, config=CheckConfig()).warnings
    assert (warning.rule, warning.start_line, warning.end_line) == ("LegacyKeyValueFormat", 2, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("skip", 'invalid check option "skip"'),
        ("bogus=1", 'invalid check option "bogus"'),
        (
            "error=yes",
            'failed to parse check option "error=yes": strconv.ParseBool: parsing "yes": invalid syntax',
        ),
    ],
)
def test_bad_check_options_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_check_options(text)


def test_bad_check_directive_names_its_line() -> None:
    dockerfile = parse(b"# check=skip\nFROM scratch\n")
    with pytest.raises(DockerfileError) as caught:
        config_for(dockerfile, {})
    assert str(caught.value) == 'Dockerfile:1: failed to parse check options: invalid check option "skip"'


def test_unknown_base_image_skips_dispatch_rules() -> None:
    """Without the image's config, its ENV is unknown: no UndefinedVar guessed; parse-time rules still run."""
    dockerfile = parse(b"FROM example.com/app AS Base\nCOPY $FROM_IMAGE /\n")
    report = run_checks(dockerfile, config=CheckConfig(), base_facts=lambda ref: None)
    assert [w.rule for w in report.warnings] == ["StageNameCasing"]
    report = run_checks(dockerfile, config=CheckConfig(), base_facts=lambda ref: PATH_ONLY)
    assert [w.rule for w in report.warnings] == ["StageNameCasing", "UndefinedVar"]


# --- through the CLI: a build shows the warnings, --check/--call print them as buildx --------------


def _cli(args: list[str], cache: Path, stdin: str | None = None) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from lamina.cli import cli

    result = CliRunner().invoke(cli, args, env={"LAMINA_CACHE": str(cache)}, input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


WARNED = "FROM scratch as base\nCOPY Dockerfile /\nENV a b\n"


def test_build_prints_warnings_and_writes_them_to_the_metadata_file(tmp_path: Path) -> None:
    import base64
    import json

    (tmp_path / "Dockerfile").write_text(WARNED)
    meta = tmp_path / "meta.json"
    status, _, err = _cli(
        ["build", "--progress", "plain", "--metadata-file", str(meta), str(tmp_path)], tmp_path / "cache"
    )
    assert status == 0, err
    assert "warning: FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)" in err
    assert 'warning: LegacyKeyValueFormat: "ENV key=value" should be used instead' in err
    warnings = json.loads(meta.read_text())["buildx.build.warnings"]
    assert [base64.b64decode(w["short"]).decode() for w in warnings] == [
        "FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)",
        'LegacyKeyValueFormat: "ENV key=value" should be used instead of legacy "ENV key value" format'
        " (line 3)",
    ]
    assert warnings[1]["range"] == [{"start": {"line": 3}, "end": {"line": 3}}]
    assert warnings[1]["url"] == "https://docs.docker.com/go/dockerfile/rule/legacy-key-value-format/"
    # The no-op rebuild (replayed from its memo) warns the same.
    status, _, err = _cli(["build", "--progress", "plain", str(tmp_path)], tmp_path / "cache")
    assert status == 0 and "warning: FromAsCasing" in err


def test_json_progress_carries_the_warnings(tmp_path: Path) -> None:
    import json

    (tmp_path / "Dockerfile").write_text(WARNED)
    status, _, err = _cli(["build", "--progress", "json", str(tmp_path)], tmp_path / "cache")
    assert status == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    warnings = [r for r in records if r["type"] == "warning"]
    assert warnings[0]["message"] == "FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)"
    assert [(w["rule"], w["line"], w["end_line"]) for w in warnings] == [
        ("FromAsCasing", 1, 1),
        ("LegacyKeyValueFormat", 3, 3),
    ]
    assert warnings[1]["url"] == "https://docs.docker.com/go/dockerfile/rule/legacy-key-value-format/"
    assert warnings[1]["detail"] == '"ENV key=value" should be used instead of legacy "ENV key value" format'


def test_rawjson_progress_carries_buildkit_vertex_warnings(tmp_path: Path) -> None:
    import base64
    import json

    (tmp_path / "Dockerfile").write_text(WARNED)
    status, _, err = _cli(["build", "--progress", "rawjson", str(tmp_path)], tmp_path / "cache")
    assert status == 0, err
    found = [
        w for line in err.splitlines() if line.startswith("{") for w in json.loads(line).get("warnings", [])
    ]
    first = found[0]
    assert base64.b64decode(first["short"]).decode() == (
        "FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)"
    )
    assert base64.b64decode(first["detail"][0]).decode() == (
        "The 'as' keyword should match the case of the 'from' keyword"
    )
    assert first["url"] == "https://docs.docker.com/go/dockerfile/rule/from-as-casing/"
    assert first["range"] == [{"start": {"line": 1}, "end": {"line": 1}}]


@pytest.mark.parametrize(
    ("dockerfile", "build_arg"),
    [("# check=error=true\n" + WARNED, None), (WARNED, "BUILDKIT_DOCKERFILE_CHECK=error=true")],
)
def test_error_true_fails_the_build_after_the_warnings(
    tmp_path: Path, dockerfile: str, build_arg: str | None
) -> None:
    (tmp_path / "Dockerfile").write_text(dockerfile)
    args = ["build", "--progress", "plain", "-t", "checked:1", str(tmp_path)]
    if build_arg:
        args[1:1] = ["--build-arg", build_arg]
    status, _, err = _cli(args, tmp_path / "cache")
    assert status == 1
    assert "warning: FromAsCasing" in err
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("lint violation found for rules: FromAsCasing, LegacyKeyValueFormat")
    )
    assert "COPY" not in err  # no step ran


def test_skip_all_by_build_arg_overrides_the_directive(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("# check=error=true\n" + WARNED)
    args = [
        "build",
        "--progress",
        "plain",
        "--build-arg",
        "BUILDKIT_DOCKERFILE_CHECK=skip=all",
        str(tmp_path),
    ]
    status, _, err = _cli(args, tmp_path / "cache")
    assert status == 0, err
    assert "warning:" not in err


def test_check_prints_each_warning_with_its_source(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY a /\nMAINTAINER me\nCOPY b /\n")
    status, out, _ = _cli(["build", "--check", str(tmp_path)], tmp_path / "cache")
    assert status == 1
    path = f"{tmp_path}/Dockerfile"
    assert out == (
        "Check complete, 1 warning has been found!\n"
        "\n"
        "WARNING: MaintainerDeprecated - https://docs.docker.com/go/dockerfile/rule/maintainer-deprecated/\n"
        "Maintainer instruction is deprecated in favor of using label\n"
        f"{path}:3\n"
        "--------------------\n"
        "   1 |     FROM scratch\n"
        "   2 |     COPY a /\n"
        "   3 | >>> MAINTAINER me\n"
        "   4 |     COPY b /\n"
        "   5 |     \n"
        "--------------------\n"
    )


def test_check_reads_the_dockerfile_from_stdin(tmp_path: Path) -> None:
    """`--check -f -` and a context of `-` take the Dockerfile from stdin, as a build does."""
    for args in (["-f", "-", str(tmp_path)], ["-"]):
        status, out, _ = _cli(["build", "--check", *args], tmp_path / "cache", stdin="FROM scratch AS Base\n")
        assert status == 1
        assert "WARNING: StageNameCasing" in out
        assert ">>> FROM scratch AS Base" in out


def test_check_clean_dockerfile_exits_zero(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY a /\n")
    status, out, _ = _cli(["build", "--call", "check", str(tmp_path)], tmp_path / "cache")
    assert (status, out) == (0, "Check complete, no warnings found.\n")


def test_check_json_and_ignorestatus(tmp_path: Path) -> None:
    import json

    (tmp_path / "Dockerfile").write_text("FROM scratch AS Base\n")
    status, out, _ = _cli(
        ["build", "--call", "check,format=json,ignorestatus=true", str(tmp_path)], tmp_path / "c"
    )
    assert status == 0
    (warning,) = json.loads(out)["warnings"]
    assert warning["ruleName"] == "StageNameCasing"
    assert warning["detail"] == "Stage name 'Base' should be lowercase"
    assert warning["location"]["ranges"][0]["start"]["line"] == 1


def test_check_reports_the_error_after_the_warnings(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch AS BadName\nMAINTAINER me\nBADCMD\n")
    status, out, err = _cli(["build", "--check", str(tmp_path)], tmp_path / "cache")
    assert status == 1
    assert out.startswith("Check complete, 2 warnings have been found!\n")
    assert err.startswith("error: ") and err.splitlines()[0].endswith(
        "Dockerfile:3: unknown instruction: BADCMD"
    )
    assert ">>> BADCMD" in err


def test_check_covers_every_stage_unless_a_target_is_given(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch AS a\nENV x y\nFROM scratch AS b\n")
    status, out, _ = _cli(["build", "--check", str(tmp_path)], tmp_path / "cache")
    assert status == 1 and "LegacyKeyValueFormat" in out
    status, out, _ = _cli(["build", "--check", "--target", "b", str(tmp_path)], tmp_path / "cache")
    assert (status, out) == (0, "Check complete, no warnings found.\n")


OUTLINED = """\
# GO_VERSION sets the Go version
ARG GO_VERSION=1.22
ARG UNUSED=1

# base is the base stage
FROM busybox:${GO_VERSION} AS base
# HUGO sets hugo
ARG HUGO=0.1
RUN --mount=type=secret,id=tok,required true

# release is the final image
FROM scratch AS release
COPY --from=base /x /x
"""


def test_call_targets_lists_stages_like_buildx(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(OUTLINED)
    status, out, _ = _cli(["build", "--call", "targets", str(tmp_path)], tmp_path / "cache")
    assert status == 0
    assert out.splitlines() == [
        "TARGET            DESCRIPTION",
        "base              is the base stage",
        "release (default) is the final image",
    ]


def test_call_outline_names_args_and_secrets_the_target_reads(tmp_path: Path) -> None:
    import json

    (tmp_path / "Dockerfile").write_text(OUTLINED)
    status, out, _ = _cli(["build", "--call", "outline", str(tmp_path)], tmp_path / "cache")
    assert status == 0
    assert out == (
        "TARGET:      release\n"
        "DESCRIPTION: is the final image\n"
        "\n"
        "BUILD ARG    VALUE   DESCRIPTION\n"
        "GO_VERSION   1.22    sets the Go version\n"
        "HUGO         0.1     sets hugo\n"
        "\n"
        "SECRET   REQUIRED\n"
        "tok      true\n"
        "\n"
    )
    args = [
        "build",
        "--call",
        "outline,format=json",
        "--build-arg",
        "HUGO=2",
        "--target",
        "base",
        str(tmp_path),
    ]
    status, out, _ = _cli(args, tmp_path / "cache")
    result = json.loads(out)
    assert result["name"] == "base"
    assert [(a["name"], a.get("value")) for a in result["args"]] == [("GO_VERSION", "1.22"), ("HUGO", "2")]


def test_unknown_call_method_is_refused(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    status, _, err = _cli(["build", "--call", "subrequests.describe", str(tmp_path)], tmp_path / "cache")
    assert status == 1
    assert "--call=subrequests.describe: unknown method 'subrequests.describe'" in err


REMEMBERED = """\
import sys
import lamina.api
from lamina.engine.progress import PlainProgress
lamina.api.build(sys.argv[1], cache_dir=sys.argv[2], environ={}, progress=PlainProgress(sys.stderr))
print("lamina.engine.dockerfile.instructions" in sys.modules)
"""


def test_a_rebuild_replays_the_findings_without_the_parser(tmp_path: Path) -> None:
    """The findings of the same inputs are remembered: a no-op rebuild warns the same, loading no parser."""
    import subprocess
    import sys

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(WARNED)

    def run(status: int = 0) -> tuple[bool, str]:
        args = [sys.executable, "-c", REMEMBERED, str(ctx), str(tmp_path / "cache")]
        done = subprocess.run(args, capture_output=True, text=True)
        assert done.returncode == status, done.stderr
        return done.stdout.strip() == "True", done.stderr

    first, warned = run()
    again, rewarned = run()
    assert first and not again
    assert "warning: FromAsCasing" in warned
    assert [line for line in rewarned.splitlines() if line.startswith("warning:")] == [
        line for line in warned.splitlines() if line.startswith("warning:")
    ]
    # Another ignore file is another input: the checks run again and see it (and the COPY then fails).
    (ctx / ".dockerignore").write_text("Dockerfile\n")
    _, found = run(status=1)
    assert 'CopyIgnoredFile: Attempting to Copy file "Dockerfile" that is excluded by .dockerignore' in found


# --- BuildKit's outline tests (dockerfile_outline_test.go), through subrequests.outline ------------


def _outline(text: str, target: str | None, build_args: dict[str, str]) -> dict[str, Any]:
    from lamina.engine.buildchecks import platform_args
    from lamina.engine.dockerfile.subrequests import outline

    data = text.encode()
    result = outline(parse(data), data, target=target, build_args=build_args, predefined=platform_args())
    return result


def test_outline_args_as_buildkit() -> None:
    """BuildKit's testOutlineArgs: the args the target reads, through its base and --from stages."""
    text = """
ARG inherited=box
ARG inherited2=box2
ARG unused=abc${inherited2}
# sfx is a suffix
ARG sfx="usy${inherited}"

FROM b${sfx} AS first
# this is not assigned to anything
ARG FOO=123
# BAR is a number
ARG BAR=456
RUN true

FROM alpine${unused} AS second
ARG BAZ
RUN true

FROM scratch AS third
ARG ABC=a
# check=skip=all
ARG password
# alternate_password will show up in the outline
# check=skip=all
ARG alternate_password

# target defines build target
FROM third AS target
COPY --from=first /etc/passwd /

FROM second
"""
    result = _outline(text, "target", {"BAR": "678"})
    assert (result["name"], result["description"]) == ("target", "defines build target")
    got = [
        (a["name"], a.get("value", ""), a.get("description", ""), a["location"]["ranges"][0]["start"]["line"])
        for a in result["args"]
    ]
    assert got == [
        ("inherited", "box", "", 2),
        ("sfx", "usybox", "is a suffix", 6),
        ("FOO", "123", "", 10),
        ("BAR", "678", "is a number", 12),
        ("ABC", "a", "", 20),
        ("password", "", "", 22),
        ("alternate_password", "", "will show up in the outline", 25),
    ]


def test_outline_secrets_as_buildkit() -> None:
    """BuildKit's testOutlineSecrets: secret and ssh ids of the target's stages, ids expanded."""
    text = """
FROM busybox AS first
RUN --mount=type=secret,target=/etc/passwd,required=true --mount=type=ssh true
FROM alpine AS second
RUN --mount=type=secret,id=unused --mount=type=ssh,id=ssh2 true
FROM scratch AS third
ARG BAR
RUN --mount=type=secret,id=second${BAR} true
FROM third AS target
COPY --from=first /foo /
RUN --mount=type=ssh,id=ssh3,required true
FROM second
"""
    result = _outline(text, "target", {"BAR": "678"})

    def at(line: int) -> dict[str, object]:
        return {"ranges": [{"start": {"line": line}, "end": {"line": line}}]}

    assert result["secrets"] == [
        {"name": "passwd", "required": True, "location": at(3)},
        {"name": "second678", "location": at(8)},
    ]
    assert result["ssh"] == [
        {"name": "default", "location": at(3)},
        {"name": "ssh3", "required": True, "location": at(11)},
    ]


def test_outline_recursive_args_as_buildkit() -> None:
    """BuildKit's testOutlineRecursiveArgs: an ARG that reads itself and others, global and in a stage."""
    text = """
ARG FOO=123
ARG ABC=abc
ARG DEF=def
ARG FOO=${FOO}${ABC}
ARG BAR=${FOO}456
ARG FOO=${FOO}456${BAR}
FROM scratch
ARG FOO
ARG INFOO=123
ARG INBAR=${INFOO}456
ARG INFOO=${INFOO}456${INBAR}
"""
    result = _outline(text, None, {})
    assert [(a["name"], a["value"]) for a in result["args"]] == [
        ("ABC", "abc"),
        ("BAR", "123abc456"),
        ("FOO", "123abc456123abc456"),
        ("INBAR", "123456"),
        ("INFOO", "123456123456"),
    ]


def test_targets_list_as_buildkit() -> None:
    """BuildKit's testTargetsList: every stage, its base, description and line; the last is the default."""
    from lamina.engine.dockerfile.subrequests import targets

    text = """
# build defines stage for compiling the binary
FROM alpine AS build
RUN true

FROM busybox as second
RUN false

FROM alpine
RUN false

# binary returns the compiled binary
FROM second AS binary
"""
    data = text.encode()
    result = targets(parse(data), data)
    got = [
        (t.get("name", ""), t["base"], t.get("description", ""), t.get("default", False), t["location"])
        for t in result["targets"]
    ]
    lines = [g[4]["ranges"][0]["start"]["line"] for g in got]
    assert [g[:4] for g in got] == [
        ("build", "alpine", "defines stage for compiling the binary", False),
        ("second", "busybox", "", False),
        ("", "alpine", "", False),
        ("binary", "second", "returns the compiled binary", True),
    ]
    assert lines == [3, 6, 9, 13]
    assert result["sources"] == [base64.b64encode(data).decode()]


# --- the examples of BuildKit's rule pages ----------------------------------------------------------

DOCS = Path(__file__).parent / "conformance" / "buildkit_lint_docs.tsv"
# Base images the examples name, with the ENV their configs have (python's PYTHON_VERSION).
IMAGE_ENV = {"python": ("PYTHON_VERSION=3.12.4",)}


def _doc_examples() -> list[Any]:
    rows = []
    for number, line in enumerate(DOCS.read_text().splitlines(), start=1):
        if line.startswith("#") or not line:
            continue
        rule, verdict, text, ignore, differs = line.split("\t")
        if differs:  # the page's example disagrees with BuildKit's code: lamina follows the code
            verdict = "good" if verdict == "bad" else "bad"
        rows.append(pytest.param(rule, verdict, json.loads(text), json.loads(ignore), id=f"{rule}-{number}"))
    return rows


@pytest.mark.parametrize(("rule", "verdict", "text", "ignore"), _doc_examples())
def test_rule_page_example(rule: str, verdict: str, text: str, ignore: str) -> None:
    from lamina.engine.buildchecks import platform_args
    from lamina.engine.dockerfile.ignore import read_ignore_file

    if not any(line.strip().upper().startswith("FROM") for line in text.splitlines()):
        text = "FROM scratch\n" + text
    env = PATH_ONLY.env
    report = run_checks(
        parse(text),
        config=CheckConfig(experimental_all=True),
        predefined=platform_args(),
        all_stages=True,
        ignore=read_ignore_file(ignore).patterns or None if ignore else None,
        base_facts=lambda ref: BaseFacts(env + IMAGE_ENV.get(ref.split(":")[0], ()), ()),
    )
    assert report.error is None
    found = [w.short() for w in report.warnings if w.rule == rule]
    assert bool(found) == (verdict == "bad"), found


def test_a_base_stage_named_through_an_arg_is_checked_with_its_target(tmp_path: Path) -> None:
    """`FROM build-${VARIANT}`: the stage it names is one the build needs, so its rules run too."""
    text = (
        "ARG VARIANT=release\nFROM scratch AS build-release\nENV a b\nFROM scratch AS build-debug\nENV c d\n"
    )
    text += "FROM build-${VARIANT}\n"
    report = run_checks(parse(text), config=CheckConfig(), predefined={}, base_facts=lambda ref: PATH_ONLY)
    assert [(w.rule, w.start_line) for w in report.warnings] == [("LegacyKeyValueFormat", 3)]
    result = _outline(text + "ARG MODE=fast\n", None, {})
    assert [a["name"] for a in result["args"]] == ["VARIANT", "MODE"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests import registry_server

    if registry_server.REGISTRY is None or registry_server.SKOPEO is None:
        pytest.skip("docker-registry or skopeo is not installed")
    with registry_server.running_registry(tmp_path_factory.mktemp("registry"), "none") as running:
        yield running


def test_a_base_image_pulled_by_the_build_is_checked_after_it(
    registry: Any, busybox_image: Path, tmp_path: Path
) -> None:
    """Its ENV and SHELL were unknown before the pull: UndefinedVar and JSONArgsRecommended come after
    the build (on a store that has the image, before it), in the progress and the metadata alike."""
    import subprocess

    from tests import registry_server

    ref = f"{registry.host}/checks/busybox:1.35"
    copy = [str(registry_server.SKOPEO), "copy", "-q", "--dest-tls-verify=false"]
    subprocess.run(
        [*copy, f"oci-archive:{busybox_image}", f"docker://{ref}"], check=True, capture_output=True
    )
    (tmp_path / "Dockerfile").write_text(f"FROM {ref}\nENV P=$PAHT\nCMD run\n")
    meta = tmp_path / "meta.json"
    args = [
        "build",
        "--progress",
        "plain",
        "--metadata-file",
        str(meta),
        "--insecure-registry",
        registry.host,
    ]
    status, _, err = _cli([*args, str(tmp_path)], tmp_path / "cache")
    assert status == 0, err
    expected = [
        "warning: UndefinedVar: Usage of undefined variable '$PAHT' (did you mean $PATH?) (line 2)",
        "warning: JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior"
        " related to OS signals (line 3)",
    ]
    assert [line for line in err.splitlines() if line.startswith("warning:")] == expected
    shorts = [
        base64.b64decode(w["short"]).decode() for w in json.loads(meta.read_text())["buildx.build.warnings"]
    ]
    assert shorts == [line.removeprefix("warning: ") for line in expected]
    # The image is in the store now: the next build knows its config before it starts.
    status, _, again = _cli(["build", "--progress", "plain", str(tmp_path)], tmp_path / "cache")
    assert [line for line in again.splitlines() if line.startswith("warning:")] == expected
