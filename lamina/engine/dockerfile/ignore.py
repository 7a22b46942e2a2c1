""".dockerignore matching with Docker's semantics (moby/patternmatcher), and Go globs.

How a .dockerignore is read (`ignorefile.ReadAll`): a BOM is dropped, a line
whose *first* character is `#` is a comment, lines are trimmed and blank ones
dropped, a leading `!` makes an exception, the pattern is path-cleaned and a
leading `/` removed.

How a path is matched (`MatchesOrParentMatches`): patterns are anchored at the
context root; a path is excluded when the last pattern matching it, or any of
its parent directories, is not an exception. `*` and `?` never match `/`,
`**` matches any number of directories, `[...]` classes use `^` for negation
(`!` is literal), `\\` escapes. This is not .gitignore: a slash-less name
does not match at any depth and a trailing `/` does not mean "directory".

Known deviation: Docker hands its pattern to Go's regexp engine almost
verbatim, so a wildcard *inside* a class (`[*]`) means something odd there;
here a class holds exactly the characters Go's filepath.Match gives it.

`compile_glob`/`glob_match` are Go's `filepath.Match`, used for COPY sources.
"""

from __future__ import annotations

import dataclasses
import enum
import posixpath
import re
from collections.abc import Iterable, Sequence

from lamina.errors import IgnoreFileError

__all__ = [
    "DockerIgnore",
    "IgnoreMatch",
    "clean_path",
    "compile_glob",
    "glob_match",
    "has_glob_magic",
    "read_ignore_file",
]

_BOM = "\ufeff"


class GlobSyntaxError(ValueError):
    """A malformed glob (Go's filepath.ErrBadPattern)."""


def clean_path(path: str) -> str:
    """Go's path.Clean: "" -> ".", no `.`/`..` segments inside, no trailing /."""
    if not path:
        return "."
    cleaned = posixpath.normpath(path)
    return cleaned[1:] if cleaned.startswith("//") else cleaned  # POSIX keeps "//", Go does not


def has_glob_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[\\")


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match pattern as a compiled regex (use `fullmatch`)."""
    regex, _ = _translate(pattern, double_star=False)
    return re.compile(regex, re.DOTALL)


def glob_match(pattern: str, name: str) -> bool:
    """Go's filepath.Match(pattern, name); GlobSyntaxError if malformed."""
    return compile_glob(pattern).fullmatch(name) is not None


def _class(pattern: str, i: int) -> tuple[str, int]:
    """Translate the class starting after `[` at `i`; return regex and next index."""
    negated = i < len(pattern) and pattern[i] == "^"
    if negated:
        i += 1
    items: list[str] = []
    count = 0
    while True:
        if i < len(pattern) and pattern[i] == "]" and count:
            i += 1
            break
        lo, i = _class_char(pattern, i)
        hi = lo
        if i < len(pattern) and pattern[i] == "-":
            hi, i = _class_char(pattern, i + 1)
        count += 1
        if lo <= hi:  # Go accepts lo > hi: a range that matches nothing
            items.append(re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}")
    if not items:
        return ("[\\s\\S]" if negated else "(?!)"), i
    return "[" + ("^" if negated else "") + "".join(items) + "]", i


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if i >= len(pattern) or pattern[i] in "-]":
        raise GlobSyntaxError("syntax error in pattern")
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise GlobSyntaxError("syntax error in pattern")
    ch = pattern[i]
    i += 1
    if i >= len(pattern):  # the class never closes
        raise GlobSyntaxError("syntax error in pattern")
    return ch, i


def _translate(pattern: str, double_star: bool) -> tuple[str, bool]:
    """A glob as a regex body; the flag says whether it had any wildcard."""
    out: list[str] = []
    magic = False
    i = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            magic = True
            if double_star and i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":  # `**/` is `**`
                    i += 1
                out.append(".*" if i >= n else "(?:.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            magic = True
            out.append("[^/]")
        elif ch == "[":
            magic = True
            regex, i = _class(pattern, i)
            out.append(regex)
        elif ch == "\\":
            if i >= n:
                raise GlobSyntaxError("syntax error in pattern")
            magic = True
            out.append(re.escape(pattern[i]))
            i += 1
        else:
            out.append(re.escape(ch))
    return "".join(out), magic


class _Kind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"  # `dir/**`: everything under dir/
    SUFFIX = "suffix"  # `**/name`, `**.ext`: a literal tail at any depth
    REGEX = "regex"


@dataclasses.dataclass(frozen=True, slots=True)
class _Pattern:
    text: str  # cleaned, without the `!`
    exception: bool
    kind: _Kind
    regex: re.Pattern[str] | None
    segments: tuple[re.Pattern[str] | str | None, ...]  # per `/` part; None for a `**` part

    def match(self, path: str) -> bool:
        if self.kind is _Kind.EXACT:
            return path == self.text
        if self.kind is _Kind.PREFIX:
            return path.startswith(self.text[:-2])
        if self.kind is _Kind.SUFFIX:
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix[:1] == "/" and path == suffix[1:])
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None

    def may_match_under(self, parts: Sequence[str]) -> bool:
        """Could this pattern match `parts` itself or a path below it? (cheap, conservative)"""
        if self.kind is not _Kind.EXACT and self.kind is not _Kind.REGEX:
            return True
        for i, part in enumerate(parts):
            if i >= len(self.segments):
                return True  # it matches an ancestor of parts
            segment = self.segments[i]
            if segment is None:
                return True
            if isinstance(segment, str):
                if segment != part:
                    return False
            elif segment.fullmatch(part) is None:
                return False
        return True


def _compile_pattern(text: str, exception: bool) -> _Pattern:
    # Docker's match type: a literal pattern is compared as a string; `**`
    # at the very start or end is a suffix/prefix test (so `**.go` matches
    # `a/b.go` and `xb.go`); anything else is a regex.
    kind = _Kind.EXACT
    if text.startswith("**"):
        rest = text[3:] if text[2:3] == "/" else text[2:]
        kind = _Kind.SUFFIX if not has_glob_magic(rest) else _Kind.REGEX
    elif text.endswith("**") and not has_glob_magic(text[:-2]):
        kind = _Kind.PREFIX
    elif has_glob_magic(text):
        kind = _Kind.REGEX
    regex_body, _ = _translate(text, double_star=True)
    regex = re.compile(regex_body, re.DOTALL) if kind is _Kind.REGEX else None
    segments: list[re.Pattern[str] | str | None] = []
    for part in text.split("/"):
        if "**" in part:
            segments.append(None)
        elif has_glob_magic(part):
            segments.append(re.compile(_translate(part, double_star=False)[0], re.DOTALL))
        else:
            segments.append(part)
    return _Pattern(text, exception, kind, regex, tuple(segments))


@dataclasses.dataclass(frozen=True, slots=True)
class IgnoreMatch:
    """The result of matching one path, reused for its children during a walk."""

    excluded: bool
    matched: tuple[bool, ...]  # per pattern: it matched this path or an ancestor


class DockerIgnore:
    """The patterns of one .dockerignore file, in order.

    `lines` are the raw lines of the file; `source` names it in errors.
    """

    __slots__ = ("_exceptions", "_patterns", "source")

    def __init__(self, lines: Iterable[str], source: str = ".dockerignore") -> None:
        self.source = source
        patterns: list[_Pattern] = []
        for lineno, raw in enumerate(lines, start=1):
            line = raw.removeprefix(_BOM) if lineno == 1 else raw
            if line.startswith("#"):
                continue
            line = line.strip()
            if not line:
                continue
            exception = line.startswith("!")
            if exception:
                line = line[1:].strip()
                if not line:
                    raise IgnoreFileError(f'{source}:{lineno}: illegal exclusion pattern: "!"')
            text = clean_path(line)
            if len(text) > 1 and text.startswith("/"):
                text = text[1:]
            try:
                patterns.append(_compile_pattern(text, exception))
            except (GlobSyntaxError, re.error) as err:
                raise IgnoreFileError(f"{source}:{lineno}: invalid pattern {line!r}: {err}") from None
        self._patterns = tuple(patterns)
        self._exceptions = tuple(p for p in patterns if p.exception)

    @property
    def patterns(self) -> tuple[str, ...]:
        """The cleaned patterns, exceptions with their leading `!`."""
        return tuple(("!" if p.exception else "") + p.text for p in self._patterns)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def excludes(self, path: str) -> bool:
        """Whether `path` (relative to the context root, `/`-separated) is left out."""
        path = clean_path(path.lstrip("/"))
        if path == ".":
            return False  # the root itself is never excluded
        state: IgnoreMatch | None = None
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            state = self.match("/".join(parts[:depth]), state)
        assert state is not None
        return state.excluded

    def match(self, path: str, parent: IgnoreMatch | None) -> IgnoreMatch:
        """Match `path` given the result for its parent directory (None at the top).

        During a walk this costs one test per pattern per path, where
        `excludes` would test every ancestor again.
        """
        excluded = False
        matched: list[bool] = []
        for i, pattern in enumerate(self._patterns):
            hit = (parent is not None and parent.matched[i]) or pattern.match(path)
            matched.append(hit)
            if hit:
                excluded = not pattern.exception
        return IgnoreMatch(excluded, tuple(matched))

    def can_prune(self, directory: str) -> bool:
        """True when nothing under an excluded `directory` can be re-included.

        A walk may then skip the directory without reading it; otherwise it
        must descend and test each path, since a later `!` pattern may
        bring a file back.
        """
        parts = directory.split("/")
        return not any(p.may_match_under(parts) for p in self._exceptions)

    def may_match_below(self, directory: str) -> bool:
        """Whether some (non-exception) pattern could match `directory` or a path under it."""
        parts = directory.split("/")
        return any(p.may_match_under(parts) for p in self._patterns if not p.exception)


def read_ignore_file(text: str, source: str = ".dockerignore") -> DockerIgnore:
    """Parse the text of a .dockerignore file (lines end at `\n`; a trailing `\r` is dropped)."""
    return DockerIgnore((line.removesuffix("\r") for line in text.split("\n")), source)
