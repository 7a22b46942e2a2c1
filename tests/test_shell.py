"""Shell-word expansion: BuildKit's envVarTest/wordsTest tables plus our own cases."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.engine.dockerfile.shell import expand_word, referenced_names, split_words
from lamina.errors import ExpansionError
from tests.support.hang import HANG_GUARD

HERE = Path(__file__).resolve().parent
SHELL_FIXTURES = (
    HERE.parent.parent / "shared" / "conformance" / "buildkit" / "frontend" / "dockerfile" / "shell"
)
needs_corpus = pytest.mark.skipif(
    not SHELL_FIXTURES.is_dir(), reason="../shared/conformance is not present in this checkout"
)


def _env_var_cases() -> list[tuple[str, str]]:
    if not SHELL_FIXTURES.is_dir():
        return []
    cases = []
    for line in (SHELL_FIXTURES / "envVarTest").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        platform, word, expected = (field.strip() for field in line.split("|"))
        if platform in ("A", "U"):  # W rows are Windows-only
            cases.append((word, expected))
    return cases


def _words_cases() -> list[tuple[str, dict[str, str], list[str]]]:
    if not SHELL_FIXTURES.is_dir():
        return []
    env: dict[str, str] = {}
    cases = []
    for line in (SHELL_FIXTURES / "wordsTest").read_text().splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("ENV "):
            name, _, value = line[4:].lstrip(" ").partition("=")
            env[name] = value
            continue
        word, _, expected = line.partition("|")
        cases.append((word.strip(), dict(env), expected.lstrip(" ").split(",")))
    return cases


ENV_VAR_TEST_ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}


@needs_corpus
@pytest.mark.parametrize(("word", "expected"), _env_var_cases())
def test_buildkit_env_var_table(word: str, expected: str) -> None:
    if expected == "error":
        with pytest.raises(ExpansionError):
            expand_word(word, ENV_VAR_TEST_ENV)
    else:
        assert expand_word(word, ENV_VAR_TEST_ENV) == expected


@needs_corpus
@pytest.mark.parametrize(("word", "env", "expected"), _words_cases())
def test_buildkit_words_table(word: str, env: dict[str, str], expected: list[str]) -> None:
    if expected == ["error"]:
        with pytest.raises(ExpansionError):
            split_words(word, env)
    else:
        assert split_words(word, env) == expected


def test_corpus_tables_are_complete() -> None:
    if not SHELL_FIXTURES.is_dir():
        pytest.skip("../shared/conformance is not present in this checkout")
    assert len(_env_var_cases()) == 228
    assert len(_words_cases()) == 24


OUR_ENV = {"F": "foo.tar.gz", "P": "/usr/local/bin", "E": "", "S": "a b  c", "STAR": "a*b"}


def _our_cases() -> list[tuple[str, str]]:
    cases = []
    for line in (HERE / "test_shell_cases.tsv").read_text().splitlines():
        if line.startswith("#") or not line:
            continue
        word, expected = line.split("\t")
        cases.append((word, expected))
    return cases


@pytest.mark.parametrize(("word", "expected"), _our_cases())
def test_modifiers_patterns_and_substitution(word: str, expected: str) -> None:
    if expected == "error":
        with pytest.raises(ExpansionError):
            expand_word(word, OUR_ENV)
    else:
        assert expand_word(word, OUR_ENV) == expected


def test_backtick_escape_token() -> None:
    # With `# escape=``, backslashes are ordinary (Windows paths) and ` escapes.
    assert expand_word(r"C:\dir\$F", {"F": "x"}, escape="`") == r"C:\dir\x"
    assert expand_word("`$F", {"F": "x"}, escape="`") == "$F"
    assert expand_word('"a`"b"', {}, escape="`") == 'a"b'
    assert split_words("a` b c", {}, escape="`") == ["a b", "c"]


def test_error_message_names_the_word_and_variable() -> None:
    with pytest.raises(ExpansionError, match=r'failed to process "\$\{TAG:\?set TAG\}": TAG: set TAG'):
        expand_word("${TAG:?set TAG}", {})
    with pytest.raises(ExpansionError, match="is not allowed to be empty"):
        expand_word("${TAG:?}", {"TAG": ""})


def test_replace_all_skips_empty_match_after_a_match_like_go() -> None:
    # Go's ReplaceAllString skips the empty match right after "abc" that
    # Python's re.sub would also replace ("XX").
    assert expand_word("${V//*/X}", {"V": "abc"}) == "X"
    assert expand_word("${V///-}", {"V": "ab"}) == "-a-b-"


def test_referenced_names_sees_every_branch() -> None:
    assert referenced_names("${A:-$B}${C#$D} $E ${F?} '$G' \\$H") == {"A", "B", "C", "D", "E", "F"}
    assert referenced_names("plain text") == frozenset()
    assert referenced_names("${X:+${Y}}") == {"X", "Y"}


def test_referenced_names_rejects_bad_syntax() -> None:
    with pytest.raises(ExpansionError):
        referenced_names("${A")


def test_split_plain_words_uses_go_whitespace() -> None:
    assert split_words("  a\tb\nc  ", {}) == ["a", "b", "c"]
    # \x1c is whitespace to Python but not to Go's unicode.IsSpace.
    assert split_words("a\x1cb", {}) == ["a\x1cb"]
    assert split_words("a\u00a0b", {}) == ["a", "b"]


_ALPHABET = st.sampled_from(list("ab $'\"\\{}:-+?#%/*AB_09`é"))


@given(st.lists(_ALPHABET, max_size=30).map("".join))
def test_random_words_only_raise_expansion_errors(word: str) -> None:
    env = {"A": "x y", "B": ""}
    for escape in ("\\", "`"):
        try:
            expand_word(word, env, escape)
            split_words(word, env, escape)
            referenced_names(word, escape)
        except ExpansionError:
            pass


@given(st.text(alphabet=st.characters(blacklist_characters="$'\"\\"), max_size=40))
def test_words_without_specials_are_unchanged(word: str) -> None:
    assert expand_word(word, {"A": "1"}) == word


@pytest.mark.parametrize("op", ["#", "##", "%", "%%", "/", "//"])
def test_star_pattern_backtracking_bomb(op: str) -> None:
    """`*x` twenty times then `y`, against a thousand x's: a regex that backtracks
    tries every split of the value between the stars (eight stars and forty
    characters took 3 s); segments placed at their earliest places take one pass."""
    word = "${V" + op + "*x" * 20 + "*y" + ("/r}" if "/" in op else "}")
    started = time.perf_counter()
    for value in ("x" * 1000, ("x" * 99 + "\n") * 10, "x" * 998 + "\ny"):
        assert expand_word(word, {"V": value}) == value, op
    assert time.perf_counter() - started < HANG_GUARD  # about a millisecond; hours when it backtracked


# Expected values checked against Python's backtracking regex engine, which
# agrees with Go's leftmost-first RE2 on these shapes.
@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("${V#*a?}", "b-a\nb-a?b"),  # shortest: the first `a` and one more character
        ("${V##*a?}", "b-a\nb-a?b"),  # longest, but a star stops at a newline
        ("${V#*-}", "a\nb-a?b"),
        ("${V%a*}", "a?b-a\nb-"),
        ("${V%%a*}", "a?b-a\nb-"),  # `%%a*` cannot cross the newline either
        ("${V%%?-*}", "a?b-a\n"),
        ("${V/\\?*/X}", "aX\nb-a?b"),  # an escaped `?` is literal; `*` stops at the newline
        ("${V//a?/X}", "Xb-a\nb-Xb"),  # `?` does not match a newline
        ("${V//b*a/X}", "a?X\nX?b"),
        ("${V//\n*/X}", "a?b-aX"),
    ],
)
def test_star_patterns_keep_go_semantics(word: str, expected: str) -> None:
    assert expand_word(word, {"V": "a?b-a\nb-a?b"}) == expected


def test_star_pattern_against_four_mib_is_linear() -> None:
    value = ("x" * 63 + "\n") * (4 * 1024 * 1024 // 64 - 1)
    started = time.perf_counter()
    assert expand_word("${V//x*?x*y/r}", {"V": value}) == value
    assert expand_word("${V##*?x?x?x*x}", {"V": value}) == "\n" + ("x" * 63 + "\n") * (len(value) // 64 - 1)
    assert time.perf_counter() - started < HANG_GUARD  # about 0.1 s; quadratic before
