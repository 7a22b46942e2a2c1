"""Helpers for the tests that pull and push against tests/registry_server.py's registry.

- `client_env(tmp_path)`: the environment of one test's lamina commands: a private HOME,
  registry auth file (REGISTRY_AUTH_FILE) and cache (LAMINA_CACHE).
- `skopeo(*args)`: skopeo's stdout, the test failing on its error (skipped without skopeo).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def client_env(tmp_path: Path) -> dict[str, str]:
    """A private HOME, auth file and cache under `tmp_path` for one test."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LAMINA_CACHE": str(tmp_path / "cache"),
        "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"),
    }


def skopeo(*args: str) -> str:
    """`skopeo ARGS`'s stdout; fails the test with its stderr when it fails."""
    import pytest

    found = shutil.which("skopeo")
    if found is None:
        pytest.skip("skopeo is not installed")
    done = subprocess.run([found, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"skopeo {' '.join(args)}: {done.stderr}"
    return done.stdout
