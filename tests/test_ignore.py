""".dockerignore semantics (moby/patternmatcher) and Go's filepath.Match globs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamina.engine.dockerfile.ignore import (
    DockerIgnore,
    GlobSyntaxError,
    glob_match,
    read_ignore_file,
)
from lamina.errors import IgnoreFileError

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "conformance" / "dockerignore.tsv"


def _corpus_cases() -> list[tuple[str, list[str], str, str]]:
    if not CORPUS.is_file():
        return []
    cases = []
    for line in CORPUS.read_text().splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("id\t"):
            continue
        case_id, lines, path, expected = line.split("\t")[:4]
        cases.append((case_id, json.loads(lines), path, expected))
    return cases


@pytest.mark.skipif(not CORPUS.is_file(), reason="../shared/conformance is not present in this checkout")
@pytest.mark.parametrize(
    ("lines", "path", "expected"),
    [pytest.param(lines, path, want, id=cid) for cid, lines, path, want in _corpus_cases()],
)
def test_dockerignore_corpus(lines: list[str], path: str, expected: str) -> None:
    if expected == "error":
        with pytest.raises(IgnoreFileError):
            DockerIgnore(lines)
        return
    assert DockerIgnore(lines).excludes(path) is (expected == "ignored")


def test_corpus_has_all_cases() -> None:
    if not CORPUS.is_file():
        pytest.skip("../shared/conformance is not present in this checkout")
    assert len(_corpus_cases()) == 65


def test_read_ignore_file_strips_bom_and_crlf() -> None:
    ignore = read_ignore_file("\ufeffbuild\r\n# comment\r\n!build/keep\r\n")
    assert ignore.patterns == ("build", "!build/keep")
    assert ignore.excludes("build/x")
    assert not ignore.excludes("build/keep")


def test_error_names_file_and_line() -> None:
    with pytest.raises(IgnoreFileError, match=r"app\.dockerignore:3: invalid pattern 'a\[b'"):
        read_ignore_file("ok\n\na[b\n", source="app.dockerignore")
    with pytest.raises(IgnoreFileError, match=r':2: illegal exclusion pattern: "!"'):
        read_ignore_file("x\n!  \n")


@pytest.mark.parametrize(
    ("lines", "path", "excluded"),
    [
        (["**.go"], "a/b/c.go", True),  # Docker's suffix match: `**` then a literal tail
        (["**.go"], "xgo", False),
        (["**/b"], "a/b/c", True),
        (["a**"], "abc/d", True),  # prefix match
        (["a/*/c"], "a/b/c/d", True),
        (["a/*/c"], "a/b/x/c", False),
        (["*", "!a/b/**"], "a/b", True),  # `a/b/**` re-includes beneath a/b, not a/b itself
        (["*", "!a/b/**"], "a/b/c", False),
        (["[a-c][^x]"], "bx", False),
        (["[a-c][^x]"], "by", True),
        (["x\\[y"], "x[y", True),
        (["/"], "anything", False),
    ],
)
def test_docker_pattern_types(lines: list[str], path: str, excluded: bool) -> None:
    assert DockerIgnore(lines).excludes(path) is excluded


def test_root_is_never_excluded() -> None:
    assert not DockerIgnore(["*"]).excludes(".")
    assert not DockerIgnore(["**"]).excludes("")


def test_can_prune_only_when_no_exception_reaches_inside() -> None:
    ignore = DockerIgnore(["node_modules", "build", "!build/keep.txt", "docs", "!d*/README.md"])
    assert ignore.excludes("node_modules") and ignore.can_prune("node_modules")
    assert ignore.excludes("build") and not ignore.can_prune("build")
    assert not ignore.can_prune("docs")  # `!d*/README.md` may re-include docs/README.md
    assert ignore.excludes("docs/a") and not ignore.excludes("docs/README.md")
    # A `**` exception could match anywhere, so nothing is pruned.
    assert not DockerIgnore(["vendor", "!**/*.go"]).can_prune("vendor")


@pytest.mark.parametrize(
    ("pattern", "name", "matched"),
    [
        ("*.txt", "a.txt", True),
        ("*.txt", "d/a.txt", False),
        ("*/a.txt", "d/a.txt", True),
        ("**", "a/b", False),  # filepath.Match has no `**`
        ("?", "/", False),
        ("[!a]", "!", True),  # `!` is literal in Go classes
        ("[^a]", "b", True),
        ("[a-c]", "-", False),
        ("[\\]]", "]", True),
        ("\\*", "*", True),
        ("a\\b", "ab", True),
        ("[c-a]", "b", False),  # an inverted range matches nothing, no error
    ],
)
def test_go_filepath_match(pattern: str, name: str, matched: bool) -> None:
    assert glob_match(pattern, name) is matched


@pytest.mark.parametrize("pattern", ["[", "[]", "[^]", "[a", "[a-]", "a\\", "[-a]", "[a-\\"])
def test_go_filepath_match_bad_patterns(pattern: str) -> None:
    with pytest.raises(GlobSyntaxError):
        glob_match(pattern, "x")


_SEGMENT = st.sampled_from(["a", "b", "ab", "*", "?", "**", "[ab]", "a*", "*b"])
_PATTERN = st.builds(
    lambda neg, parts: ("!" if neg else "") + "/".join(parts),
    st.booleans(),
    st.lists(_SEGMENT, min_size=1, max_size=3),
)
_PATH = st.lists(st.sampled_from(["a", "b", "ab", "c"]), min_size=1, max_size=4).map("/".join)


@settings(max_examples=300)
@given(st.lists(_PATTERN, min_size=1, max_size=4), _PATH)
def test_pruned_directories_hold_only_excluded_paths(patterns: list[str], path: str) -> None:
    """A walk that skips what `can_prune` allows loses no file that would be kept."""
    ignore = DockerIgnore(patterns)
    parts = path.split("/")
    for depth in range(1, len(parts)):
        directory = "/".join(parts[:depth])
        if ignore.excludes(directory) and ignore.can_prune(directory):
            assert ignore.excludes(path), (patterns, directory, path)


@settings(max_examples=300)
@given(st.lists(_PATTERN, min_size=1, max_size=4), _PATH)
def test_incremental_match_equals_last_matching_pattern(patterns: list[str], path: str) -> None:
    """excludes() is MatchesOrParentMatches: the last pattern matching the path or a parent wins."""
    ignore = DockerIgnore(patterns)
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    want = False
    for pattern in ignore._patterns:
        if any(pattern.match(p) for p in prefixes):
            want = not pattern.exception
    assert ignore.excludes(path) is want
