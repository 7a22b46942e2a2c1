"""Run a command as nobody when the tests run as root (CI does): root reads and writes
anything, so a test of a permission error must not run as it."""

from __future__ import annotations

import os
import shutil

import pytest


def as_nobody(why: str) -> list[str]:
    """The prefix that runs a command as nobody (uid and gid 65534, no groups) when we are
    root, [] when we are not; skips, saying `why` root cannot test it, without setpriv."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip(f"{why}, and setpriv (util-linux) is missing to drop root")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
