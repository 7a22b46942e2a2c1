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
- testBaseImagePlatformMismatch (InvalidBaseImagePlatform): lamina builds for
  the host platform only and refuses another before it pulls, so a base image
  of another platform never reaches the check.
- the Windows variants of each case (nanoserver): lamina builds Linux images.
"""

from __future__ import annotations

from pathlib import Path

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
