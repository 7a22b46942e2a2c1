"""What a step's inputs were, file by file, so that its next miss can name the files.

None of this is in a cache key (the key has the selection's digest): it is
stored under the step's position only, beside the `KeyInputs` it explains.
"""

from __future__ import annotations

from typing import Any

# Past this many files a step's list is not kept (its JSON is read and written with each
# build of the step): a miss then says "input files changed", without the paths.
MAX_FILES = 10_000


def selection_files(tree: Any, selection: Any) -> tuple[tuple[str, str, str], ...]:
    """(source path, content digest, "type mode uid:gid link") per item a COPY/ADD selection writes."""
    if len(selection.items) > MAX_FILES:
        return ()
    digests = tree.file_digests([item.entry for item in selection.items])
    facts: dict[str, tuple[str, str, str]] = {}
    for item in selection.items:
        entry = item.entry
        path = entry.path.lstrip("/") or "."
        content = digests.get(entry.path, b"")
        meta = f"{entry.type.value} {item.mode:o} {item.uid}:{item.gid} {entry.linkname}"
        facts[path] = (path, content.hex()[:16] if isinstance(content, bytes) else str(content), meta)
    return tuple(facts[path] for path in sorted(facts))
