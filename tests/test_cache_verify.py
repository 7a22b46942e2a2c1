"""`lamina cache verify [--repair]`: a clean store says clean; each kind of damage a crash or a
bad disk leaves is named in one line, and --repair removes it without losing anything intact
that is still referenced (the image stays named, the next build is fully cached)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from lamina.cache.store import Store
from lamina.cache.verify import VerifyReport, verify
from lamina.oci.digest import Digest
from tests.support.build import BASE, build, cached_steps, make_cache, run_cli, write_context

pytestmark = pytest.mark.sandbox  # rootless too: torn dirs of subordinate ids need the sandbox's remover

DOCKERFILE = f"""FROM {BASE} AS b
RUN echo built > /a
FROM {BASE}
COPY --from=b /a /a
RUN echo x > /x
"""


@pytest.fixture
def built(tmp_path: Path, busybox_image: Path) -> tuple[Path, Path]:
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", DOCKERFILE)
    build(cache, ctx, tags=["app:1"], outputs=[f"type=oci,dest={tmp_path / 'out.tar'}"])
    return cache, ctx


def check(cache: Path, repair: bool = False) -> VerifyReport:
    from lamina.engine.sandbox import remove_tree

    with Store(cache) as store:
        return verify(store, repair=repair, remove_tree=remove_tree)


def test_a_built_cache_is_clean(built: tuple[Path, Path]) -> None:
    report = check(built[0])
    assert report.clean, report.problems
    assert report.blobs > 0 and report.images == 2 and report.entries > 0 and report.unpacked > 0
    assert report.torn_judged


def _torn_blob(cache: Path) -> Path:
    path = cache / "blobs/sha256/.tmp-killed"
    path.write_bytes(b"half a layer")
    return path


def _torn_upper(cache: Path) -> Path:
    path = cache / "unpacked/.tmp-killed"
    (path / "etc").mkdir(parents=True)
    (path / "etc/half").write_text("x")
    return path


def _scratch(cache: Path) -> Path:
    path = cache / "tmp/secret-scratch"
    path.mkdir(parents=True)
    (path / "f").write_text("x")
    return path


def _half_saved(cache: Path) -> Path:
    path = cache / ".tmp-save-killed"
    path.mkdir()
    return path


def _half_failure(cache: Path) -> Path:
    path = cache / "failures/0123456789ab"
    (path / "upper").mkdir(parents=True)
    return path


def _torn_dirkeys(cache: Path) -> Path:
    path = cache / "dirkeys/.tmp-dirkeys-killed"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"half")
    return path


def _torn_copy_spool(cache: Path) -> Path:
    path = cache / "copies/.tmp-copy-killed"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"half")
    return path


def _stray_blob(cache: Path) -> Path:
    path = cache / "blobs/sha256/not-a-digest"
    path.write_text("x")
    return path


@pytest.mark.parametrize(
    "damage",
    [
        _torn_blob,
        _torn_upper,
        _scratch,
        _half_saved,
        _half_failure,
        _stray_blob,
        _torn_dirkeys,
        _torn_copy_spool,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_what_a_killed_process_leaves_is_named_and_repaired(
    built: tuple[Path, Path], damage: Callable[[Path], Path]
) -> None:
    cache, ctx = built
    path = damage(cache)
    report = check(cache)
    where = str(path.relative_to(cache))
    assert [p.where for p in report.problems] == [where]
    assert all(p.repairable for p in report.problems)
    repaired = check(cache, repair=True)
    assert [p.where for p in repaired.repaired] == [where] and repaired.clean
    assert not os.path.lexists(path)
    assert check(cache).clean
    assert all(cached_steps(build(cache, ctx)))  # nothing the build uses was removed


def test_corrupt_blob_of_a_named_image_is_removed_and_the_image_reported(built: tuple[Path, Path]) -> None:
    cache, _ = built
    with Store(cache) as store:
        from lamina.cache.images import stored_image

        _, image = stored_image(store, "docker.io/library/app:1")
        layer = image.layers[-1].digest
        path = store.blob_path(layer)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes() + b"rot")
    report = check(cache)
    lines = [str(p) for p in report.problems]
    assert any(line.startswith(f"blobs/sha256/{layer.hex}: corrupt: the bytes hash to") for line in lines), (
        lines
    )
    assert any(line.startswith("image docker.io/library/app:1: layer ") for line in lines), lines
    repaired = check(cache, repair=True)
    assert not path.exists()
    # The name stays (repair never drops a name): it is reported until the image is made again.
    assert [str(p) for p in repaired.problems] == [
        f"image docker.io/library/app:1: layer {layer} is corrupt (removed): "
        "load, pull or build the image again"
    ]
    with Store(cache) as store:
        assert store.resolve("docker.io/library/app:1").manifest == image.manifest.digest


def test_a_cache_entry_whose_layer_dir_is_gone_is_dropped(built: tuple[Path, Path], tmp_path: Path) -> None:
    cache, ctx = built
    with Store(cache) as store:
        row = store.db.execute(
            "SELECT key, json_extract(result, '$.layer') FROM cache WHERE key LIKE 'sha256:%' "
            "AND json_extract(result, '$.layer') IS NOT NULL LIMIT 1"
        ).fetchone()
    key, layer = row
    os.rename(cache / "unpacked" / layer, tmp_path / "moved")  # as a crash between two renames would
    report = check(cache)
    assert any(p.where == f"cache entry {key}" and f"unpacked/{layer}" in p.what for p in report.problems)
    assert check(cache, repair=True).clean
    with Store(cache) as store:
        assert store.cache_get(key) is None
    # The same build replays its finished image (its blobs are whole); a build that needs the
    # steps' entries (a new label misses the build memo) runs the step whose layer went again.
    assert all(cached_steps(build(cache, ctx)))
    result = build(cache, ctx, labels={"rebuilt": "yes"})
    assert not all(cached_steps(result))  # the step whose layer went ran again
    assert check(cache).clean


def test_a_layer_record_that_lies_about_its_diff_id_is_dropped(built: tuple[Path, Path]) -> None:
    cache, _ = built
    with Store(cache) as store:
        blob, diff_id = store.db.execute("SELECT blob, diff_id FROM layers LIMIT 1").fetchone()
        store.db.execute("UPDATE layers SET diff_id = ? WHERE blob = ?", ("sha256:" + "0" * 64, blob))
    report = check(cache)
    assert [str(p) for p in report.problems] == [
        f"blobs/sha256/{blob.split(':')[1]}: layer record: diff_id sha256:{'0' * 64}, "
        f"the tar hashes to {diff_id}"
    ]
    assert check(cache, repair=True).clean
    with Store(cache) as store:
        assert store.has_blob(Digest.parse(blob))  # the bytes are right: the blob stays
        assert store.layer(Digest.parse(blob)) is None


def test_while_another_process_has_the_store_temporaries_are_not_judged(built: tuple[Path, Path]) -> None:
    cache, _ = built
    _torn_blob(cache)  # could be a write in flight
    with Store(cache):  # another process's build, as far as the lock can tell
        proc = run_cli("cache", "verify", cache=cache, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "temporary files not judged" in proc.stdout
        proc = run_cli("cache", "verify", "--repair", cache=cache, check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].endswith("another lamina process is using the store")
    proc = run_cli("cache", "verify", cache=cache, check=False)
    assert proc.returncode == 1 and "blobs/sha256/.tmp-killed: a blob torn by a killed process" in proc.stdout


def test_cli_exit_code_and_lines(built: tuple[Path, Path]) -> None:
    cache, _ = built
    proc = run_cli("cache", "verify", cache=cache)
    assert proc.stdout.strip().endswith("; clean")
    _torn_upper(cache)
    proc = run_cli("cache", "verify", cache=cache, check=False)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0].startswith("problem: unpacked/.tmp-killed: ")
    proc = run_cli("cache", "verify", "--repair", cache=cache)
    assert proc.stdout.splitlines()[0].startswith("repaired: unpacked/.tmp-killed: ")
    assert proc.stdout.strip().endswith("repaired 1, now clean")


def test_prune_clears_the_step_locks_and_the_cache_stays_usable(built: tuple[Path, Path]) -> None:
    cache, ctx = built
    assert any((cache / "locks").iterdir())  # one per step key built
    run_cli("cache", "prune", cache=cache)
    assert not any((cache / "locks").iterdir())  # they only grew before
    assert all(cached_steps(build(cache, ctx)))
    assert check(cache).clean
