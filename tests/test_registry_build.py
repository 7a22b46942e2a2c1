"""`lamina build` with registries: --push, --cache-to/--cache-from type=registry.

Against Debian's docker-registry on 127.0.0.1 (tests/registry_server.py).
Cache sharing is shown the way a second machine would see it: build with
--cache-to, then build again in a new, empty cache (only the base image
loaded) with --cache-from, and check from the progress events that no step
ran, and that the image digest is the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lamina.cache.remote import parse_cache_spec
from lamina.engine.progress import BuildSummary, StepEvent, StepStatus
from lamina.errors import PlanError, RegistryError
from tests import registry_server
from tests.support.build import BASE, build, make_cache, run_cli, write_context
from tests.support.registry import skopeo

needs_registry = pytest.mark.skipif(
    registry_server.REGISTRY is None, reason="docker-registry is not installed"
)
needs_skopeo = pytest.mark.skipif(registry_server.SKOPEO is None, reason="skopeo is not installed")


class Recorder:
    """A progress sink that keeps every event, output line and warning."""

    def __init__(self) -> None:
        self.events: list[StepEvent] = []
        self.lines: list[str] = []
        self.warnings: list[str] = []

    def step(self, event: StepEvent) -> None:
        self.events.append(event)

    def log(self, stage: str, index: int, line: str) -> None:
        self.lines.append(line)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def finish(self, summary: BuildSummary | None) -> None:
        pass

    def cache_warnings(self) -> list[str]:
        """Warnings about the cache (not the one-time id-map note of a user without subuids)."""
        return [w for w in self.warnings if "cache" in w]

    def ran(self) -> list[str]:
        return [e.instruction for e in self.events if e.status is StepStatus.RUNNING]


def layer_of_entry(registry: registry_server.Registry, cache_ref: str, key: str) -> Path:
    """The registry's storage file of the layer blob cached for `key`."""
    from lamina.cache.remote import entry_reference
    from lamina.oci.image import Manifest
    from lamina.oci.reference import parse_reference
    from lamina.oci.registry import RegistryClient

    with RegistryClient() as client:
        remote = client.get_manifest(entry_reference(parse_reference(cache_ref), key))
    (layer,) = Manifest.from_bytes(remote.data, "entry").layers
    hexdigest = layer.digest.hex
    return registry.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


# --- specs and early errors (no registry needed) ---------------------------------------


def test_cache_spec_forms() -> None:
    spec = parse_cache_spec("type=registry,ref=127.0.0.1:5000/team/cache:main,mode=max", "--cache-to")
    assert (str(spec.ref), spec.mode, spec.ignore_error) == ("127.0.0.1:5000/team/cache:main", "max", False)
    assert parse_cache_spec("127.0.0.1:5000/c:x", "--cache-from").mode == "min"  # bare REF
    assert parse_cache_spec("type=registry,ref=h:1/c,ignore-error=true", "--cache-to").ignore_error
    # buildx keys that do not apply are accepted, so a copied command line works
    parse_cache_spec("type=registry,ref=h:1/c,image-manifest=true,oci-mediatypes=true", "--cache-to")


@pytest.mark.parametrize(
    ("text", "flag", "message"),
    [
        ("type=local,src=/tmp/x", "--cache-to", "type=local needs dest="),
        ("type=registry", "--cache-from", "missing ref="),
        ("type=registry,ref=h:1/c,mode=max", "--cache-from", "mode must be"),
        ("type=registry,ref=h:1/c,mode=all", "--cache-to", "mode must be"),
        ("type=registry,ref=h:1/c,colour=red", "--cache-to", "unknown key 'colour'"),
        ("type=registry,ref=Bad Ref", "--cache-to", "invalid reference"),
        ("type=registry,ref=h:1/c@sha256:" + "a" * 64, "--cache-to", "not a digest"),
        ("type=registry,ref", "--cache-to", "is not key=value"),
    ],
)
def test_cache_spec_errors_name_the_flag(text: str, flag: str, message: str) -> None:
    with pytest.raises(PlanError, match=message) as err:
        parse_cache_spec(text, flag)
    assert str(err.value).startswith(f"invalid {flag} ")


def test_push_without_a_tag_fails_before_building(tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY a /a\n", {"a": "a"})
    with pytest.raises(PlanError, match="--push needs at least one -t"):
        build(tmp_path / "cache", ctx, push=True)
    assert not (tmp_path / "cache").exists()


def test_cli_bad_cache_spec_is_one_line(tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY a /a\n", {"a": "a"})
    proc = run_cli("build", "--cache-to", "type=gha", str(ctx), cache=tmp_path / "cache", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --cache-to type=gha is not supported: use type=registry or type=local"
    ]


# --- cache sharing without a sandbox (FROM scratch, COPY only) --------------------------


SCRATCH_MULTISTAGE = """\
FROM scratch AS builder
COPY src/ /src/
COPY extra.txt /src/extra.txt
FROM scratch
COPY --from=builder /src/ /app/
COPY top.txt /top.txt
LABEL stage=final
"""


def scratch_context(path: Path) -> Path:
    files = {"src/a.txt": "a\n", "src/sub/b.txt": "b\n", "extra.txt": "extra\n", "top.txt": "top\n"}
    return write_context(path, SCRATCH_MULTISTAGE, files)


@needs_registry
def test_cache_max_round_trip_into_an_empty_cache(registry: registry_server.Registry, tmp_path: Path) -> None:
    ctx = scratch_context(tmp_path / "ctx")
    ref = f"{registry.host}/cache/scratch-max:main"
    first = build(tmp_path / "a", ctx, cache_to=[f"type=registry,ref={ref},mode=max"], tags=["app:1"])
    assert first.steps_run == 4
    sink = Recorder()
    second = build(tmp_path / "b", ctx, cache_from=[f"type=registry,ref={ref}"], progress=sink)
    assert [step.cached for step in second.steps] == [True] * 4
    assert sink.ran() == [] and sink.cache_warnings() == []
    assert second.image_digest == first.image_digest


@needs_registry
def test_cache_min_exports_only_the_target_chain(registry: registry_server.Registry, tmp_path: Path) -> None:
    ctx = scratch_context(tmp_path / "ctx")
    ref = f"{registry.host}/cache/scratch-min:main"
    first = build(tmp_path / "a", ctx, cache_to=[f"type=registry,ref={ref}"])  # mode=min by default
    sink = Recorder()
    second = build(tmp_path / "b", ctx, cache_from=[f"type=registry,ref={ref}"], progress=sink)
    # The builder stage was not exported, so it runs; the target's steps come from the registry
    # (COPY --from is keyed by the files copied, which the rebuilt builder makes the same).
    by_stage = {(s.stage, s.index): s.cached for s in second.steps}
    assert by_stage == {
        ("builder", 1): False,
        ("builder", 2): False,
        ("stage-1", 1): True,
        ("stage-1", 2): True,
    }
    assert second.image_digest == first.image_digest


@needs_registry
def test_cache_from_a_registry_that_is_down_warns_once_and_builds(tmp_path: Path) -> None:
    ctx = scratch_context(tmp_path / "ctx")
    down = f"127.0.0.1:{registry_server.free_port()}/cache/x:main"
    sink = Recorder()
    result = build(tmp_path / "a", ctx, cache_from=[f"type=registry,ref={down}"], progress=sink)
    assert result.steps_run == 4
    (warning,) = sink.cache_warnings()  # once, not once per step
    assert f"--cache-from {down}" in warning and "cannot reach" in warning


@needs_registry
def test_cache_to_a_registry_that_is_down_fails_unless_ignored(tmp_path: Path) -> None:
    ctx = scratch_context(tmp_path / "ctx")
    down = f"127.0.0.1:{registry_server.free_port()}/cache/x:main"
    with pytest.raises(RegistryError, match="cannot reach"):
        build(tmp_path / "a", ctx, cache_to=[f"type=registry,ref={down}"])
    sink = Recorder()
    build(tmp_path / "a", ctx, cache_to=[f"type=registry,ref={down},ignore-error=true"], progress=sink)
    assert any("ignore-error=true" in warning for warning in sink.cache_warnings())


# --- with RUN steps (sandbox) ---------------------------------------------------------------


RUN_MULTISTAGE = f"""\
FROM {BASE} AS builder
COPY hello.txt /hello.txt
RUN echo step-ran && cat /hello.txt > /built.txt && echo built >> /built.txt
FROM {BASE}
COPY --from=builder /built.txt /app/built.txt
RUN echo step-ran && cp /app/built.txt /app/copy.txt
ENV GREETING=hi
"""


@pytest.mark.sandbox
@needs_registry
def test_cache_sharing_runs_no_run_step(
    registry: registry_server.Registry, busybox_image: Path, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", RUN_MULTISTAGE, {"hello.txt": "hello\n"})
    ref = f"{registry.host}/cache/run:main"
    first = build(
        make_cache(tmp_path / "a", busybox_image), ctx, cache_to=[f"type=registry,ref={ref},mode=max"]
    )
    assert first.steps_run == 4
    # A second machine: a new cache holding only the base image.
    sink = Recorder()
    cache = make_cache(tmp_path / "b", busybox_image)
    out = tmp_path / "out"
    second = build(
        cache, ctx, cache_from=[f"type=registry,ref={ref}"], progress=sink, outputs=[f"type=local,dest={out}"]
    )
    assert [step.cached for step in second.steps] == [True] * 4
    assert sink.ran() == [] and "step-ran" not in sink.lines  # no RUN executed
    assert second.image_digest == first.image_digest
    assert (out / "app/copy.txt").read_text() == "hello\nbuilt\n"  # the imported layers are the files


@pytest.mark.sandbox
@needs_registry
def test_corrupted_blob_in_registry_is_rebuilt_never_used(
    registry: registry_server.Registry, busybox_image: Path, tmp_path: Path
) -> None:
    text = f"FROM {BASE}\nCOPY hello.txt /hello.txt\nRUN echo one > /one.txt\nRUN cat /one.txt > /two.txt\n"
    ctx = write_context(tmp_path / "ctx", text, {"hello.txt": "hello\n"})
    ref = f"{registry.host}/cache/corrupt:main"
    first = build(make_cache(tmp_path / "a", busybox_image), ctx, cache_to=[f"type=registry,ref={ref}"])
    run_one = first.steps[1]
    assert run_one.instruction.startswith("RUN echo one")
    data = layer_of_entry(registry, ref, run_one.key)
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, other bytes
    data.write_bytes(bytes(blob))
    sink = Recorder()
    out = tmp_path / "out"
    cache = make_cache(tmp_path / "b", busybox_image)
    second = build(
        cache, ctx, cache_from=[f"type=registry,ref={ref}"], progress=sink, outputs=[f"type=local,dest={out}"]
    )
    assert [step.cached for step in second.steps] == [True, False, True]
    assert sink.ran() == ["RUN echo one > /one.txt"]
    (warning,) = sink.cache_warnings()
    assert "content hashes to" in warning, warning
    assert warning.endswith("rebuilding the step instead")
    assert (out / "two.txt").read_text() == "one\n"


@pytest.mark.sandbox
@needs_registry
@needs_skopeo
def test_build_from_registry_and_push_shows_the_same_digest_in_skopeo(
    registry: registry_server.Registry, busybox_image: Path, tmp_path: Path
) -> None:
    base = f"{registry.host}/base/busybox:1.35"
    skopeo("copy", "-q", "--dest-tls-verify=false", f"oci-archive:{busybox_image}", f"docker://{base}")
    ctx = write_context(tmp_path / "ctx", f'FROM {base}\nRUN echo pushed > /pushed\nCMD ["cat", "/pushed"]\n')
    target = f"{registry.host}/app/pushed:1"
    meta = tmp_path / "meta.json"
    cache = tmp_path / "cache"  # empty: FROM pulls the base from the registry
    proc = run_cli("build", "--push", "-t", target, "--metadata-file", str(meta), str(ctx), cache=cache)
    document: dict[str, Any] = json.loads(meta.read_text())
    digest = document["containerimage.digest"]
    assert document["lamina.push"] == [{"ref": target, "digest": digest}]
    assert f"pushed {target}@{digest}" in proc.stderr
    inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{target}"))
    assert inspected["Digest"] == digest
    copied = tmp_path / "copied"
    skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{target}", f"oci:{copied}:x")
    index = json.loads((copied / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest


@pytest.mark.sandbox
@needs_registry
def test_push_again_from_a_replayed_build(
    registry: registry_server.Registry, busybox_image: Path, tmp_path: Path
) -> None:
    cache = make_cache(tmp_path / "cache", busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN echo x > /x\n")
    target = f"{registry.host}/app/again:1"
    first = build(cache, ctx, tags=[target], push=True)
    second = build(cache, ctx, tags=[target], push=True)  # nothing changed: replayed, pushed again
    assert first.pushed == second.pushed == ((target, first.image_digest),)


@needs_registry
def test_entry_naming_a_directory_outside_the_store_is_refused(
    registry: registry_server.Registry, tmp_path: Path
) -> None:
    from lamina.cache.remote import CacheEntry, export_entries
    from lamina.cache.store import Store
    from lamina.oci.digest import Digest
    from lamina.oci.image import Descriptor
    from lamina.oci.reference import parse_reference
    from lamina.oci.registry import RegistryClient

    ctx = scratch_context(tmp_path / "ctx")
    ref = f"{registry.host}/cache/hostile:main"
    first = build(tmp_path / "a", ctx, cache_to=[f"type=registry,ref={ref},mode=max"])
    key = first.steps[0].key
    # Rewrite the first step's entry: same (valid) layer, a result naming `../../escape` as its dir.
    hostile = json.dumps(
        {"compression": "gzip", "epoch": None, "step": json.dumps({"layer": "../../escape"})}
    )
    digest = Digest("sha256", layer_of_entry(registry, ref, key).parent.name)
    with Store(tmp_path / "a") as store, RegistryClient() as client:
        record = store.layer(digest)
        assert record is not None
        blob = Descriptor(record.media_type, digest, record.size)
        export_entries(client, store, parse_reference(ref), [CacheEntry(key, hostile, blob, record.diff_id)])
    sink = Recorder()
    second = build(tmp_path / "b", ctx, cache_from=[f"type=registry,ref={ref}"], progress=sink)
    assert [step.cached for step in second.steps] == [False, True, True, True]
    (warning,) = sink.cache_warnings()
    assert "not a result this lamina understands" in warning
    assert not (tmp_path / "escape").exists()
    assert second.image_digest == first.image_digest


@needs_registry
def test_cache_from_fetches_only_what_the_target_needs(
    registry: registry_server.Registry, tmp_path: Path
) -> None:
    from lamina.cache.store import Store

    text = "FROM scratch AS other\nCOPY other.txt /other.txt\nFROM scratch AS app\nCOPY app.txt /app.txt\n"
    ctx = write_context(tmp_path / "ctx", text, {"other.txt": "other\n", "app.txt": "app\n"})
    ref = f"{registry.host}/cache/targets:main"
    spec = f"type=registry,ref={ref},mode=max"
    other = build(tmp_path / "a", ctx, target="other", cache_to=[spec])
    app = build(tmp_path / "a", ctx, target="app", cache_to=[spec])
    other_blob = layer_of_entry(registry, ref, other.steps[0].key).parent.name
    app_blob = layer_of_entry(registry, ref, app.steps[0].key).parent.name
    fresh = build(tmp_path / "b", ctx, target="app", cache_from=[f"type=registry,ref={ref}"])
    assert [step.cached for step in fresh.steps] == [True]
    with Store(tmp_path / "b") as store:
        from lamina.oci.digest import Digest

        assert store.has_blob(Digest("sha256", app_blob))
        assert not store.has_blob(Digest("sha256", other_blob))  # the other stage's layer stayed remote


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry_server.Registry]:
    if registry_server.REGISTRY is None or registry_server.HTPASSWD is None:
        pytest.skip("docker-registry or htpasswd (apache2-utils) is not installed")
    with registry_server.running_registry(tmp_path_factory.mktemp("basic"), "basic") as running:
        yield running


def test_push_and_cache_through_a_registry_with_basic_auth(
    basic_registry: registry_server.Registry, tmp_path: Path
) -> None:
    from lamina import api

    env = {"HOME": str(tmp_path / "home"), "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
    ctx = scratch_context(tmp_path / "ctx")
    host = basic_registry.host
    target, cache_ref = f"{host}/app/auth:1", f"type=registry,ref={host}/cache/auth:main,mode=max"
    with pytest.raises(RegistryError, match=f"{host}.*401"):  # not logged in yet: one clear error
        api.build(ctx, cache_dir=tmp_path / "a", environ=env, tags=[target], push=True)
    api.login(host, registry_server.USER, registry_server.PASSWORD, environ=env)
    first = api.build(
        ctx, cache_dir=tmp_path / "a", environ=env, tags=[target], push=True, cache_to=[cache_ref]
    )
    assert first.pushed == ((target, first.image_digest),)
    sink = Recorder()
    second = api.build(
        ctx,
        cache_dir=tmp_path / "b",
        environ=env,
        cache_from=[cache_ref.removesuffix(",mode=max")],
        progress=sink,
    )
    assert second.steps_run == 0 and sink.cache_warnings() == []
    assert second.image_digest == first.image_digest
