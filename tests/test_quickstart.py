"""The README's first command ends in examples/quickstart.sh: it must keep working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lamina.engine.sandbox.idmap import IdMode, detect_ids

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.sandbox
def test_quickstart_builds_base_and_multistage_example_and_runs_it(tmp_path: Path) -> None:
    if not Path("/bin/busybox").exists():
        pytest.skip("needs Debian's busybox-static (/bin/busybox)")
    lamina = shutil.which("lamina", path=str(Path(sys.executable).parent))
    assert lamina, "the lamina command is installed beside the interpreter"
    env = {**os.environ, "LAMINA_CACHE": str(tmp_path / "cache"), "LAMINA": lamina}
    out = subprocess.run(
        [ROOT / "examples" / "quickstart.sh"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (tmp_path / "hello.tar").stat().st_size > 0, out.stderr[-2000:]
    if detect_ids().mode is IdMode.SINGLE:
        # Only the caller's id is mapped (no /etc/subuid range): the example's
        # `USER app` cannot run, and lamina must say so in one clear line.
        assert out.returncode != 0
        assert "user 'app' (uid 1000, gid 1000) is not mapped" in out.stderr
        return
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hello from lamina 1.0.0, world" in out.stdout
