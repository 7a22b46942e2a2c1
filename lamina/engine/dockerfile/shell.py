"""Shell-word expansion with BuildKit's lexer rules.

ENV, ARG, COPY, WORKDIR and friends expand `$VAR` and `${VAR...}` in their
arguments the way BuildKit's `shell.Lex` does: quotes are removed, the escape
token (`\\` or `` ` ``) escapes one character, and variables expand from an
environment mapping. RUN is not expanded here; its shell does that.

Behaviour worth knowing (all checked by BuildKit's envVarTest/wordsTest):
- an unset variable expands to "", positional and special parameters
  (`$1`, `$@`, `$#`, ...) are never set;
- the word after a modifier (`${A:-word}`) is always lexed, even when not
  used, so its syntax errors surface and its variables count as read;
- `split_words` splits at unquoted blanks, and also at blanks that come from
  an unquoted expansion; quoted text and escaped blanks stay whole;
- `#`, `%` and `/` patterns use `*` and `?` (no bracket expressions), and
  keep escapes in the pattern so `\\*` is a literal star; they are matched in
  one pass (`_Glob`), not by a backtracking regex (`*x*x*x*y` was exponential).

Two limits BuildKit does not have (Go's stack and memory just grow), so that
a hostile Dockerfile ends in an ExpansionError rather than a RecursionError
or a MemoryError: `${...}` may nest MAX_NESTING deep, and one expanded word
may be MAX_EXPANDED characters long. Text is copied in runs (literal text
between special characters, whole variable values), never char by char, so
a long value costs what its string operations cost.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from lamina.errors import ExpansionError

__all__ = ["expand_word", "referenced_names", "split_words"]

MAX_NESTING = 64  # `${A:-${B:-...}}` levels; each costs a few Python frames
MAX_EXPANDED = 4 * 1024 * 1024  # characters in one expanded word (4 MiB of ASCII)

_EOF = ""
_SPECIAL_PARAMS = frozenset("@*#?-$!0")
# Go's unicode.IsSpace: the Latin-1 blanks and Unicode's White_Space property
# (str.isspace() differs: it also accepts \x1c-\x1f).
_SPACES = (
    "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
_BLANKS = re.compile(f"[{_SPACES}]+")

Lookup = Callable[[str], "str | None"]  # None means unset


def expand_word(word: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """Expand one word: quotes removed, escapes applied, no splitting."""
    if not _needs_lexing(word, escape):
        return word
    return _Lexer(word, env.get, escape).run()[0]


def split_words(word: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Expand `word` and split it into fields as BuildKit's ProcessWords does."""
    if not _needs_lexing(word, escape):
        return _split_plain(word)
    return _Lexer(word, env.get, escape).run()[1]


def referenced_names(word: str, escape: str = "\\") -> frozenset[str]:
    """Names of every variable `word` reads when expanded, whatever their values.

    A cache key built from these names (and their values) changes exactly when
    the expansion could change. Raises ExpansionError on invalid syntax.
    """
    if "$" not in word:
        return frozenset()
    seen: set[str] = set()

    def record(name: str) -> str:
        seen.add(name)
        return "x"  # set and non-empty: no `?` error, every branch still lexed

    _Lexer(word, record, escape).run()
    return frozenset(seen)


def _needs_lexing(word: str, escape: str) -> bool:
    return "$" in word or "'" in word or '"' in word or escape in word


def _split_plain(word: str) -> list[str]:
    return [field for field in _BLANKS.split(word) if field]


def _too_long() -> ExpansionError:
    return ExpansionError(
        f"the expanded word would be longer than {MAX_EXPANDED} characters (lamina's limit, 4 MiB)"
    )


def _quote_for_message(text: str) -> str:
    """The word as BuildKit's `failed to process "%s"` shows it, cut to one short line."""
    line, newline, _ = text.partition("\n")
    if newline or len(line) > 100:
        return line[:80] + "..."
    return line


_STOPS: dict[tuple[str, str], re.Pattern[str]] = {}


def _specials(stop: str, escape: str) -> re.Pattern[str]:
    """The characters `_Lexer._until` must look at; everything else is copied in runs."""
    regex = _STOPS.get((stop, escape))
    if regex is None:
        regex = re.compile("[" + re.escape("$'\"" + escape + stop) + "]")
        _STOPS[(stop, escape)] = regex
    return regex


class _Fields:
    """Collects the fields of a word while it is being lexed."""

    __slots__ = ("current", "in_word", "words")

    def __init__(self) -> None:
        self.words: list[str] = []
        self.current: list[str] = []
        self.in_word = False

    def blank(self) -> None:
        if self.in_word and self.current:
            self.words.append("".join(self.current))
            self.current = []
            self.in_word = False

    def add_raw(self, text: str) -> None:
        self.current.append(text)
        self.in_word = True

    def add_expanded(self, text: str) -> None:
        """Unquoted text: blanks split fields (a run of blanks is one split)."""
        if not text:
            return
        parts = _BLANKS.split(text)
        if parts[0]:
            self.add_raw(parts[0])
        for part in parts[1:]:
            self.blank()
            if part:
                self.add_raw(part)

    def finish(self) -> list[str]:
        word = "".join(self.current)
        if word:
            self.words.append(word)
        return self.words


class _Lexer:
    """One pass over one word; its position is the state."""

    def __init__(self, text: str, lookup: Lookup, escape: str) -> None:
        self.text = text
        self.pos = 0
        self.lookup = lookup
        self.escape = escape
        self.raw_escapes = False
        self.depth = 0

    def run(self) -> tuple[str, list[str]]:
        try:
            return self.until(_EOF, raw_escapes=False)
        except ExpansionError as err:
            text = _quote_for_message(self.text)
            raise ExpansionError(f'failed to process "{text}": {err}') from None

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else _EOF

    def next(self) -> str:
        ch = self.peek()
        self.pos += 1 if ch else 0
        return ch

    def until(self, stop: str, raw_escapes: bool) -> tuple[str, list[str]]:
        """Lex up to and including `stop` (or to the end when `stop` is EOF)."""
        if self.depth > MAX_NESTING:
            raise ExpansionError(
                f"variable substitutions nested more than {MAX_NESTING} deep (lamina's limit)"
            )
        saved, self.raw_escapes = self.raw_escapes, raw_escapes
        self.depth += 1
        try:
            return self._until(stop)
        finally:
            self.raw_escapes = saved
            self.depth -= 1

    def _until(self, stop: str) -> tuple[str, list[str]]:
        out: list[str] = []
        size = 0
        fields = _Fields()
        text = self.text
        specials = _specials(stop, self.escape)
        while True:
            match = specials.search(text, self.pos)
            end = match.start() if match is not None else len(text)
            if end > self.pos:  # a run of plain text: copied whole
                run = text[self.pos : end]
                self.pos = end
                size += len(run)
                out.append(run)
                fields.add_expanded(run)
            if match is None:
                break
            ch = text[end]
            if stop and ch == stop:
                self.pos += 1
                return "".join(out), fields.finish()
            if ch == "$":
                value = self.dollar()
            elif ch == "'":
                value = self.single_quoted()
            elif ch == '"':
                value = self.double_quoted()
            else:  # the escape token
                self.pos += 1
                if self.raw_escapes:
                    out.append(ch)
                    fields.add_raw(ch)
                    size += 1
                value = self.next()
                if value == _EOF:  # a trailing escape is dropped
                    break
            size += len(value)
            if size > MAX_EXPANDED:
                raise _too_long()
            out.append(value)
            if ch == "$":
                fields.add_expanded(value)
            else:
                fields.add_raw(value)
        if stop:
            raise ExpansionError(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out), fields.finish()

    def single_quoted(self) -> str:
        self.next()
        end = self.text.find("'", self.pos)
        if end < 0:
            raise ExpansionError("unexpected end of statement while looking for matching single-quote")
        value = self.text[self.pos : end]
        self.pos = end + 1
        return value

    def double_quoted(self) -> str:
        self.next()
        out: list[str] = []
        size = 0
        text = self.text
        specials = _specials('"', self.escape)
        while True:
            match = specials.search(text, self.pos)
            if match is None:
                raise ExpansionError("unexpected end of statement while looking for matching double-quote")
            end = match.start()
            if end > self.pos:
                out.append(text[self.pos : end])
                size += end - self.pos
                self.pos = end
            ch = text[end]
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "$":
                value = self.dollar()
                size += len(value)
                if size > MAX_EXPANDED:
                    raise _too_long()
                out.append(value)
                continue
            if ch == "'":  # not special inside double quotes
                self.pos += 1
                out.append(ch)
                size += 1
                continue
            # the escape token
            self.pos += 1
            if self.raw_escapes:
                out.append(ch)
                size += 1
            following = self.peek()
            if following == _EOF:
                continue  # the search then reports the missing quote
            if following in ('"', "$", self.escape):
                ch = self.next()
            # any other escape stays literal inside double quotes
            out.append(ch)
            size += 1

    def name(self) -> str:
        """A variable name: digits, one special parameter, or [letters digits _].

        Go's unicode.IsDigit and IsLetter: str.isdecimal and str.isalpha
        (str.isdigit would also take `²`, which Go does not)."""
        start = self.pos
        ch = self.peek()
        if ch and ch.isdecimal():
            while self.peek() and self.peek().isdecimal():
                self.pos += 1
            return self.text[start : self.pos]
        if ch in _SPECIAL_PARAMS:
            self.pos += 1
            return ch
        while (ch := self.peek()) and (ch.isalpha() or ch.isdecimal() or ch == "_"):
            self.pos += 1
        return self.text[start : self.pos]

    def dollar(self) -> str:
        self.next()  # the '$'
        if self.peek() != "{":
            name = self.name()
            if not name:
                return "$"
            return self.lookup(name) or ""
        self.next()  # the '{'
        first = self.peek()
        if first == _EOF:
            raise ExpansionError("syntax error: missing '}'")
        if first in "{}:":
            raise ExpansionError("syntax error: bad substitution")
        name = self.name()
        op = self.next()
        if op == "}":
            return self.lookup(name) or ""
        if op == "/":
            return self.substitute(name)
        if op == _EOF:
            raise ExpansionError("syntax error: missing '}'")
        null_is_unset = op == ":"
        if null_is_unset:
            op = self.next()
        modifier = (":" if null_is_unset else "") + op
        if op not in ("+", "-", "?", "#", "%"):
            raise ExpansionError(f"unsupported modifier ({modifier}) in substitution")
        word = self.braced_word(raw_escapes=op in "#%")
        value = self.lookup(name)
        unset = value is None or (null_is_unset and value == "")
        if op == "-":
            return word if unset else (value or "")
        if op == "+":
            return "" if unset else word
        if op == "?":
            if value is None:
                raise ExpansionError(f"{name}: {word or 'is not allowed to be unset'}")
            if unset:
                raise ExpansionError(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        # `#`/`%` trim the shortest match, `##`/`%%` the longest.
        greedy = word.startswith(op)
        pattern = word[1:] if greedy else word
        if op == "#":
            return _trim_prefix(pattern, value or "", greedy)
        return _trim_suffix(pattern, value or "", greedy)

    def braced_word(self, raw_escapes: bool) -> str:
        try:
            return self.until("}", raw_escapes)[0]
        except ExpansionError:
            if self.peek() == _EOF:
                raise ExpansionError("syntax error: missing '}'") from None
            raise

    def substitute(self, name: str) -> str:
        """`${name/pattern/replacement}` and `${name//pattern/replacement}`."""
        replace_all = self.peek() == "/"
        if replace_all:
            self.next()
        try:
            pattern = self.until("/", raw_escapes=True)[0]
        except ExpansionError:
            if self.peek() == _EOF:
                raise ExpansionError("syntax error: missing '/' in ${}") from None
            raise
        replacement = self.braced_word(raw_escapes=True)
        value = self.lookup(name) or ""
        if not replace_all:
            return _replace_first(pattern, value, replacement)
        return _replace_all(pattern, value, replacement)


class _Segment:
    """Fixed-length text between two stars of a pattern: literal characters and `?`.

    Each method finds the segment in `value`; `first` and `last` only where a
    star before it could reach: from `pos` up to the next newline (a star is
    Go's `.*`, which does not cross one).
    """

    __slots__ = ("_at", "_greedy", "_lazy", "size", "text")

    def __init__(self, tokens: list[str]) -> None:
        self.size = len(tokens)
        self.text: str | None = None  # set when the segment is all literal (str methods, no regex)
        if "?" not in tokens:
            self.text = "".join(tokens)[1::2]  # the escape-free pairs, below
            return
        parts: list[str] = []
        for token in tokens:
            if token == "?":
                parts.append(".")  # Go's `.`: anything but a newline, as Python's
            else:
                parts.append(re.escape(token[1]))
        regex = "".join(parts)
        self._at = re.compile(regex)
        self._lazy = re.compile(f".*?(?:{regex})")  # one quantifier before a fixed length: linear
        self._greedy = re.compile(f".*(?:{regex})")

    def search_match(self, value: str, pos: int) -> tuple[int, int] | None:
        start = self.search(value, pos) if pos <= len(value) else -1
        return (start, start + self.size) if start >= 0 else None

    def at(self, value: str, pos: int) -> bool:
        if self.text is not None:
            return value.startswith(self.text, pos)
        return self._at.match(value, pos) is not None

    def search(self, value: str, pos: int) -> int:
        """The first place at or after `pos`, anywhere."""
        if self.text is not None:
            return value.find(self.text, pos)
        match = self._at.search(value, pos)
        return match.start() if match else -1

    def replace_all(self, value: str, template: str) -> str:
        """Every match replaced, for a pattern that is this one segment: its matches
        all have one length, never empty, so they are str.replace's or re.sub's."""
        if self.text is not None:
            piece = _go_template(template, self.text)  # every match is this text
            if len(value) + value.count(self.text) * (len(piece) - self.size) > MAX_EXPANDED:
                raise _too_long()
            return value.replace(self.text, piece)
        if "$" in template:
            return _replace_each(self, value, template)
        if len(template) > self.size:
            count = sum(1 for _ in self._at.finditer(value))
            if len(value) + count * (len(template) - self.size) > MAX_EXPANDED:
                raise _too_long()
        return self._at.sub(template.replace("\\", "\\\\"), value)  # no group references: literal

    def first(self, value: str, pos: int) -> int:
        if self.text is not None:
            return value.find(self.text, pos, _line_end(value, pos) + self.size)
        match = self._lazy.match(value, pos)
        return match.end() - self.size if match else -1

    def last(self, value: str, pos: int) -> int:
        if self.text is not None:
            return value.rfind(self.text, pos, _line_end(value, pos) + self.size)
        match = self._greedy.match(value, pos)
        return match.end() - self.size if match else -1


def _line_end(value: str, pos: int) -> int:
    end = value.find("\n", pos)
    return len(value) if end < 0 else end


class _Glob:
    """A `#`, `%` or `/` pattern, matched without backtracking.

    BuildKit turns the pattern into a Go regexp (`*` is `.*`, or `.*?` for the
    shortest match; `?` is `.`) and RE2 runs it in linear time; a Python regex
    of the same shape backtracks exponentially in the stars (`*x*x*x*y`). Here
    the pattern is fixed-length segments between stars, and each segment is
    put at its earliest place after the one before. That is where Go's lazy
    stars put it, and it leaves every later segment the most room, so:
    the shortest match is that chain's end, the longest the same chain with
    the last segment at its latest place, and a chain that fails from one
    start fails from every later start before the next newline. Each step is
    a str.find or a regex with a single quantifier: linear in the value.
    """

    __slots__ = ("segments",)

    def __init__(self, pattern: str) -> None:
        segments: list[list[str]] = [[]]
        i = 0
        while i < len(pattern):
            ch = pattern[i]
            i += 1
            if ch == "*":
                if segments[-1] or len(segments) == 1:
                    segments.append([])  # `**` is `*`
            elif ch == "?":
                segments[-1].append("?")
            elif ch == "\\":
                following = pattern[i] if i < len(pattern) else _EOF
                if following in ("}", "/"):
                    continue  # escaped only to get past the ${} lexer
                if following not in ("*", "?", "\\"):
                    raise ExpansionError(
                        f"invalid pattern ({pattern}) in substitution: invalid escape '\\{following}'"
                    )
                segments[-1].append("\\" + following)
                i += 1
            else:
                segments[-1].append("\\" + ch)  # a literal, as an escape pair
        self.segments = tuple(_Segment(tokens) for tokens in segments)

    def end_at(self, value: str, start: int, longest: bool) -> int:
        """The end of the shortest (or longest) match starting at `start`; -1 if none."""
        head, *rest = self.segments
        if not head.at(value, start):
            return -1
        pos = start + head.size
        for i, segment in enumerate(rest):
            found = segment.last(value, pos) if longest and i == len(rest) - 1 else segment.first(value, pos)
            if found < 0:
                return -1
            pos = found + segment.size
        return pos

    def search_match(self, value: str, pos: int) -> tuple[int, int] | None:
        """Go's leftmost-first match at or after `pos` with greedy stars: the leftmost
        start, and the longest match from it."""
        head = self.segments[0]
        while pos <= len(value):
            start = head.search(value, pos)
            if start < 0:
                return None
            end = self.end_at(value, start, longest=True)
            if end >= 0:
                return start, end
            # The segments after the head failed from start + head.size, so they fail
            # from every later place up to the next newline: skip past it.
            newline = value.find("\n", start + head.size)
            if newline < 0:
                return None
            pos = max(start + 1, newline - head.size + 1)
        return None


_GLOBS: dict[str, _Glob] = {}


def _glob(pattern: str) -> _Glob:
    glob = _GLOBS.get(pattern)
    if glob is None:
        glob = _Glob(pattern)
        if len(_GLOBS) >= 256:
            _GLOBS.clear()
        _GLOBS[pattern] = glob
    return glob


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    end = _glob(pattern).end_at(value, 0, longest=greedy)
    return value[end:] if end >= 0 else value


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    # As BuildKit: reverse both pattern (keeping `\x` escape pairs in order)
    # and value, and trim a prefix.
    tokens: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            tokens.append(pattern[i : i + 2])
            i += 2
        else:
            tokens.append(pattern[i])
            i += 1
    reversed_pattern = "".join(reversed(tokens))
    return _trim_prefix(reversed_pattern, value[::-1], greedy)[::-1]


def _replace_first(pattern: str, value: str, replacement: str) -> str:
    found = _glob(pattern).search_match(value, 0)
    if found is None:
        return value
    start, end = found
    return value[:start] + replacement + value[end:]


def _replace_all(pattern: str, value: str, template: str) -> str:
    glob = _glob(pattern)
    if len(glob.segments) == 1 and glob.segments[0].size:
        return glob.segments[0].replace_all(value, template)
    return _replace_each(glob, value, template)


def _replace_each(glob: _Glob | _Segment, value: str, template: str) -> str:
    """Go's Regexp.ReplaceAllString: `$` in the replacement is a template, and an
    empty match right after the previous match is not replaced."""
    out: list[str] = []
    size = 0
    last_end = 0
    pos = 0
    while pos <= len(value):
        found = glob.search_match(value, pos)
        if found is None:
            break
        start, end = found
        out.append(value[last_end:start])
        size += start - last_end
        if end > last_end or start == 0:
            piece = _go_template(template, value[start:end])
            size += len(piece)
            if size > MAX_EXPANDED:  # each match can add the whole replacement
                raise _too_long()
            out.append(piece)
        last_end = end
        pos = pos + 1 if end <= pos else end  # always advance at least one character
    out.append(value[last_end:])
    return "".join(out)


def _go_template(template: str, whole: str) -> str:
    """Go's Regexp.Expand for a pattern with no groups: `$0` and `${0}` are the match,
    `$$` is `$`, any other name is empty, and a malformed `$` stays as it is."""
    if "$" not in template:
        return template
    out: list[str] = []
    size = 0
    rest = template
    while True:
        before, dollar, rest = rest.partition("$")
        out.append(before)
        if not dollar:
            return "".join(out)
        if rest.startswith("$"):
            out.append("$")
            rest = rest[1:]
            continue
        name, after = _template_name(rest)
        if name is None:
            out.append("$")
            continue
        rest = after
        if name == "0":  # Go: "00" is a name, not group 0
            size += len(whole)
            if size > MAX_EXPANDED:
                raise _too_long()
            out.append(whole)


def _template_name(text: str) -> tuple[str | None, str]:
    """Go's regexp `extract`: a name of letters, digits and `_`, maybe in braces."""
    brace = text.startswith("{")
    i = 1 if brace else 0
    start = i
    while i < len(text) and (text[i].isalpha() or text[i].isdecimal() or text[i] == "_"):
        i += 1
    if i == start:
        return None, text
    name = text[start:i]
    if brace:
        if i >= len(text) or text[i] != "}":
            return None, text
        i += 1
    return name, text[i:]
