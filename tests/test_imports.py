"""Importing lamina must stay cheap: a no-op rebuild is judged against ~0.1 s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_noop_rebuild_replays_without_the_build_machinery(tmp_path: Path) -> None:
    # The replay path (steps/replay.py) must not pull in planning, the sandbox,
    # thread pools or the output writers: each costs a no-op rebuild milliseconds.
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY f /f\n")
    (ctx / "f").write_text("x\n")
    build = (
        "import lamina.api, sys; "
        f"lamina.api.build({str(ctx)!r}, cache_dir={str(tmp_path / 'cache')!r}, tags=['t:1'], environ={{}}); "
        "print(' '.join(sorted(sys.modules)))"
    )
    first = subprocess.run([sys.executable, "-c", build], check=True, capture_output=True, text=True)
    assert "lamina.engine.plan" in first.stdout.split()  # the first build plans
    again = set(
        subprocess.run(
            [sys.executable, "-c", build], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    heavy = {
        "lamina.engine.plan",
        "lamina.engine.sandbox.runner",
        "concurrent.futures",
        "lamina.engine.output",
        "shutil",
        "subprocess",  # the isolation probe's, run only for a RUN
        "lamina.engine.outputspec",  # no -o given
        "lamina.engine.sourcepolicy",  # no policy set
        "lamina.engine.dockerfile.parser",  # the memo is keyed by the Dockerfile's bytes
        "lamina.engine.dockerfile.checkrules",  # the build checks found nothing
        "lamina.engine.sandbox.isolation",  # no --isolation, no $LAMINA_ISOLATION
        "lamina.engine.cdi",  # no $LAMINA_CDI_SPEC_DIRS
    }
    assert not again & heavy, sorted(again & heavy)
