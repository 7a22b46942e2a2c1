"""Property tests: no input crashes the front end; valid files parse stably."""

from __future__ import annotations

import contextlib
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.engine.dockerfile.instructions import parse_stages
from lamina.engine.dockerfile.parser import parse
from lamina.engine.plan import make_plan
from lamina.errors import LaminaError
from lamina.oci.image import Platform

# Text that is likely to hit the parser's corners: keywords, flags, quotes,
# escapes, JSON brackets, heredoc markers, continuations and comments.
_PIECES = st.sampled_from(
    [
        "FROM ",
        "RUN ",
        "COPY ",
        "ADD ",
        "ENV ",
        "ARG ",
        "LABEL ",
        "ONBUILD ",
        "HEALTHCHECK ",
        "SHELL ",
        "CMD ",
        "EXPOSE ",
        "USER ",
        "WORKDIR ",
        "VOLUME ",
        "AS ",
        "--from=",
        "--mount=",
        "--link",
        "--chmod=",
        "--",
        "-",
        "=",
        "\\",
        "`",
        "\\\n",
        "\n",
        "\r\n",
        "#",
        "# escape=`\n",
        "# syntax=x\n",
        " ",
        "\t",
        '"',
        "'",
        "[",
        "]",
        ",",
        '["a", "b"]',
        "<<",
        "<<-",
        "EOF",
        "$",
        "${",
        "}",
        ":-",
        "a",
        "b",
        "0",
        "\x00",
        "é",
        "\ufeff",
        "\xa0",
        "\x85",
    ]
)
_NOISE = st.one_of(st.text(max_size=200), st.lists(_PIECES, max_size=60).map("".join))


def _front_end(data: str | bytes) -> None:
    parsed = parse(data)
    parsed.dump()
    parse_stages(parsed)
    make_plan(parsed, build_platform=Platform(architecture="amd64", os="linux"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_NOISE)
def test_random_text_raises_only_lamina_errors(text: str) -> None:
    with contextlib.suppress(LaminaError):
        _front_end(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_lamina_errors(data: bytes) -> None:
    with contextlib.suppress(LaminaError):
        _front_end(data)


# --- generated valid Dockerfiles ----------------------------------------------------

_WORD = st.text(string.ascii_letters + string.digits + "._/:-", min_size=1, max_size=8).filter(
    lambda w: not w.startswith("-")
)
_KEYWORD = st.sampled_from(["RUN", "COPY", "ADD", "ENV", "LABEL", "ARG", "WORKDIR", "USER", "EXPOSE", "CMD"])


@st.composite
def _instruction(draw: st.DrawFn) -> tuple[str, str]:
    keyword = draw(_KEYWORD)
    words = draw(st.lists(_WORD, min_size=2, max_size=4))
    if keyword in ("ENV", "LABEL"):
        body = " ".join(f"k{i}={w}" for i, w in enumerate(words))
    elif keyword in ("WORKDIR", "USER"):
        body = words[0]
    else:
        body = " ".join(words)
    if keyword == "COPY" and draw(st.booleans()):
        body = "--link " + body
    if " " in body and draw(st.booleans()):
        # Split the line with a continuation, maybe with a comment in between.
        first, _, rest = body.partition(" ")
        middle = draw(st.sampled_from(["", "# note\n", "\n"]))
        body = f"{first} \\\n{middle}  {rest}"
    case = draw(st.sampled_from([str.upper, str.lower, str.title]))
    return case(keyword), body


@st.composite
def _dockerfile(draw: st.DrawFn) -> tuple[str, list[str]]:
    lines = ["FROM base AS first"]
    keywords = ["from"]
    for _ in range(draw(st.integers(1, 12))):
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["", "# a comment", "   "])))
        keyword, body = draw(_instruction())
        lines.append(f"{keyword} {body}")
        keywords.append(keyword.lower())
    return "\n".join(lines) + "\n", keywords


@settings(max_examples=200, deadline=None)
@given(_dockerfile())
def test_generated_dockerfile_parses_stably(case: tuple[str, list[str]]) -> None:
    text, keywords = case
    parsed = parse(text)
    assert [c.name for c in parsed.children] == keywords
    # Each instruction's logical line, re-parsed on its own line, gives the same tree.
    again = parse("\n".join(c.original for c in parsed.children))
    assert again.dump() == parsed.dump()
    assert parse(text).dump() == parsed.dump()
    lines = [c.start_line for c in parsed.children]
    assert lines == sorted(lines) and all(c.end_line >= c.start_line for c in parsed.children)
    parse_stages(parsed)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["--a", "--b=1", "--", "x", "-", " ", "\t", "--c=d=e", "y z"]), max_size=12).map(
        "".join
    )
)
def test_flag_fast_path_agrees_with_bytewise_scanner(line: str) -> None:
    from lamina.engine.dockerfile import parser

    line = line.lstrip(" \t")
    if line.startswith("--"):
        assert parser._extract_plain_flags(line) == parser._extract_flags_bytewise(line, "\\")
