"""COPY/ADD heredoc sources (`COPY <<EOF /dest`): the body expanded, and written as a file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from lamina.engine.dockerfile.shell import MAX_EXPANDED, expand_word
from lamina.engine.steps.copyadd.placement import one_file_target
from lamina.engine.steps.owners import set_owner_and_mode
from lamina.errors import ExpansionError

# An escape and the character it escapes, kept as a pair (a trailing escape alone).
_ESCAPE_PAIR = re.compile(r"(\\[\s\S]?)")


def expand_heredoc(content: Any, env: dict[str, str]) -> Any:
    """An unquoted heredoc's body with `$VAR`/`${VAR...}` expanded from the stage's
    ARG and ENV, as BuildKit's ExpandRaw does: quotes stay as written, a backslash
    escapes the next character (so `\\$` keeps a dollar). `<<"EOF"` is left alone.

    The body is prepared in string operations (one per escape, not one per
    character) and is bounded as every expanded word is (shell.MAX_EXPANDED)."""
    if not content.expand:
        return content
    data = content.data
    if len(data) > MAX_EXPANDED:
        raise ExpansionError(
            f"heredoc {content.path}: {len(data)} characters, longer than an expanded word"
            f" may be ({MAX_EXPANDED}, lamina's limit, 4 MiB)"
        )
    # The shared lexer removes quotes; escape each unescaped one so it comes out as written.
    parts = _ESCAPE_PAIR.split(data)  # text, escape pair, text, ...
    parts[::2] = [_escape_quotes(text) for text in parts[::2]]
    return dataclasses.replace(content, data=expand_word("".join(parts), env, "\\"))


def _escape_quotes(text: str) -> str:
    if "'" in text:
        text = text.replace("'", "\\'")
    if '"' in text:
        text = text.replace('"', '\\"')
    return text


def write_heredoc(
    upper: Path,
    dest: str,
    heredoc: Any,
    owner: Any,
    chmod: Any,
    image: Any,
    several: bool,
    late: list[tuple[Path, int, int]],
) -> None:
    """`COPY <<EOF /dest`: the body as a file (0644 unless --chmod), into dest/ when it is a dir."""
    target = one_file_target(upper, dest, heredoc.path, image, owner, late, into_dir=several)
    target.write_text(heredoc.data)
    mode = chmod.apply(0o644, False) if chmod is not None else 0o644
    uid, gid = owner if owner else (0, 0)
    set_owner_and_mode(target, uid, gid, mode)
