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

A skip reason that starts with `daemon-only:`, `provenance internals:` or `Windows
only:` is not applicable (what lamina deliberately lacks); any other names a
feature lamina is to have, and the test is ported when it lands.

    python tests/conformance/buildkit/count.py --readme   # rewrite README.md's block

The README's block (between `<!-- buildkit-count -->` and `<!-- /buildkit-count -->`)
is the count line, the commit, and the table of the ported cases that assert
lamina's documented behaviour where it deliberately differs (`differs = ...`);
tests/test_buildkit_frontend.py fails when it is stale.
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


NOT_APPLICABLE = ("daemon-only:", "provenance internals:", "Windows only:")
README = ROOT / "README.md"
BEGIN, END = "<!-- buildkit-count -->", "<!-- /buildkit-count -->"


def differences() -> list[tuple[str, str, str]]:
    """(upstream test, case, what differs) for every case that asserts lamina's own behaviour."""
    found = []
    for path in sorted((HERE / "cases").glob("*.toml")):
        case = tomllib.loads(path.read_text())
        if "differs" in case:
            found.append((case["upstream"], path.stem, case["differs"]))
    return found


def readme_block(passing: int, total: int, failing: int, not_applicable: int, pending: int) -> str:
    """The README's count line, the commit it was ported from, and the table of differences."""
    lines = [
        BEGIN,
        f"{passing} of BuildKit's {total} frontend tests pass; {not_applicable} not applicable "
        f"(daemon-only APIs, provenance internals, Windows); {failing} expected "
        f"failure{'' if failing == 1 else 's'}; "
        f"{pending} not yet ported (features lamina is to have). Ported from moby/buildkit "
        f"{UPSTREAM_COMMIT} (`frontend/dockerfile/*_test.go`); "
        "`python tests/conformance/buildkit/count.py --readme` refreshes this block.",
        "",
        "Where lamina deliberately differs, the ported case asserts lamina's behaviour:",
        "",
        "| BuildKit test | case | lamina differs |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | `{case}` | {text} |" for name, case, text in differences()]
    return "\n".join([*lines, END])


def write_readme(block: str) -> bool:
    """Put `block` in place of README.md's; whether it changed."""
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + block + text[end:]
    if new != text:
        README.write_text(new)
    return new != text


def file_block() -> str:
    """The README block from the files alone (the suite asserts every ported case not listed as
    failing passes): what `--readme` writes and tests/test_buildkit_frontend.py compares."""
    names, reasons, cases = upstream_tests(), skip_reasons(), ported_cases()
    failing = {n for n, r in reasons.items() if r.startswith("fails:")}
    skipped = {n for n in reasons if n not in failing}
    not_applicable = {n for n in skipped if reasons[n].startswith(NOT_APPLICABLE)}
    ported = {n for n in names if n in cases}
    pending = len([n for n in names if n not in ported and n not in not_applicable])
    return readme_block(
        len(ported - failing), len(names), len(ported & failing), len(not_applicable), pending
    )


def readme_text_block() -> str:
    """README.md's block as it stands."""
    text = README.read_text()
    return text[text.index(BEGIN) : text.index(END) + len(END)]


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
    not_applicable = {n for n in skipped if reasons[n].startswith(NOT_APPLICABLE)}
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
                else "not applicable"
                if name in not_applicable
                else "not yet"
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
    print(f"not applicable (daemon-only, provenance internals, Windows): {len(not_applicable)}")
    print(f"not yet ported (features lamina is to have): {len(skipped - not_applicable)}")
    print(f"neither ported nor skipped: {len(missing)}")
    block = file_block()
    print(block.splitlines()[1])
    if "--readme" in argv:
        print("README.md " + ("updated" if write_readme(block) else "already current"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
