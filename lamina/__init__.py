"""lamina: a daemonless, rootless multi-stage image builder.

Importing lamina has no side effects: it reads no environment, opens no files
and imports no heavy dependency. The public surface lives in `lamina.api` and
is re-exported here lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API_NAMES = ("build", "plan", "run", "load", "save", "images", "pull", "push")


def __getattr__(name: str) -> Any:
    # Lazy so that `import lamina` stays cheap; the API pulls in the engine.
    if name in _API_NAMES:
        from lamina import api

        return getattr(api, name)
    raise AttributeError(f"module 'lamina' has no attribute {name!r}")
