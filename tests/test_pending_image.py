"""A `lamina build -t` image is pending: its new layers stay uncompressed until something reads it.

cache.store "Pending images": the build stores the layers it made as uncompressed tars and
the image ID (config) as final; the first reader of the image (save, push, `lamina images`,
run, a later FROM) compresses them once and writes the manifest an eager build writes. Every
digest a user sees must be the eager build's: each test builds the same context with
laziness off (`lazy_image=False`, the API's default) in a second cache and compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lamina import api
from lamina.cache.store import Store
from lamina.oci.digest import Digest
from tests.support.build import BASE, build, make_cache, run_cli, write_context
from tests.support.plainuser import plain_user_missing

pytestmark = pytest.mark.sandbox

DOCKERFILE = f"""\
FROM {BASE}
RUN seq 1 40000 > /numbers && echo made > /note
COPY hello.txt /hello.txt
"""
EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}  # the same config (image ID) in both caches
NAME = "docker.io/library/pending:1"


def _blobs(cache: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (cache / "blobs" / "sha256").iterdir() if not p.name.startswith(".")}


def _layers(cache: Path, manifest: Digest) -> list[str]:
    from lamina.cache.images import manifest_image

    with Store(cache) as store:
        return [str(layer.digest) for layer in manifest_image(store, manifest).layers]


def _verify_clean(cache: Path) -> None:
    report = api.cache_verify(cache_dir=cache)
    assert report.clean, [str(p) for p in report.problems]


@pytest.fixture
def built(tmp_path: Path, busybox_image: Path) -> dict[str, object]:
    """The same image built eagerly (cache `eager`) and lazily (cache `lazy`)."""
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, {"hello.txt": "hello\n"})
    eager_cache = make_cache(tmp_path / "eager", busybox_image)
    eager = build(eager_cache, ctx, tags=["pending:1"], build_args=EPOCH)
    lazy_cache = make_cache(tmp_path / "lazy", busybox_image)
    lazy = build(lazy_cache, ctx, tags=["pending:1"], build_args=EPOCH, lazy_image=True)
    new_layers = _layers(eager_cache, Digest.parse(eager.image_digest))[-2:]  # the RUN's and the COPY's
    return {"ctx": ctx, "eager": eager, "lazy": lazy, "eager_cache": eager_cache,
            "lazy_cache": lazy_cache, "new_layers": new_layers}  # fmt: skip


def test_the_build_makes_no_compressed_blob_and_names_only_the_image_id(built: dict[str, object]) -> None:
    eager, lazy, cache = built["eager"], built["lazy"], built["lazy_cache"]
    assert isinstance(cache, Path)
    assert lazy.config_digest == eager.config_digest  # type: ignore[attr-defined]
    assert lazy.image_digest == "" and lazy.pending  # type: ignore[attr-defined]
    assert not set(built["new_layers"]) & _blobs(cache)  # type: ignore[arg-type]
    _verify_clean(cache)  # a pending image is a whole image as it stands
    with Store(cache) as store:
        assert store.lookup(NAME).manifest == Digest.parse(lazy.pending)  # type: ignore[attr-defined]


def test_the_first_reader_makes_the_eager_manifest_once(built: dict[str, object]) -> None:
    eager, cache = built["eager"], built["lazy_cache"]
    assert isinstance(cache, Path)
    with Store(cache) as store:
        record = store.resolve(NAME)
    assert str(record.manifest) == eager.image_digest  # type: ignore[attr-defined]
    assert set(built["new_layers"]) <= _blobs(cache)  # type: ignore[arg-type]
    made = _blobs(cache)
    listed = {r.name: r for r in api.images(cache_dir=cache)}
    with Store(built["eager_cache"]) as store:  # type: ignore[arg-type]
        assert listed[NAME] == store.resolve(NAME)  # same digest and size as the eager build's
    assert _blobs(cache) == made  # nothing compressed twice
    _verify_clean(cache)


def test_zstd_too_and_each_compression_its_own(tmp_path: Path, busybox_image: Path) -> None:
    """The same tars pending under two compressions (one cache) make two images, each its own."""
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, {"hello.txt": "hello\n"})
    eager = {}
    for compression in ("zstd", "gzip"):
        cache = make_cache(tmp_path / f"eager-{compression}", busybox_image)
        result = build(cache, ctx, tags=["pending:1"], build_args=EPOCH, compression=compression)
        eager[compression] = result.image_digest
    cache = make_cache(tmp_path / "lazy", busybox_image)
    for compression in ("zstd", "gzip"):
        tag = f"{compression}:1"
        result = build(cache, ctx, tags=[tag], build_args=EPOCH, compression=compression, lazy_image=True)
        assert result.pending
    with Store(cache) as store:
        for compression in ("zstd", "gzip"):
            made = store.resolve(f"docker.io/library/{compression}:1").manifest
            assert str(made) == eager[compression], compression


def test_save_writes_the_eager_archive(built: dict[str, object], tmp_path: Path) -> None:
    for kind in ("eager", "lazy"):
        cache = built[f"{kind}_cache"]
        api.save(NAME, tmp_path / f"{kind}.tar", cache_dir=cache)  # type: ignore[arg-type]
        api.save(NAME, tmp_path / f"{kind}-docker.tar", format="docker", cache_dir=cache)  # type: ignore[arg-type]
    assert (tmp_path / "lazy.tar").read_bytes() == (tmp_path / "eager.tar").read_bytes()
    assert (tmp_path / "lazy-docker.tar").read_bytes() == (tmp_path / "eager-docker.tar").read_bytes()


def test_a_no_op_rebuild_stays_pending_until_read_then_names_the_manifest(built: dict[str, object]) -> None:
    ctx, cache, eager = built["ctx"], built["lazy_cache"], built["eager"]
    assert isinstance(cache, Path) and isinstance(ctx, Path)
    again = build(cache, ctx, tags=["pending:1"], build_args=EPOCH, lazy_image=True)
    assert all(step.cached for step in again.steps)
    assert again.image_digest == "" and again.pending
    assert not set(built["new_layers"]) & _blobs(cache)  # type: ignore[arg-type]
    eager_api = build(cache, ctx, tags=["pending:1"], build_args=EPOCH)  # the API's default: made now
    assert eager_api.image_digest == eager.image_digest  # type: ignore[attr-defined]
    last = build(cache, ctx, tags=["pending:1"], build_args=EPOCH, lazy_image=True)
    assert last.image_digest == eager.image_digest and not last.pending  # type: ignore[attr-defined]


def test_a_later_build_from_the_pending_image_and_prune(built: dict[str, object], tmp_path: Path) -> None:
    cache, eager = built["lazy_cache"], built["eager"]
    assert isinstance(cache, Path)
    api.cache_prune(all=True, cache_dir=cache)  # a pending image's tars are kept: it is named
    ctx = write_context(tmp_path / "child", "FROM pending:1\nRUN cat /note /hello.txt > /both\n")
    child = build(cache, ctx, tags=["child:1"], lazy_image=True)
    assert child.pending and not any(step.cached for step in child.steps if "RUN" in step.instruction)
    with Store(cache) as store:
        assert str(store.lookup(NAME).manifest) == eager.image_digest  # type: ignore[attr-defined]
    _verify_clean(cache)


def test_once_made_a_prune_drops_the_tars_and_a_rebuild_compresses_nothing(built: dict[str, object]) -> None:
    ctx, cache, eager = built["ctx"], built["lazy_cache"], built["eager"]
    assert isinstance(cache, Path) and isinstance(ctx, Path)
    with Store(cache) as store:
        tars = [str(d) for d in _tar_layers(store, Digest.parse(built["lazy"].pending))]  # type: ignore[attr-defined]
        store.resolve(NAME)
    assert set(tars) <= _blobs(cache)
    api.cache_prune(cache_dir=cache)  # nothing names the pending manifest now: its tars go
    assert not set(tars) & _blobs(cache)
    _verify_clean(cache)
    made = _blobs(cache)
    again = build(cache, ctx, tags=["pending:1"], build_args=EPOCH, lazy_image=True)
    assert all(step.cached for step in again.steps)
    # the blobs made are remembered by layer: the image is whole at once, nothing written again
    assert again.image_digest == eager.image_digest and not again.pending  # type: ignore[attr-defined]
    assert _blobs(cache) == made


def _tar_layers(store: Store, manifest: Digest) -> list[Digest]:
    from lamina.cache.images import manifest_image

    return [
        layer.digest for layer in manifest_image(store, manifest).layers if layer.media_type.endswith(".tar")
    ]


def test_run_reads_a_pending_image(built: dict[str, object], tmp_path: Path) -> None:
    cache = built["lazy_cache"]
    with open(tmp_path / "out", "wb") as out:
        code = api.run("pending:1", ["cat", "/note"], cache_dir=cache, stdout=out)  # type: ignore[arg-type]
    assert code == 0 and (tmp_path / "out").read_bytes() == b"made\n"


def test_push_sends_the_eager_manifest(built: dict[str, object], registry: object) -> None:
    host = registry.host  # type: ignore[attr-defined]
    pushed = api.push(NAME, f"{host}/pending:1", insecure_registries=[host], cache_dir=built["lazy_cache"])  # type: ignore[arg-type]
    assert str(pushed.digest) == built["eager"].image_digest  # type: ignore[attr-defined]


def _materialise_in(cache: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    code = (
        "import sys; from lamina.cache.store import Store\n"
        "with Store(sys.argv[1]) as s: print(s.resolve(sys.argv[2]).manifest)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(cache), NAME],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_two_processes_making_it_at_once_agree(built: dict[str, object]) -> None:
    cache = built["lazy_cache"]
    assert isinstance(cache, Path)
    procs = [_materialise_in(cache) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [built["eager"].image_digest] * 2  # type: ignore[attr-defined]
    _verify_clean(cache)


@pytest.mark.parametrize("point", ["blob-commit:2", "pending-made:1"])
def test_killed_while_making_it_leaves_a_store_that_verifies(built: dict[str, object], point: str) -> None:
    cache = built["lazy_cache"]
    assert isinstance(cache, Path)
    proc = _materialise_in(cache, {"LAMINA_TEST_CRASH_AT": point})
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    found = api.cache_verify(cache_dir=cache)  # at most a torn temporary, as any killed write leaves
    assert all(p.repairable and ".tmp-" in p.where for p in found.problems), found.problems
    api.cache_verify(repair=True, cache_dir=cache)
    _verify_clean(cache)
    with Store(cache) as store:
        assert store.lookup(NAME).manifest == Digest.parse(built["lazy"].pending)  # type: ignore[attr-defined]
        assert str(store.resolve(NAME).manifest) == built["eager"].image_digest  # type: ignore[attr-defined]
    _verify_clean(cache)


def test_the_cli_says_the_manifest_is_made_on_first_use(tmp_path: Path, busybox_image: Path) -> None:
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, {"hello.txt": "hello\n"})
    cache = make_cache(tmp_path / "c", busybox_image)
    proc = run_cli("build", "-t", "pending:1", "--progress", "plain", str(ctx), cache=cache)
    with Store(cache) as store:
        config = store.lookup(NAME)
    assert "(manifest made on first use)" in proc.stderr, proc.stderr
    assert config.manifest.hex not in proc.stderr  # the pending manifest is nobody's business
    listed = run_cli("images", cache=cache).stdout
    with Store(cache) as store:
        assert store.lookup(NAME).manifest.short in listed or str(store.lookup(NAME).manifest) in listed


@pytest.mark.skipif(bool(plain_user_missing(ranged=True)), reason=plain_user_missing(ranged=True) or "ready")
def test_rootless_the_first_reader_makes_the_eager_manifest(busybox_image: Path) -> None:
    """Rootless, the tars are written by the sandbox's helper (files of subordinate ids), and
    the first reader compresses them outside any namespace: still the eager build's bytes."""
    import json
    import shutil
    import tarfile

    from tests.support.plainuser import plain_user

    dockerfile = DOCKERFILE.replace("> /note", "> /note && chown 1000:1000 /note")
    with plain_user("lamina-pending-", ranged=True) as user:
        ctx = write_context(user.base / "ctx", dockerfile, {"hello.txt": "hello\n"})
        shutil.copy(busybox_image, user.base / "base.tar")
        user.give()
        digests = {}
        for kind in ("lazy", "eager"):
            env = {"LAMINA_CACHE": str(user.base / kind), **EPOCH}
            assert user.lamina("load", str(user.base / "base.tar"), env=env).returncode == 0
            meta = ["--metadata-file", str(user.base / "meta.json")] if kind == "eager" else []
            done = user.lamina("build", "--progress", "plain", *meta, "-t", "pending:1", str(ctx), env=env)
            assert done.returncode == 0, done.stderr
            assert ("(manifest made on first use)" in done.stderr) == (kind == "lazy"), done.stderr
            saved = user.base / f"{kind}.tar"
            done = user.lamina("save", "pending:1", "-o", str(saved), env=env)
            assert done.returncode == 0, done.stderr
            with tarfile.open(saved) as tar:
                index = tar.extractfile("index.json")
                assert index is not None
                digests[kind] = json.loads(index.read())["manifests"][0]["digest"]
        assert digests["lazy"] == digests["eager"]
        assert digests["eager"] == json.loads((user.base / "meta.json").read_text())["containerimage.digest"]
        assert (user.base / "lazy.tar").read_bytes() == (user.base / "eager.tar").read_bytes()


def test_a_multi_platform_image_is_made_at_once(tmp_path: Path, busybox_image: Path) -> None:
    """Its index names each platform's manifest, so laziness is refused: the result names it."""
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY hello.txt /hello.txt\n", {"hello.txt": "hi\n"})
    cache = make_cache(tmp_path / "c", busybox_image)
    platforms = ["linux/amd64", "linux/arm64"]
    result = build(cache, ctx, tags=["multi:1"], platforms=platforms, lazy_image=True)
    assert result.index and result.image_digest and not result.pending
    from lamina.cache.images import manifest_image
    from lamina.oci.image import MAX_DOCUMENT, Index

    with Store(cache) as store:
        top = store.lookup("docker.io/library/multi:1").manifest
        assert str(top) == result.image_digest
        entries = Index.from_bytes(store.read_blob(top, MAX_DOCUMENT)).manifests
        layers = [layer for e in entries for layer in manifest_image(store, e.digest).layers]
    assert len(layers) == 2 and all(layer.media_type.endswith("+gzip") for layer in layers)
