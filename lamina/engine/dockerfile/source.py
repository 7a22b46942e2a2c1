"""A Dockerfile's bytes, read with the front end's size cap.

Apart from the parser so that a no-op rebuild, which reads the Dockerfile to key its
memo (engine.steps.replay) but replays the build without parsing it, loads no parser.
"""

from __future__ import annotations

import os

# lamina's limit, which BuildKit does not have (parser.py refuses a larger file): twice the
# longest heredoc, itself as long as an expanded word may be (shell.MAX_EXPANDED, 4 MiB).
MAX_DOCKERFILE_BYTES = 8 * 1024 * 1024


def read_source(path: str | os.PathLike[str]) -> bytes:
    """A Dockerfile's bytes, never more than one past MAX_DOCKERFILE_BYTES (parse refuses
    those): a huge file or /dev/zero is not read whole. OSError as open() raises it."""
    with open(path, "rb") as f:
        return f.read(MAX_DOCKERFILE_BYTES + 1)
