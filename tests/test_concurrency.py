"""Several lamina processes on one cache at once (4 builds, prunes, a load and a save) never
corrupt it and never deadlock (every process ends within a timeout), and identical builds give
identical digests, the same as one build alone."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from lamina.oci.validate import validate_image
from tests.support.build import BASE, run_cli, start_cli, write_context

pytestmark = pytest.mark.sandbox

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}
TIMEOUT_S = 300  # far above a build's seconds: only a deadlock gets near it
SHARED = f"""FROM {BASE} AS b
RUN echo built > /a && sleep 0.2
COPY f /f
FROM {BASE}
COPY --from=b /a /a
RUN echo done > /done
"""
OTHER = f"""FROM {BASE}
RUN echo other > /o && sleep 0.2
COPY f /f
"""


def _start(cache: Path, *args: str) -> subprocess.Popen[str]:
    return start_cli(*args, cache=cache, env=EPOCH)


def _finish(proc: subprocess.Popen[str], what: str) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{what}: still running after {TIMEOUT_S}s (deadlock?)\n{err}") from None
    assert "Traceback" not in err, f"{what}:\n{err}"
    return proc.returncode, out, err


def test_four_builds_prunes_a_load_and_a_save_at_once(tmp_path: Path, busybox_image: Path) -> None:
    cache = tmp_path / "cache"
    run_cli("load", "-q", str(busybox_image), cache=cache)
    shared = write_context(tmp_path / "shared", SHARED, {"f": "shared\n"})
    other = write_context(tmp_path / "other", OTHER, {"f": "other\n"})
    third = write_context(tmp_path / "third", OTHER, {"f": "third\n"})

    builds = {
        "shared-1": _start(cache, "build", "-q", "-t", "shared:1", str(shared)),
        "shared-2": _start(cache, "build", "-q", "-t", "shared:2", str(shared)),
        "other": _start(
            cache, "build", "-q", "-t", "other:1", "-o", f"type=oci,dest={tmp_path / 'o.tar'}", str(other)
        ),
        "third": _start(cache, "build", "-q", "-t", "third:1", str(third)),
    }
    side = {
        "load": _start(cache, "load", "-q", "-t", "again/busybox:1", str(busybox_image)),
        "save": _start(cache, "save", "-o", str(tmp_path / "saved.tar"), BASE),
    }
    # Prunes, one after another, all the while the builds run: each either runs alone or
    # says in one line that another process has the store.
    prunes = busy = 0
    while any(p.poll() is None for p in builds.values()):
        code, _, err = _finish(_start(cache, "cache", "prune"), "prune")
        prunes += 1
        if code != 0:
            busy += 1
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "another lamina process is using the store" in lines[0], err
        time.sleep(0.05)

    digests = {}
    for name, proc in builds.items():
        code, out, err = _finish(proc, name)
        assert code == 0, f"{name}:\n{err}"
        digests[name] = out.strip().splitlines()[-1]
    for name, proc in side.items():
        code, _, err = _finish(proc, name)
        assert code == 0, f"{name}:\n{err}"
    assert prunes >= 1
    print(f"\n{prunes} prunes during the builds, {busy} found the store busy")

    assert digests["shared-1"] == digests["shared-2"]
    assert len({digests["shared-1"], digests["other"], digests["third"]}) == 3
    validate_image(tmp_path / "o.tar")
    validate_image(tmp_path / "saved.tar")

    check = run_cli("cache", "verify", cache=cache)
    assert check.stdout.strip().endswith("; clean"), check.stdout
    # The same builds alone, in a cache of their own, give the same digests.
    alone = tmp_path / "alone"
    run_cli("load", "-q", str(busybox_image), cache=alone)
    for name, ctx in (("shared-1", shared), ("other", other), ("third", third)):
        proc = run_cli("build", "-q", str(ctx), cache=alone, env=EPOCH)
        assert proc.stdout.strip().splitlines()[-1] == digests[name], name
    # and again in the shared cache, now from its cache.
    proc = run_cli("build", "-q", str(shared), cache=cache, env=EPOCH)
    assert proc.stdout.strip().splitlines()[-1] == digests["shared-1"]
    images = run_cli("images", cache=cache).stdout
    for name in ("shared:1", "shared:2", "other:1", "third:1", "again/busybox:1"):
        assert name.split(":")[0] in images, images
