"""Dockerfile text -> a tree of `Node`s, exactly as BuildKit's low-level parser.

This layer is purely syntactic: no variable is expanded and every keyword is
accepted (an unknown one dumps as `(foo "")`), because `lamina parse` must
reproduce BuildKit's `Node.Dump()` for any input. Rejecting unknown
instructions and bad flags is the job of `instructions.py`.

Text is handled as `str` decoded with `surrogateescape`, so invalid UTF-8
bytes survive the round trip and dump as `\\xHH` like Go does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

from lamina.engine.dockerfile.shell import MAX_EXPANDED, MAX_NESTING
from lamina.engine.dockerfile.source import MAX_DOCKERFILE_BYTES
from lamina.errors import DockerfileSyntaxError, Location

DEFAULT_ESCAPE = "\\"
MAX_LINE_BYTES = 65536  # Go's bufio.MaxScanTokenSize: a longer line is an error
# Limits BuildKit does not have (lamina's, for bounded work: parsing and planning grow
# linearly, a few seconds for 8 MiB of instructions). Real Dockerfiles are kilobytes. A
# heredoc may be as long as an expanded word (shell.MAX_EXPANDED); the file, twice that
# (source.MAX_DOCKERFILE_BYTES, read_source: there for a no-op rebuild, which never parses).
MAX_HEREDOC_BYTES = MAX_EXPANDED
assert MAX_DOCKERFILE_BYTES == 2 * MAX_EXPANDED
HEREDOC_KEYWORDS = frozenset({"add", "copy", "run"})
KNOWN_DIRECTIVES = frozenset({"syntax", "escape", "check"})
# `ONBUILD ONBUILD ...` levels the parser nests before it refuses. BuildKit has
# no bound here (its instruction parser rejects any `ONBUILD ONBUILD` later);
# every level costs Python frames here, in dump() and in the dataclass methods.
MAX_ONBUILD_NESTING = 64

# Go's unicode.IsSpace (strings.TrimSpace uses it); str.isspace() also
# accepts \x1c-\x1f, which Go does not.
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
_GO_SPACE_SET = frozenset(GO_SPACE)
# The same test applied to one byte read as a rune (BuildKit's flag and
# HEALTHCHECK scanners go byte by byte).
_GO_SPACE_BYTES = frozenset(b"\t\n\v\f\r \x85\xa0")

_RE_WHITESPACE = re.compile(r"[\t\v\f\r ]+")
_RE_DIRECTIVE = re.compile(r"([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.+?)[\t\n\f\r ]*\Z")
_RE_HEREDOC = re.compile(r"([0-9]*)<<(-?)[\t\n\f\r ]*([^<]*)\Z")


@dataclasses.dataclass(frozen=True, slots=True)
class Heredoc:
    """A heredoc body attached to RUN/COPY/ADD; `content` is raw (not chomped)."""

    name: str
    file_descriptor: int
    expand: bool  # False when any part of the delimiter word was quoted
    chomp: bool  # `<<-`: leading tabs are stripped when the body is used
    content: str

    def chomped(self) -> str:
        """The body as the build uses it: leading tabs removed when `<<-`."""
        if not self.chomp:
            return self.content
        return re.sub(r"(?m)^\t+", "", self.content)


@dataclasses.dataclass(frozen=True, slots=True)
class Directive:
    name: str  # lower case: syntax, escape or check
    value: str
    line: int


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """One instruction: BuildKit's Node with its `Next` chain flattened into `args`."""

    keyword: str  # as written; compare with `keyword.lower()`
    args: tuple[str, ...]
    flags: tuple[str, ...] = ()
    child: Node | None = None  # ONBUILD's nested instruction
    json: bool = False  # args came from a JSON (exec form) array
    original: str = ""  # the logical line, continuations joined
    start_line: int = 0
    end_line: int = 0
    heredocs: tuple[Heredoc, ...] = ()
    comments: tuple[str, ...] = ()  # comment lines right above the instruction

    @property
    def name(self) -> str:
        return self.keyword.lower()

    def dump(self) -> str:
        """BuildKit's `Node.Dump()` of this instruction, without the parentheses."""
        parts = [go_lower(self.keyword)]
        if self.flags:
            parts.append("[" + " ".join(go_quote(f) for f in self.flags) + "]")
        parts.extend(go_quote(a) for a in self.args)
        if self.child is not None:
            parts.append("(" + self.child.dump() + ")")
        return " ".join(parts).strip(GO_SPACE)

    def can_contain_heredoc(self) -> bool:
        node = self.child if self.name == "onbuild" and self.child is not None else self
        return node.name in HEREDOC_KEYWORDS and not node.json


@dataclasses.dataclass(frozen=True, slots=True)
class Dockerfile:
    """A parsed Dockerfile: instructions in order, directives and warnings."""

    path: str
    children: tuple[Node, ...]
    directives: tuple[Directive, ...] = ()
    escape: str = DEFAULT_ESCAPE
    warnings: tuple[str, ...] = ()

    @property
    def start_line(self) -> int:
        return self.children[0].start_line

    @property
    def end_line(self) -> int:
        return self.children[-1].end_line

    def directive(self, name: str) -> str | None:
        for d in self.directives:
            if d.name == name:
                return d.value
        return None

    def dump(self) -> str:
        """BuildKit's `result` format: one `(node)` per line, ending with a newline."""
        return "".join("(" + c.dump() + ")\n" for c in self.children)


# --- Go string helpers ---------------------------------------------------------


def go_lower(s: str) -> str:
    if s.isascii():
        return s.lower()
    # Python lowers a few letters to two code points; Go never changes length.
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in s)


_QUOTE_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(s: str) -> str:
    """Go's strconv.Quote; surrogate-escaped bytes print as `\\xHH`."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return '"' + s + '"'
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif 0xDC80 <= code <= 0xDCFF:  # an invalid UTF-8 byte kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == " " or ch.isprintable():
            out.append(ch)
        elif ch in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")  # Go cannot hold a lone surrogate; it becomes RuneError
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _lstrip(s: str) -> str:
    return s.lstrip(GO_SPACE)


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


# --- per-keyword argument parsers ------------------------------------------------


class _NotStringArray(Exception):
    pass


class _Parsed:
    """What a line parser returns: the args, ONBUILD's child, the JSON flag."""

    __slots__ = ("args", "child", "json")

    def __init__(self, args: tuple[str, ...] = (), child: Node | None = None, is_json: bool = False) -> None:
        self.args = args
        self.child = child
        self.json = is_json


def _reject_constant(name: str) -> float:
    raise ValueError(name)  # Go's encoding/json has no NaN or Infinity


def _go_number(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(text)  # Go: cannot unmarshal into float64
    return value


def _parse_json(rest: str) -> _Parsed | None:
    """A JSON array of strings, or None when `rest` is not valid JSON."""
    rest = _lstrip(rest)
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(
            rest, parse_constant=_reject_constant, parse_float=_go_number, parse_int=_go_number
        )
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, list):
        return None
    args = []
    for item in value:
        if not isinstance(item, str):
            raise _NotStringArray
        if not item.isascii():
            # Go decodes invalid UTF-8 and lone surrogates to U+FFFD.
            item = re.sub("[\ud800-\udfff]", "\ufffd", item)
        args.append(item)
    return _Parsed(tuple(args), is_json=True)


def _parse_ignore(rest: str, escape: str) -> _Parsed:
    return _Parsed(("",))


def _parse_string(rest: str, escape: str) -> _Parsed:
    return _Parsed((rest,) if rest else ())


def _parse_whitespace_delimited(rest: str, escape: str) -> _Parsed:
    if not rest:
        return _Parsed()
    return _Parsed(tuple(_RE_WHITESPACE.split(rest)))


def _parse_maybe_json(rest: str, escape: str) -> _Parsed:
    if not rest:
        return _Parsed()
    parsed = _parse_json(rest)
    return parsed if parsed is not None else _Parsed((rest,))


def _parse_maybe_json_to_list(rest: str, escape: str) -> _Parsed:
    parsed = _parse_json(rest)
    return parsed if parsed is not None else _parse_whitespace_delimited(rest, escape)


def _parse_health_config(rest: str, escape: str) -> _Parsed:
    # BuildKit scans bytes here, so a UTF-8 byte 0x85 or 0xA0 counts as a blank.
    raw = _encode(rest)
    sep = 0
    while sep < len(raw) and raw[sep] not in _GO_SPACE_BYTES:
        sep += 1
    nxt = sep
    while nxt < len(raw) and raw[nxt] in _GO_SPACE_BYTES:
        nxt += 1
    if sep == 0:
        return _Parsed()
    cmd = _parse_maybe_json(_decode(raw[nxt:]), escape)
    return _Parsed((_decode(raw[:sep]), *cmd.args), is_json=cmd.json)


def parse_words(rest: str, escape: str) -> list[str]:
    """BuildKit's parseWords: split on blanks outside quotes, keeping quotes and escapes."""
    words: list[str] = []
    buf: list[str] = []
    in_word = False
    quote = ""
    blank_ok = False
    i, n = 0, len(rest)
    while i < n:
        ch = rest[i]
        if 0xDC80 <= ord(ch) <= 0xDCFF:
            ch = "\ufffd"  # Go decodes an invalid byte as RuneError
        if not in_word and not quote:
            if ch in _GO_SPACE_SET:
                i += 1
                continue
            in_word = True
        if quote:
            if ch == quote:
                quote = ""
            elif ch == escape and quote != "'":
                if i + 1 == n:
                    i += 1
                    continue  # an escape token at the very end is dropped
                buf.append(ch)
                i += 1
                ch = rest[i]
            buf.append(ch)
            i += 1
            continue
        if ch in _GO_SPACE_SET:
            in_word = False
            if blank_ok or buf:
                words.append("".join(buf))
            buf = []
            blank_ok = False
            i += 1
            continue
        if ch in "'\"":
            quote = ch
            blank_ok = True
        if ch == escape:
            if i + 1 == n:
                i += 1
                continue
            buf.append(ch)
            i += 1
            ch = rest[i]
        buf.append(ch)
        i += 1
    if (in_word or quote) and (blank_ok or buf):
        words.append("".join(buf))
    return words


def _parse_name_val(rest: str, escape: str, keyword: str) -> _Parsed:
    words = parse_words(rest, escape)
    if not words:
        return _Parsed()
    if "=" not in words[0]:
        parts = _RE_WHITESPACE.split(rest, maxsplit=1)
        if len(parts) < 2:
            raise DockerfileSyntaxError(f"{keyword} must have two arguments")
        return _Parsed((parts[0], parts[1], ""))
    args: list[str] = []
    for word in words:
        if "=" not in word:
            raise DockerfileSyntaxError(
                f"Syntax error - can't find = in {go_quote(word)}. Must be of the form: name=value"
            )
        key, _, value = word.partition("=")
        args += (key, value, "=")
    return _Parsed(tuple(args))


def _parse_env(rest: str, escape: str) -> _Parsed:
    return _parse_name_val(rest, escape, "ENV")


def _parse_label(rest: str, escape: str) -> _Parsed:
    return _parse_name_val(rest, escape, "LABEL")


def _parse_name_or_name_val(rest: str, escape: str) -> _Parsed:
    return _Parsed(tuple(parse_words(rest, escape)))


def _parse_sub_command(rest: str, escape: str, depth: int = 0) -> _Parsed:
    if not rest:
        return _Parsed()
    if depth >= MAX_ONBUILD_NESTING:
        raise DockerfileSyntaxError(f"ONBUILD nested more than {MAX_ONBUILD_NESTING} deep (lamina's limit)")
    return _Parsed(child=_node_from_line(rest, escape, depth + 1))


_LINE_PARSERS: dict[str, Callable[[str, str], _Parsed]] = {
    "add": _parse_maybe_json_to_list,
    "arg": _parse_name_or_name_val,
    "cmd": _parse_maybe_json,
    "copy": _parse_maybe_json_to_list,
    "entrypoint": _parse_maybe_json,
    "env": _parse_env,
    "expose": _parse_whitespace_delimited,
    "from": _parse_whitespace_delimited,
    "healthcheck": _parse_health_config,
    "label": _parse_label,
    "maintainer": _parse_string,
    # "onbuild" is _parse_sub_command, called by _node_from_line, which counts the nesting
    "run": _parse_maybe_json,
    "shell": _parse_maybe_json,
    "stopsignal": _parse_string,
    "user": _parse_string,
    "volume": _parse_maybe_json_to_list,
    "workdir": _parse_string,
}


# --- splitting a logical line into keyword, flags and the rest ---------------------


def _extract_flags(line: str, escape: str) -> tuple[str, list[str]]:
    """Take leading `--flag` words off `line`; returns (rest, flags).

    BuildKit reads this part byte by byte, so a non-ASCII byte becomes the
    Latin-1 character of the same value (`--label=é` -> `--label=Ã©`).
    """
    if not line.startswith("--"):
        return line, []
    if line.isascii() and "'" not in line and '"' not in line and escape not in line:
        return _extract_plain_flags(line)
    return _extract_flags_bytewise(line, escape)


def _extract_flags_bytewise(line: str, escape: str) -> tuple[str, list[str]]:
    # One byte-by-byte state machine (BuildKit's extractBuilderFlags), kept whole: its states share
    # pos, word and quote.
    raw = _encode(line)
    esc = ord(escape)
    words: list[str] = []
    word = bytearray()
    in_word = False
    quote = 0
    blank_ok = False
    pos, n = 0, len(raw)
    while pos < n:
        ch = raw[pos]
        if not in_word and not quote:
            if ch in _GO_SPACE_BYTES:
                pos += 1
                continue
            if ch != 0x2D or pos + 1 == n or raw[pos + 1] != 0x2D:  # not "--"
                return _decode(raw[pos:]), words
            in_word = True
        if quote:
            if ch == quote:
                quote = 0
                pos += 1
                continue
            if ch == esc:
                if pos + 1 == n:
                    quote = 0
                    pos += 1
                    continue
                pos += 1
                ch = raw[pos]
            word.append(ch)
            pos += 1
            continue
        if ch in _GO_SPACE_BYTES:
            in_word = False
            text = word.decode("latin-1")
            if text == "--":
                return _decode(raw[pos:]), words
            if blank_ok or word:
                words.append(text)
            word = bytearray()
            blank_ok = False
            pos += 1
            continue
        if ch in (0x27, 0x22):  # ' or "
            quote = ch
            blank_ok = True
            pos += 1
            continue
        if ch == esc:
            if pos + 1 == n:
                pos += 1
                continue
            pos += 1
            ch = raw[pos]
        word.append(ch)
        pos += 1
    text = word.decode("latin-1")
    if (in_word or quote) and text != "--" and (blank_ok or word):
        words.append(text)
    return "", words


def _extract_plain_flags(line: str) -> tuple[str, list[str]]:
    """The common case of `_extract_flags`: ASCII, no quotes, no escapes."""
    flags: list[str] = []
    pos, n = 0, len(line)
    while True:
        while pos < n and line[pos] in _GO_SPACE_SET:
            pos += 1
        if not line.startswith("--", pos):
            return line[pos:], flags
        end = pos
        while end < n and line[end] not in _GO_SPACE_SET:
            end += 1
        if end - pos == 2:  # a bare `--` ends the flags
            return line[end:], flags
        flags.append(line[pos:end])
        pos = end


def split_command(line: str, escape: str) -> tuple[str, list[str], str]:
    """(keyword as written, flags, rest of the line trimmed)."""
    parts = _RE_WHITESPACE.split(line.strip(GO_SPACE), maxsplit=1)
    flags: list[str] = []
    rest = ""
    if len(parts) == 2:
        rest, flags = _extract_flags(parts[1], escape)
    return parts[0], flags, rest.strip(GO_SPACE)


def _node_from_line(line: str, escape: str, depth: int = 0) -> Node:
    """One logical line -> its Node; `depth` counts the ONBUILDs around it."""
    keyword, flags, rest = split_command(line, escape)
    name = go_lower(keyword)
    if name == "onbuild":
        parsed = _parse_sub_command(rest, escape, depth)
    else:
        parsed = _LINE_PARSERS.get(name, _parse_ignore)(rest, escape)
    return Node(
        keyword=keyword,
        args=parsed.args,
        flags=tuple(flags),
        child=parsed.child,
        json=parsed.json,
        original=line,
    )


# --- heredoc markers ----------------------------------------------------------------


class _LexError(Exception):
    pass


class _RawLexer:
    """BuildKit's shell lexer in the modes heredoc detection uses: empty
    environment, unset variables kept verbatim, optionally raw quotes and
    escapes. No variable is ever expanded here, so this is not shell.py's
    job (which offers only the expanding modes)."""

    def __init__(self, text: str, raw_quotes: bool, raw_escapes: bool) -> None:
        self.text = text
        self.pos = 0
        self.raw_quotes = raw_quotes
        self.raw_escapes = raw_escapes
        self.depth = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> str:
        ch = self.peek()
        self.pos += 1
        return ch

    def words(self) -> list[str]:
        return self.until("", self.raw_escapes)[1]

    def until(self, stop: str, raw_escapes: bool) -> tuple[str, list[str]]:
        if self.depth > MAX_NESTING:
            # Not a _LexError: BuildKit would find the heredocs, lamina cannot.
            raise DockerfileSyntaxError(
                f"heredoc detection: variable substitutions nested more than {MAX_NESTING} deep"
                " (lamina's limit)"
            )
        saved, self.raw_escapes = self.raw_escapes, raw_escapes
        self.depth += 1
        try:
            return self._until(stop)
        finally:
            self.raw_escapes = saved
            self.depth -= 1

    def _until(self, stop: str) -> tuple[str, list[str]]:
        result: list[str] = []
        words: list[str] = []
        word: list[str] = []
        in_word = False

        def add_char(c: str) -> None:
            nonlocal in_word, word
            if c in _GO_SPACE_SET:
                if in_word and word:
                    words.append("".join(word))
                    word = []
                    in_word = False
            else:
                word.append(c)
                in_word = True

        special = {
            "$": self.dollar,
            "'": self.single_quote,
            '"': self.double_quote,
            "<": self.heredoc_marker,
        }
        while self.pos < len(self.text):
            ch = self.peek()
            if stop and ch == stop:
                self.pos += 1
                if word:
                    words.append("".join(word))
                return "".join(result), words
            if ch in special:
                tmp = special[ch]()
                result.append(tmp)
                if ch == "$":
                    for c in tmp:
                        add_char(c)
                else:
                    word.append(tmp)
                    in_word = True
                continue
            ch = self.next()
            if ch == "\\":
                if self.raw_escapes:
                    word.append(ch)
                    in_word = True
                    result.append(ch)
                if self.pos >= len(self.text):
                    break
                ch = self.next()
                word.append(ch)
                in_word = True
            else:
                add_char(ch)
            result.append(ch)
        if stop:
            raise _LexError(f"unexpected end of statement while looking for matching {stop}")
        if word:
            words.append("".join(word))
        return "".join(result), words

    def single_quote(self) -> str:
        first = self.next()
        out = [first] if self.raw_quotes else []
        while True:
            if self.pos >= len(self.text):
                raise _LexError("unexpected end of statement while looking for matching single-quote")
            ch = self.next()
            if ch == "'":
                if self.raw_quotes:
                    out.append(ch)
                return "".join(out)
            out.append(ch)

    def double_quote(self) -> str:
        first = self.next()
        out = [first] if self.raw_quotes else []
        while True:
            ch = self.peek()
            if not ch:
                raise _LexError("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self.pos += 1
                if self.raw_quotes:
                    out.append(ch)
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            ch = self.next()
            if ch == "\\":
                if self.raw_escapes:
                    out.append(ch)
                if not self.peek():
                    continue
                if self.peek() in '"$\\':
                    ch = self.next()
            out.append(ch)

    def name(self) -> str:
        # Go's unicode.IsDigit/IsLetter: isdecimal/isalpha (isdigit takes `²`, isalnum `½`).
        ch = self.peek()
        if ch and ch.isdecimal():
            start = self.pos
            while self.peek() and self.peek().isdecimal():
                self.pos += 1
            return self.text[start : self.pos]
        if ch and ch in "@*#?-$!0":
            self.pos += 1
            return ch
        start = self.pos
        while (ch := self.peek()) and (ch.isalpha() or ch.isdecimal() or ch == "_"):
            self.pos += 1
        return self.text[start : self.pos]

    def dollar(self) -> str:
        self.pos += 1
        if self.peek() != "{":
            name = self.name()
            return "$" + name
        self.pos += 1
        ch = self.peek()
        if not ch:
            raise _LexError("syntax error: missing '}'")
        if ch in "{}:":
            raise _LexError("syntax error: bad substitution")
        name = self.name()
        ch = self.next()
        if ch == "}":
            return "${" + name + "}"
        if not ch:
            raise _LexError("syntax error: missing '}'")
        mod = ch
        if ch == ":":
            ch = self.next()
            mod += ch
        if mod[0] in ":+-?#%":
            word = self.until("}", raw_escapes=ch in "#%" and ch != "")[0]
            return "${" + name + mod + word + "}"
        if ch == "/":
            if self.peek() == "/":
                self.pos += 1
                mod += "/"
            pattern = self.until("/", raw_escapes=True)[0]
            replacement = self.until("}", raw_escapes=True)[0]
            return "${" + name + mod + pattern + "/" + replacement + "}"
        raise _LexError(f"unsupported modifier ({mod}) in substitution")

    def heredoc_marker(self) -> str:
        self.pos += 1
        if self.peek() != "<":
            return "<"
        self.pos += 1
        start = self.pos
        while self.peek() in (" ", "\t") and self.peek():
            self.pos += 1
        return "<<" + self.text[start : self.pos]


def parse_heredoc_marker(word: str) -> Heredoc | None:
    """The heredoc a `[n]<<[-]WORD` word opens (empty content), or None."""
    match = _RE_HEREDOC.match(word)
    if match is None or not match.group(3):
        return None
    rest = match.group(3)
    try:
        words = _RawLexer(rest, raw_quotes=False, raw_escapes=False).words()
        if len(words) != 1:
            return None
        raw_words = _RawLexer(rest, raw_quotes=True, raw_escapes=False).words()
    except _LexError as err:
        raise DockerfileSyntaxError(f"heredoc {word}: {err}") from None
    if len(raw_words) != 1:
        raise DockerfileSyntaxError(f"heredoc {word}: inconsistent quoting")
    name = words[0]
    quotes = name.count("'") + name.count('"')
    raw_quotes = raw_words[0].count("'") + raw_words[0].count('"')
    digits = match.group(1)
    # Go's ParseUint error (overflow) is ignored: the descriptor becomes 0.
    fd = int(digits) if digits and len(digits) < 20 and int(digits) < 2**64 else 0
    return Heredoc(
        name=name, file_descriptor=fd, expand=quotes == raw_quotes, chomp=match.group(2) == "-", content=""
    )


def _heredoc_markers(line: str) -> list[Heredoc]:
    try:
        words = _RawLexer(line, raw_quotes=True, raw_escapes=True).words()
    except _LexError:
        return []  # BuildKit ignores a lexing error here: no heredocs
    return [doc for doc in map(parse_heredoc_marker, words) if doc is not None]


# --- the file -----------------------------------------------------------------------


def _split_lines(text: str) -> list[str]:
    """Physical lines, each keeping its `\\n` (Go's scanLines variant)."""
    lines = text.split("\n")
    last = lines.pop()
    out = [line + "\n" for line in lines]
    if last:
        out.append(last)
    return out


class _Directives:
    """The directive scanner: active only until the first non-directive line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done = False
        self.line = 0
        self.found: list[Directive] = []
        self.escape = DEFAULT_ESCAPE
        self.continuation = _continuation_regex(DEFAULT_ESCAPE)

    def check(self, line: str) -> bool:
        self.line += 1
        if self.done:
            return False
        if not line.startswith("#"):
            self.done = True
            return False
        match = _RE_DIRECTIVE.match(line[1:].lstrip(GO_SPACE))
        if match is None or match.group(1).lower() not in KNOWN_DIRECTIVES:
            self.done = True
            return False
        key, value = match.group(1).lower(), match.group(2)
        location = Location(self.path, self.line)
        if any(d.name == key for d in self.found):
            raise DockerfileSyntaxError(f"only one {key} parser directive can be used", location)
        if key == "escape":
            if value not in ("`", "\\"):
                raise DockerfileSyntaxError(
                    f"invalid escape token '{value}' does not match ` or \\", location
                )
            self.escape = value
            self.continuation = _continuation_regex(value)
        self.found.append(Directive(key, value, self.line))
        return True


def _continuation_regex(escape: str) -> re.Pattern[str]:
    e = re.escape(escape)
    # `EE` at the end is an escaped escape, not a continuation.
    return re.compile(rf"(?:([^{e}]){e}[ \t]*|^{e}[ \t]*)\Z")


def _trim_continuation(line: str, regex: re.Pattern[str]) -> tuple[str, bool]:
    """(line without its continuation token, True when the instruction ends here)."""
    match = regex.search(line)
    if match is None:
        return line, True
    return line[: match.start()] + (match.group(1) or ""), False


def _is_comment(line: str) -> bool:
    return _lstrip(line).startswith("#")


def _check_size(source: str | bytes, path: str) -> None:
    if len(source) <= MAX_DOCKERFILE_BYTES // 4:
        return
    data = source if isinstance(source, bytes) else _encode(source)
    if len(data) > MAX_DOCKERFILE_BYTES:
        line = data.count(b"\n", 0, MAX_DOCKERFILE_BYTES) + 1  # where the limit is crossed
        raise DockerfileSyntaxError(
            f"the Dockerfile is larger than {MAX_DOCKERFILE_BYTES} bytes (lamina's limit, 8 MiB)",
            Location(path, line),
        )


class _Lines:
    """A Dockerfile's physical lines, read one at a time; `number` is the last one read."""

    def __init__(self, text: str, path: str) -> None:
        self.lines = _split_lines(text)
        self.path = path
        self.number = 0

    def more(self) -> bool:
        return self.number < len(self.lines)

    def read(self) -> str:
        raw = self.lines[self.number]
        self.number += 1
        if len(raw) > MAX_LINE_BYTES // 4 and len(_encode(raw)) > MAX_LINE_BYTES:
            raise DockerfileSyntaxError(
                f"dockerfile line greater than max allowed size of {MAX_LINE_BYTES - 1}",
                Location(self.path, self.number),
            )
        return raw


def parse(source: str | bytes, path: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile text; raises DockerfileSyntaxError naming `path:line`."""
    _check_size(source, path)
    text = source if isinstance(source, str) else source.decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _Lines(text, path)
    directives = _Directives(path)
    children: list[Node] = []
    warnings: list[str] = []
    comments: list[str] = []
    while lines.more():
        content = _lstrip(lines.read().rstrip("\r\n"))
        is_comment = content.startswith("#")
        if directives.check(content):
            continue
        if is_comment:
            comment = content[1:].strip(GO_SPACE)
            comments = [*comments, comment] if comment else []
            continue
        start = lines.number
        content, ended = _trim_continuation(content, directives.continuation)
        if ended and not content:
            continue
        line, empty_continuation = _join_continued(lines, directives, content, ended)
        if empty_continuation:
            warnings.append(f"{path}:{lines.number}: empty continuation line found in: {line}")
        node = _parse_node(line, directives.escape, path, start)
        heredocs = _read_heredocs(lines, node, line, start)  # before end_line: they end it
        children.append(
            Node(
                keyword=node.keyword,
                args=node.args,
                flags=node.flags,
                child=node.child,
                json=node.json,
                original=line,
                start_line=start,
                end_line=lines.number,
                heredocs=heredocs,
                comments=tuple(comments),
            )
        )
        comments = []
    if not children:
        raise DockerfileSyntaxError("file with no instructions", Location(path, max(lines.number, 1)))
    return Dockerfile(
        path=path,
        children=tuple(children),
        directives=tuple(directives.found),
        escape=directives.escape,
        warnings=tuple(warnings),
    )


def _join_continued(lines: _Lines, directives: _Directives, content: str, ended: bool) -> tuple[str, bool]:
    """The logical line that starts with `content` (its continuation lines joined, comment
    lines among them left out), and whether an empty continuation line was left out."""
    buf = [content]
    empty_continuation = False
    while not ended and lines.more():
        physical = lines.read().rstrip("\r\n")
        directives.check(physical)
        if _is_comment(physical):
            continue
        if not _lstrip(physical):
            empty_continuation = True
            continue
        physical, ended = _trim_continuation(physical, directives.continuation)
        buf.append(physical)
    return "".join(buf), empty_continuation


def _parse_node(line: str, escape: str, path: str, start: int) -> Node:
    """One logical line's node; its syntax errors name `path:start`."""
    try:
        return _node_from_line(line, escape)
    except _NotStringArray:
        raise DockerfileSyntaxError(
            "when using JSON array syntax, arrays must be comprised of strings only",
            Location(path, start),
        ) from None
    except DockerfileSyntaxError as err:
        raise err.with_location(Location(path, start)) from None


def _read_heredocs(lines: _Lines, node: Node, line: str, start: int) -> tuple[Heredoc, ...]:
    """The heredocs `line` opens, each with its body read from the lines that follow."""
    if "<<" not in line or not node.can_contain_heredoc():
        return ()
    try:
        markers = _heredoc_markers(line)
    except DockerfileSyntaxError as err:
        raise err.with_location(Location(lines.path, start)) from None
    return tuple(
        dataclasses.replace(marker, content=_heredoc_body(lines, marker, start)) for marker in markers
    )


def _heredoc_body(lines: _Lines, marker: Heredoc, start: int) -> str:
    """The lines up to `marker`'s terminator (not included)."""
    body: list[str] = []
    size = 0
    while True:
        if not lines.more():
            raise DockerfileSyntaxError(f"unterminated heredoc {marker.name}", Location(lines.path, start))
        raw = lines.read()
        candidate = raw.rstrip("\r\n")
        if marker.chomp:
            candidate = candidate.lstrip("\t")
        if candidate == marker.name:
            return "".join(body)
        body.append(raw)
        size += len(raw) if raw.isascii() else len(_encode(raw))
        if size > MAX_HEREDOC_BYTES:
            raise DockerfileSyntaxError(
                f"heredoc {marker.name} is larger than {MAX_HEREDOC_BYTES} bytes (lamina's limit, 4 MiB)",
                Location(lines.path, lines.number),
            )


def _node_json(node: Node) -> dict[str, object]:
    return {
        "keyword": node.keyword.upper(),
        "flags": list(node.flags),
        "args": list(node.args),
        "json": node.json,
        "child": _node_json(node.child) if node.child is not None else None,
        "heredocs": [dataclasses.asdict(h) for h in node.heredocs],
        "start_line": node.start_line,
        "end_line": node.end_line,
        "original": node.original,
    }


def to_json(dockerfile: Dockerfile) -> dict[str, object]:
    """The `lamina parse --format json` document."""
    return {
        "path": dockerfile.path,
        "directives": {d.name: d.value for d in dockerfile.directives},
        "escape": dockerfile.escape,
        "instructions": [_node_json(c) for c in dockerfile.children],
        "warnings": list(dockerfile.warnings),
    }
