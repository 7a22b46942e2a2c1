"""pytest's tmp dirs after a rootless run (a user with subordinate ids, no root).

A rootless build leaves files its subordinate ids own under tmp_path (layers, caches).
pytest, running as the user, can remove none of them: tmp_path_retention_policy's
removals fail quietly and the rotation of /tmp/pytest-of-USER renames old sessions to
`garbage-*` and keeps them, run after run. `remove_leftovers` removes them as lamina's
cache prune does, through the user's namespace helper (lamina.engine.sandbox.runner).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def remove_leftovers(basetemp: Path, *, this_session: bool) -> None:
    """Remove the `garbage-*` sessions beside `basetemp`, and with `this_session` (it passed)
    what is left in `basetemp` itself. Nothing to do as root or without subordinate ids."""
    if os.geteuid() == 0:
        return
    from lamina.engine.sandbox.idmap import IdMode, detect_ids
    from lamina.engine.sandbox.runner import remove_tree
    from lamina.errors import LaminaError

    ids = detect_ids()
    if ids.mode is not IdMode.SUBORDINATE:
        return
    # Only pytest's own rotation (/tmp/pytest-of-USER/pytest-N) names old sessions garbage-*.
    numbered = basetemp.parent.name.startswith("pytest-of-")
    paths = sorted(basetemp.parent.glob("garbage-*")) if numbered else []
    if this_session and basetemp.is_dir():
        paths += sorted(basetemp.iterdir())
    for path in paths:
        with contextlib.suppress(LaminaError, OSError):  # another session's, in use: next time
            remove_tree(path, ids)
