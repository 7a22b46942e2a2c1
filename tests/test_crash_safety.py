"""A build SIGKILLed at any moment leaves a cache that `lamina cache verify` reports clean or
repairs, and the next build succeeds, reuses every step that was complete, and gives the
digest of a build that was never killed.

How the moments are picked (seeded: LAMINA_CRASH_SEED, default 16; LAMINA_CRASH_RUNS runs,
default 25, more in a dedicated run):
- most runs kill at a named moment, through the store's test-only crash hook
  (LAMINA_TEST_CRASH_AT=POINT:N, lamina/cache/store.py): a layer blob half written
  (blob-write), written and fsynced but not yet named (blob-commit), a layer dir about to
  be named (unpack-publish), a cache result inside its transaction (cache-put), the image
  name (tag), and, with a delay, while the RUN that follows a new upper dir runs
  (unpack-dir:N:SECONDS). A first build counts how often each moment comes
  (LAMINA_TEST_CRASH_LOG), and N is drawn from that count: every such run is killed, at a
  moment that depends only on the seed, not on the machine's speed.
- the rest kill from outside after a seeded delay within the length of a cold build:
  moments no hook names (the export writing the -o archive, Python between two writes).
  Those depend on timing; the assertions do not (any moment must be safe).
Each run starts from a copy of a cache holding only the base image, so every build is cold.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lamina.cache.store import Store
from lamina.engine.model import BuildResult
from tests.support.build import BASE, run_cli, start_cli, write_context

pytestmark = pytest.mark.sandbox

# tests/test_unprivileged.py runs this again as two users (with and without subordinate
# ids, where torn dirs hold files only the sandbox's remover can delete): 10 runs each there.
RUNS = int(os.environ.get("LAMINA_CRASH_RUNS", "25" if os.geteuid() == 0 else "10"))
SEED = int(os.environ.get("LAMINA_CRASH_SEED", "16"))
EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}
DOCKERFILE = f"""FROM {BASE} AS b
RUN echo built > /a && sleep 0.3
COPY f /f
FROM {BASE}
COPY --from=b /a /a
COPY --from=b /f /f
RUN sleep 0.3 && echo x > /x
"""
HOOKED = ("blob-write", "blob-commit", "unpack-publish", "cache-put", "tag", "unpack-dir")


def _build_args(ctx: Path, out: Path) -> list[str]:
    return ["build", "-q", "-t", "app:1", "-o", f"type=oci,dest={out}", str(ctx)]


def _cli(cache: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    # a session of its own: the build's sandbox processes share it
    return start_cli(*args, cache=cache, env={**EPOCH, **env}, start_new_session=True)


def _session_gone(sid: int, timeout: float = 10.0) -> bool:
    """True once no process of session `sid` (the build and its sandbox helpers) is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                alive.append(pid)
        if not alive:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> dict[str, object]:
    """A template cache with the base image, the context, the digest of a never-killed build,
    how long a cold build takes and how often each crash point comes in one."""
    root = tmp_path_factory.mktemp("crash")
    template = root / "template"
    run_cli("load", "-q", str(busybox_image), cache=template)
    ctx = write_context(root / "ctx", DOCKERFILE, {"f": "the context's file\n"})
    counts: dict[str, int] = {}
    clean = root / "clean"
    shutil.copytree(template, clean, symlinks=True)
    log = root / "points.log"
    started = time.monotonic()
    proc = _cli(clean, _build_args(ctx, root / "clean.tar"), {"LAMINA_TEST_CRASH_LOG": str(log)})
    out, err = proc.communicate(timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, err
    for name in log.read_text().split():
        counts[name] = counts.get(name, 0) + 1
    assert set(HOOKED) <= set(counts), counts
    with Store(clean) as store:
        manifest = str(store.resolve("docker.io/library/app:1").manifest)
    return {
        "root": root,
        "template": template,
        "ctx": ctx,
        "image_id": out.strip().splitlines()[-1],  # -q prints the config digest, as docker build
        "manifest": manifest,
        "seconds": seconds,
        "counts": counts,
    }


def _plan(setup: dict[str, object]) -> list[tuple[str, dict[str, str], float | None]]:
    """(label, env, outside kill delay) per run, from the seed."""
    rng = random.Random(SEED)
    counts: dict[str, int] = setup["counts"]  # type: ignore[assignment]
    seconds: float = setup["seconds"]  # type: ignore[assignment]
    runs = []
    for i in range(RUNS):
        if i % 5 == 4:  # one run in five: a kill from outside, at any moment
            delay = rng.uniform(0.05, seconds)
            runs.append((f"outside after {delay:.2f}s", {}, delay))
            continue
        point = HOOKED[i % len(HOOKED)] if i < len(HOOKED) else rng.choice(HOOKED)
        nth = rng.randint(1, counts[point])
        spec = f"{point}:{nth}"
        if point == "unpack-dir":
            spec += f":{rng.uniform(0.0, 0.25):.3f}"  # the step's RUN (sleep 0.3) is running
        runs.append((spec, {"LAMINA_TEST_CRASH_AT": spec}, None))
    return runs


def _step_keys_present(cache: Path) -> set[str]:
    """The step results in the index whose layer (if any) is there: what a rebuild must reuse."""
    with Store(cache) as store:
        rows = store.db.execute(
            "SELECT key, json_extract(result, '$.layer') FROM cache WHERE key LIKE 'sha256:%'"
        ).fetchall()
    return {key for key, layer in rows if layer is None or (cache / "unpacked" / layer).is_dir()}


def test_killed_builds_leave_a_cache_that_verifies_and_rebuilds_identically(setup: dict[str, object]) -> None:
    from lamina.oci.validate import validate_image

    root: Path = setup["root"]  # type: ignore[assignment]
    ctx: Path = setup["ctx"]  # type: ignore[assignment]
    killed = repaired = 0
    for i, (label, env, delay) in enumerate(_plan(setup)):
        where = f"run {i} ({label}, seed {SEED})"
        cache = root / f"run{i}"
        shutil.copytree(setup["template"], cache, symlinks=True)  # type: ignore[arg-type]
        out = root / f"run{i}.tar"
        proc = _cli(cache, _build_args(ctx, out), env)
        if delay is not None:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        if delay is None:
            assert proc.returncode == -signal.SIGKILL, f"{where}: not killed: {err}"
        killed += proc.returncode == -signal.SIGKILL
        assert _session_gone(proc.pid), f"{where}: the build's sandbox processes outlived it"
        # The output is never half-written under its name: absent, or a whole valid archive.
        if out.exists():
            validate_image(out)

        check = run_cli("cache", "verify", cache=cache, check=False)
        if check.returncode != 0:
            assert "problem:" in check.stdout and "Traceback" not in check.stderr, f"{where}: {check.stderr}"
            unfixable = [line for line in check.stdout.splitlines() if line.startswith("problem:")]
            assert all(line.endswith("(--repair fixes it)") for line in unfixable), (
                f"{where}:\n{check.stdout}"
            )
            run_cli("cache", "verify", "--repair", cache=cache)
            repaired += 1
            assert run_cli("cache", "verify", cache=cache).stdout.strip().endswith("; clean"), where

        complete = _step_keys_present(cache)
        result = _rebuild(cache, ctx)
        assert result.config_digest == setup["image_id"], f"{where}: the rebuild's image ID differs"
        assert result.image_digest == setup["manifest"], f"{where}: the rebuild's digest differs"
        for step in result.steps:
            if step.key in complete:
                assert step.cached, f"{where}: {step.stage} step {step.index} was complete but ran again"
        assert run_cli("cache", "verify", cache=cache).stdout.strip().endswith("; clean"), where
        shutil.rmtree(cache, ignore_errors=True)
    print(f"\n{RUNS} runs (seed {SEED}): {killed} killed, {repaired} needed --repair")
    assert killed >= RUNS - RUNS // 5  # every hooked run, at least


def _rebuild(cache: Path, ctx: Path) -> BuildResult:
    from lamina import api

    env = {**os.environ, **EPOCH}
    return api.build(ctx, cache_dir=cache, environ=env, tags=["app:1"])


def test_killed_load_and_save_leave_a_cache_that_verifies(
    setup: dict[str, object], busybox_image: Path
) -> None:
    """`lamina load` killed while it writes a blob or names it, and `lamina save` killed at a
    seeded moment: the cache verifies (after --repair), the load again gives the same image,
    and no half archive is left under the saved name."""
    from lamina.oci.validate import validate_image

    root: Path = setup["root"]  # type: ignore[assignment]
    rng = random.Random(SEED)
    runs = 0
    for point in ("blob-write", "blob-commit", "tag"):
        cache = root / f"load-{point}"
        proc = _cli(cache, ["load", "-q", str(busybox_image)], {"LAMINA_TEST_CRASH_AT": f"{point}:1"})
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"load ({point}) was not killed: {err}"
        if run_cli("cache", "verify", cache=cache, check=False).returncode != 0:
            run_cli("cache", "verify", "--repair", cache=cache)
        run_cli("load", "-q", str(busybox_image), cache=cache)
        assert run_cli("cache", "verify", cache=cache).stdout.strip().endswith("; clean")
        runs += 1
    cache = root / "save"
    shutil.copytree(setup["template"], cache, symlinks=True)  # type: ignore[arg-type]
    for fmt in ("oci", "docker", "oci", "docker"):
        out = root / f"saved-{runs}.tar"
        proc = _cli(cache, ["save", "--format", fmt, "--compression", "zstd", "-o", str(out), BASE], {})
        try:
            proc.wait(timeout=rng.uniform(0.1, 1.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
        assert _session_gone(proc.pid)
        if out.exists():
            validate_image(out)  # whole, or not there
        if run_cli("cache", "verify", cache=cache, check=False).returncode != 0:
            run_cli("cache", "verify", "--repair", cache=cache)
        assert run_cli("cache", "verify", cache=cache).stdout.strip().endswith("; clean")
        runs += 1
    assert runs == 7
