"""Importing lamina must stay cheap: a no-op rebuild is judged against ~0.1 s."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("httpx", "rich", "zstandard", "isal", "sqlite3")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_import_cli_loads_no_heavy_module() -> None:
    loaded = _modules_after("import lamina.cli")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_import_lamina_reads_nothing_heavy() -> None:
    loaded = _modules_after("import lamina")
    assert "lamina.api" not in loaded
    assert not loaded & set(HEAVY)


def test_help_runs_without_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "lamina", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "Usage:" in out.stdout
