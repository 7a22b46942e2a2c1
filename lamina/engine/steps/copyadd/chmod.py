"""`--chmod` of COPY and ADD: an octal mode, or symbolic clauses (`u+x,go-w`)."""

from __future__ import annotations

import dataclasses
import re

from lamina.errors import InstructionError

__all__ = ["Chmod", "parse_chmod"]

_WHO_BITS = {"u": 0o4700, "g": 0o2070, "o": 0o1007}
_SYMBOLIC_CLAUSE = re.compile(r"([ugoa]*)((?:[-+=](?:[ugo]|[rwxXst]*))+)")
_ACTION = re.compile(r"([-+=])([ugo]|[rwxXst]*)")


@dataclasses.dataclass(frozen=True, slots=True)
class Chmod:
    """A parsed --chmod: an octal mode, or symbolic clauses applied to the source mode."""

    text: str
    octal: int | None

    def apply(self, mode: int, is_dir: bool) -> int:
        if self.octal is not None:
            return self.octal
        for clause in self.text.split(","):
            match = _SYMBOLIC_CLAUSE.fullmatch(clause)
            assert match is not None  # parse_chmod checked it
            who = match.group(1).replace("a", "ugo") or "ugo"
            for op, perms in _ACTION.findall(match.group(2)):
                mode = _apply_action(mode, who, op, perms, is_dir)
        return mode


def _apply_action(mode: int, who: str, op: str, perms: str, is_dir: bool) -> int:
    mask = 0
    for w in set(who):
        mask |= _WHO_BITS[w]
    if perms in ("u", "g", "o"):  # copy another class's bits: g=u
        shift = {"u": 6, "g": 3, "o": 0}[perms]
        rwx = (mode >> shift) & 0o7
        bits = (rwx << 6) | (rwx << 3) | rwx
    else:
        bits = 0
        executable = is_dir or bool(mode & 0o111)
        for p in perms:
            if p == "r":
                bits |= 0o444
            elif p == "w":
                bits |= 0o222
            elif p == "x" or (p == "X" and executable):
                bits |= 0o111
            elif p == "s":
                bits |= 0o6000
            elif p == "t":
                bits |= 0o1000
    bits &= mask
    if op == "+":
        return mode | bits
    if op == "-":
        return mode & ~bits
    return (mode & ~mask) | bits


def parse_chmod(text: str) -> Chmod:
    """Parse `--chmod` (`0755`, `u+x,go-w`); InstructionError if malformed."""
    if re.fullmatch(r"[0-7]+", text):
        value = int(text, 8)
        if value <= 0o7777:
            return Chmod(text, value)
    elif text and all(_SYMBOLIC_CLAUSE.fullmatch(c) for c in text.split(",")):
        return Chmod(text, None)
    raise InstructionError(f"invalid chmod parameter: {text!r}: use an octal mode up to 07777 or u+x style")
