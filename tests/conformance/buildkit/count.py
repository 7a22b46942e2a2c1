"""How much of BuildKit's frontend test suite lamina runs: ported, passing, failing, skipped.

    python tests/conformance/buildkit/count.py          # from the files
    python tests/conformance/buildkit/count.py --run    # run the cases to count the passing ones
    python tests/conformance/buildkit/count.py --list   # also each upstream test's state

An upstream test (a Go test function listed in `upstream.tsv`) is ported when
a case names it: `cases/*.toml` here (`upstream = ...`), or a lint case in
`../buildkit-lint/*/expected` (`# BuildKit's testX`, run by
tests/test_build_checks.py). It is an expected failure when `skipped.tsv`
lists it as `fails: ...`, and skipped when `skipped.tsv` gives another
reason. Without `--run`, passing means ported and not an expected failure
(the suite asserts each such case passes); with `--run` an upstream test
passes when every one of its cases passed in this run.

The last line is the README's count line.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
LINT = HERE.parent / "buildkit-lint"
UPSTREAM_COMMIT = "73ed6825c4b7569379ef89df0aedcdbe64473d31"


def upstream_tests() -> list[str]:
    return [line.split("\t")[0] for line in (HERE / "upstream.tsv").read_text().splitlines()[1:]]


def skip_reasons() -> dict[str, str]:
    rows = (line.split("\t", 1) for line in (HERE / "skipped.tsv").read_text().splitlines()[1:])
    return {name: reason for name, reason in rows}


def ported_cases() -> dict[str, list[tuple[str, str]]]:
    """Upstream test -> its cases, as (test file, case name): pytest ids are FILE::TEST[NAME...]."""
    cases: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path in sorted((HERE / "cases").glob("*.toml")):
        name = tomllib.loads(path.read_text())["upstream"]
        cases[name].append(("tests/test_buildkit_frontend.py", path.stem))
    for expected in sorted(LINT.glob("*/expected")):
        found = re.search(r"^# BuildKit's (test\w+)", expected.read_text(), re.MULTILINE)
        if found:
            cases[found.group(1)].append(("tests/test_build_checks.py", expected.parent.name))
    return dict(cases)


def run_outcomes() -> dict[tuple[str, str], set[str]]:
    """(test file, case name) -> the outcomes of its pytest items when the two files run now.

    A lint case runs as NAME-build and NAME-check; both count.
    """
    files = ["tests/test_buildkit_frontend.py", "tests/test_build_checks.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    outcomes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for line in proc.stdout.splitlines():
        found = re.match(r"(PASSED|FAILED|ERROR|XFAIL|XPASS|SKIPPED) (tests/\S+?)::\w+\[(.+?)\]", line)
        if found:
            outcome, file, param = found.groups()
            if file == "tests/test_build_checks.py":
                param = re.sub(r"-(build|check)$", "", param)
            outcomes[(file, param)].add(outcome)
    return outcomes


def main(argv: list[str]) -> int:
    names = upstream_tests()
    reasons = skip_reasons()
    cases = ported_cases()
    unknown = sorted((set(reasons) | set(cases)) - set(names))
    if unknown:
        print(f"not upstream tests: {', '.join(unknown)}", file=sys.stderr)
        return 1
    failing = {n for n, r in reasons.items() if r.startswith("fails:")}
    skipped = {n for n in reasons if n not in failing}
    ported = {n for n in names if n in cases}
    if "--run" in argv:
        ran = run_outcomes()
        passing = {n for n in ported if all(ran.get(case) == {"PASSED"} for case in cases[n])}
    else:
        passing = ported - failing
    missing = [n for n in names if n not in ported and n not in skipped]
    if "--list" in argv:
        for name in names:
            state = (
                "passing"
                if name in passing
                else "failing"
                if name in ported
                else "skipped"
                if name in skipped
                else "not ported"
            )
            print(f"{name}\t{state}\t{reasons.get(name, '')}")
    print(
        f"upstream tests: {len(names)} (moby/buildkit {UPSTREAM_COMMIT[:12]}, frontend/dockerfile/*_test.go)"
    )
    print(f"ported: {len(ported)} ({sum(len(cases[n]) for n in ported)} cases)")
    print(f"passing: {len(passing)}")
    print(f"expected failures (xfail): {len(ported & failing)}")
    print(f"skipped with a reason: {len(skipped)}")
    print(f"neither ported nor skipped: {len(missing)}")
    print(
        f"{len(passing)} of BuildKit's {len(names)} frontend tests pass, {len(ported & failing)} are "
        f"expected failures, {len(skipped)} are skipped with a reason (skipped.tsv), "
        f"{len(missing)} not ported yet"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
