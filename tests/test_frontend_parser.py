"""The Dockerfile parser against BuildKit's own fixtures, plus heredocs and directives.

The fixtures live in ../shared/conformance (next to the project root); the
corpus tests skip, saying so, only where that directory is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamina.cli import cli
from lamina.engine.dockerfile.parser import go_quote, parse, parse_heredoc_marker, to_json
from lamina.errors import DockerfileSyntaxError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARSER = SHARED / "conformance" / "buildkit" / "frontend" / "dockerfile" / "parser"
needs_corpus = pytest.mark.skipif(not PARSER.is_dir(), reason=f"conformance corpus not found at {PARSER}")


def _cases(folder: str) -> list[Path]:
    root = PARSER / folder
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@needs_corpus
@pytest.mark.parametrize("case", _cases("testfiles"), ids=lambda p: p.name)
def test_fixture_dump_matches_buildkit(case: Path) -> None:
    parsed = parse((case / "Dockerfile").read_bytes())
    assert parsed.dump() == (case / "result").read_text(encoding="utf-8")


@needs_corpus
@pytest.mark.parametrize("case", _cases("testfiles-negative"), ids=lambda p: p.name)
def test_negative_fixture_fails_naming_file_and_line(case: Path) -> None:
    with pytest.raises(DockerfileSyntaxError) as info:
        parse((case / "Dockerfile").read_bytes(), "Dockerfile")
    assert str(info.value).startswith("Dockerfile:")
    assert info.value.location is not None and info.value.location.line >= 1


@needs_corpus
def test_line_numbers_span_continuations_and_blank_lines() -> None:
    parsed = parse((PARSER / "testfile-line" / "Dockerfile").read_bytes())
    assert [(c.start_line, c.end_line) for c in parsed.children] == [(5, 5), (11, 12), (17, 31)]
    assert (parsed.start_line, parsed.end_line) == (5, 31)


@needs_corpus
@pytest.mark.parametrize("case", _cases("testfiles")[:5], ids=lambda p: p.name)
def test_cli_parse_buildkit_format(case: Path) -> None:
    result = CliRunner().invoke(cli, ["parse", "--format", "buildkit", str(case / "Dockerfile")])
    assert result.exit_code == 0, result.output
    assert result.output == (case / "result").read_text(encoding="utf-8")


def test_cli_parse_json_lists_instructions(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("# syntax=x/y\nFROM a\nCOPY --link <<EOF /f\nhi\nEOF\n")
    result = CliRunner().invoke(cli, ["parse", "--format", "json", str(tmp_path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["directives"] == {"syntax": "x/y"}
    copy = doc["instructions"][1]
    assert copy["keyword"] == "COPY"
    assert copy["flags"] == ["--link"]
    assert copy["args"] == ["<<EOF", "/f"]
    assert (copy["start_line"], copy["end_line"]) == (3, 5)
    assert copy["heredocs"][0]["content"] == "hi\n"


def test_cli_parse_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM a\n\nENV PATH\n")
    result = CliRunner().invoke(cli, ["parse", str(tmp_path / "Dockerfile")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path}/Dockerfile:3: ENV must have two arguments"
    ]


def test_cli_parse_accepts_unknown_keywords_like_buildkit(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM a\nSET x\n")
    result = CliRunner().invoke(cli, ["parse", str(tmp_path / "Dockerfile")])
    assert result.exit_code == 0
    assert result.output == '(from "a")\n(set "")\n'


def test_cli_parse_missing_file_is_a_clean_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["parse", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.startswith("error: cannot read Dockerfile")


# --- directives -------------------------------------------------------------------


def test_escape_directive_changes_continuation() -> None:
    parsed = parse("# escape=`\nFROM a\nRUN echo \\\nRUN b `\n  c\n")
    assert parsed.escape == "`"
    assert parsed.dump() == '(from "a")\n(run "echo \\\\")\n(run "b   c")\n'


def test_check_and_syntax_directives_are_recorded() -> None:
    parsed = parse("# syntax = docker/dockerfile:1\n#check=skip=all\n# escape=`\nFROM a\n")
    assert parsed.directive("syntax") == "docker/dockerfile:1"
    assert parsed.directive("check") == "skip=all"
    assert parsed.escape == "`"


def test_directive_after_comment_is_a_comment() -> None:
    parsed = parse("# hello\n# escape=`\nFROM a\n")
    assert parsed.escape == "\\"
    assert parsed.directives == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# escape=`\n# escape=\\\nFROM a\n", "Dockerfile:2: only one escape parser directive can be used"),
        ("# escape=x\nFROM a\n", "Dockerfile:1: invalid escape token"),
        ("FROM a\nRUN <<EOF\nno end\n", "Dockerfile:2: unterminated heredoc"),
        ("FROM a\nCMD [1]\n", "Dockerfile:2: when using JSON array syntax"),
        ("FROM a\nLABEL a=b c\n", 'Dockerfile:2: Syntax error - can\'t find = in "c"'),
        ("FROM a\nRUN " + "x" * 70000 + "\n", "Dockerfile:2: dockerfile line greater than max allowed size"),
    ],
    ids=[
        "duplicate-directive",
        "bad-escape",
        "unterminated-heredoc",
        "non-string-json",
        "env-missing-eq",
        "long-line",
    ],
)
def test_syntax_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(DockerfileSyntaxError) as info:
        parse(text)
    assert str(info.value).startswith(message)


# --- heredocs -------------------------------------------------------------------


def test_two_heredocs_read_in_marker_order() -> None:
    node = parse("FROM a\nCOPY <<X <<Y /dest\nY\nX\nX\nY\n").children[1]
    assert [(h.name, h.content) for h in node.heredocs] == [("X", "Y\n"), ("Y", "X\n")]
    assert (node.start_line, node.end_line) == (2, 6)
    assert node.dump() == 'copy "<<X" "<<Y" "/dest"'


def test_chomp_heredoc_keeps_tabs_until_used() -> None:
    node = parse("FROM a\nRUN <<-EOT\n\tbaz\n\t\tquux\n\tEOT\n").children[1]
    (doc,) = node.heredocs
    assert doc.chomp and doc.content == "\tbaz\n\t\tquux\n"
    assert doc.chomped() == "baz\nquux\n"


def test_heredoc_body_is_raw() -> None:
    node = parse("FROM a\nRUN <<EOF\n# not a comment \\\n\nEOF\nRUN b\n").children[1]
    assert node.heredocs[0].content == "# not a comment \\\n\n"


@pytest.mark.parametrize(
    ("word", "name", "expand"),
    [
        ("<<EOF", "EOF", True),
        ("<<eo'f'", "eof", False),
        ("<<eo\\'f", "eo'f", True),
        ("<<'e'o\\'f", "eo'f", False),
        ("<<'one two'", "one two", False),
        ("<<$EOF", "$EOF", True),
        ('<<"EOF"', "EOF", False),
        ("3<<-EOF", "EOF", True),
    ],
)
def test_heredoc_marker_name_and_expansion(word: str, name: str, expand: bool) -> None:
    doc = parse_heredoc_marker(word)
    assert doc is not None and (doc.name, doc.expand) == (name, expand)


@pytest.mark.parametrize("word", ["<<", "<<-", "<EOF", "<<<EOF", '"<<EOF"', "<<EOF sh", "a<<EOF"])
def test_not_heredoc_markers(word: str) -> None:
    assert parse_heredoc_marker(word) is None


@pytest.mark.parametrize("word", ["<<'EOF", '<<"EOF', "<<EOF'", '<<EOF"'])
def test_unbalanced_heredoc_quotes_are_errors(word: str) -> None:
    with pytest.raises(DockerfileSyntaxError):
        parse_heredoc_marker(word)


def test_heredoc_only_for_run_copy_add_in_shell_form() -> None:
    parsed = parse('FROM a\nUSER <<X\nX\nRUN ["<<EOF"]\nONBUILD RUN <<A\nq\nA\n')
    assert [c.name for c in parsed.children] == ["from", "user", "x", "run", "onbuild"]
    assert parsed.children[3].heredocs == ()
    assert parsed.children[4].heredocs[0].content == "q\n"


def test_space_after_heredoc_operator() -> None:
    (doc,) = parse("FROM a\nRUN <<  EOF\nhi\nEOF\n").children[1].heredocs
    assert (doc.name, doc.content) == ("EOF", "hi\n")


# --- odd bytes ------------------------------------------------------------------


def test_flags_are_read_byte_by_byte_like_buildkit() -> None:
    assert parse("FROM a\nLABEL --label=é x=y\n").children[1].flags == ("--label=Ã©",)


def test_invalid_utf8_survives_as_hex() -> None:
    assert parse(b"FROM a\xff\n").dump() == '(from "a\\xff")\n'


def test_bom_and_crlf_are_ignored() -> None:
    assert parse("\ufeffFROM a\r\nRUN b \\\r\n c\r\n").dump() == '(from "a")\n(run "b  c")\n'


@pytest.mark.parametrize(
    ("text", "quoted"),
    [("a", '"a"'), ('"\\', '"\\"\\\\"'), ("\x00\x7f", '"\\x00\\x7f"'), ("\u00a0", '"\\u00a0"'), ("♥", '"♥"')],
)
def test_go_quote(text: str, quoted: str) -> None:
    assert go_quote(text) == quoted


def test_json_document_shape() -> None:
    doc = to_json(parse("FROM a\nONBUILD COPY --from=x a b\n"))
    onbuild = doc["instructions"][1]  # type: ignore[index]
    assert onbuild["child"]["flags"] == ["--from=x"]


def test_cli_parse_keeps_invalid_utf8(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_bytes(b"FROM a\xff\nRUN\xfe x\n")
    raw = CliRunner().invoke(cli, ["parse", str(tmp_path)])
    assert raw.exit_code == 0
    assert raw.stdout_bytes == b'(from "a\\xff")\n(run\xfe "")\n'
    as_json = CliRunner().invoke(cli, ["parse", "--format", "json", str(tmp_path)])
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout_bytes)["instructions"][1]["keyword"] == "RUN\udcfe"


def test_parse_of_a_directory_finds_a_lower_case_dockerfile(tmp_path: Path) -> None:
    # As a build does (BuildKit's dockerui): `dockerfile` when there is no `Dockerfile`.
    (tmp_path / "dockerfile").write_text("FROM scratch\nCOPY a /a\n")
    result = CliRunner().invoke(cli, ["parse", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert '(copy "a" "/a")' in result.output
