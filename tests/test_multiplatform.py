"""Multi-platform builds (issue 17), the engine's side: `--platform a,b` plans the target once
per platform, shares a `FROM --platform=$BUILDPLATFORM` stage, gives BuildKit's automatic args
per target, and writes one OCI image index. The emulated RUN (`uname -m` per platform) is
tests/test_multiplatform_images.py's; here every non-host stage runs no program."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from lamina.engine.progress import StepEvent, StepStatus
from lamina.oci.image import host_platform
from tests.support.build import BASE, build, run_cli, write_context
from tests.support.schema import available as schemas_available
from tests.support.schema import check_document

HOST = str(host_platform())
OTHER = "linux/arm64" if HOST != "linux/arm64" else "linux/amd64"


class Events:
    """A progress sink that keeps every step event (and ignores the rest)."""

    def __init__(self) -> None:
        self.steps: list[StepEvent] = []

    def step(self, event: StepEvent) -> None:
        self.steps.append(event)

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _archive(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(index.json, blobs by digest) of an OCI archive."""
    blobs: dict[str, bytes] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member)
            if data is None:
                continue
            if member.name.startswith("blobs/sha256/"):
                blobs["sha256:" + member.name.rsplit("/", 1)[1]] = data.read()
            elif member.name == "index.json":
                top = json.loads(data.read())
    return top, blobs


def _platform_images(path: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """platform -> (manifest, config) of the one image index an OCI archive holds."""
    top, blobs = _archive(path)
    (entry,) = top["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.index.v1+json"
    index = json.loads(blobs[entry["digest"]])
    found = {}
    for descriptor in index["manifests"]:
        platform = descriptor["platform"]
        name = "/".join(p for p in (platform["os"], platform["architecture"], platform.get("variant")) if p)
        manifest = json.loads(blobs[descriptor["digest"]])
        found[name] = (manifest, json.loads(blobs[manifest["config"]["digest"]]))
    return found


ARGS_DOCKERFILE = """\
FROM scratch
ARG TARGETPLATFORM TARGETOS TARGETARCH TARGETVARIANT BUILDPLATFORM BUILDOS BUILDARCH BUILDVARIANT
ENV T=$TARGETPLATFORM|$TARGETOS|$TARGETARCH|$TARGETVARIANT B=$BUILDPLATFORM|$BUILDOS|$BUILDARCH|$BUILDVARIANT
COPY f /f
"""


def test_index_one_manifest_per_platform_with_buildkits_automatic_args(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", ARGS_DOCKERFILE, {"f": "x\n"})
    out = tmp_path / "multi.tar"
    platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    result = build(
        cache, ctx, platforms=[",".join(platforms)], tags=["multi:1"], outputs=[f"type=oci,dest={out}"]
    )
    images = _platform_images(out)
    assert sorted(images) == sorted(platforms)
    host = host_platform()
    build_values = f"B={host}|{host.os}|{host.architecture}|{host.variant}"
    expected = {
        "linux/amd64": "T=linux/amd64|linux|amd64|",
        "linux/arm64": "T=linux/arm64|linux|arm64|",
        "linux/arm/v7": "T=linux/arm/v7|linux|arm|v7",  # BuildKit's values per target
    }
    for platform, (manifest, config) in images.items():
        os_name, arch, *variant = platform.split("/")
        assert (config["os"], config["architecture"], config.get("variant", "")) == (
            os_name,
            arch,
            "".join(variant),
        )
        env = config["config"]["Env"]
        assert expected[platform] in env and build_values in env
        assert len(manifest["layers"]) == 1
    # -t names the index in the store, and the build's digest is the index's
    from lamina.cache.store import Store
    from lamina.oci.reference import store_name

    top, _ = _archive(out)
    with Store(cache) as store:
        assert str(store.resolve(store_name("multi:1")).manifest) == result.image_digest
    assert top["manifests"][0]["digest"] == result.image_digest


@pytest.mark.skipif(
    not schemas_available(), reason="the OCI image-spec schemas are not in ../shared/conformance"
)
def test_index_and_every_document_pass_the_oci_schemas(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", ARGS_DOCKERFILE, {"f": "x\n"})
    out = tmp_path / "multi.tar"
    build(cache, ctx, platforms=["linux/amd64,linux/arm64"], outputs=[f"type=oci,dest={out}"])
    top, blobs = _archive(out)
    check_document(top, "application/vnd.oci.image.index.v1+json")
    index = json.loads(blobs[top["manifests"][0]["digest"]])
    check_document(index, "application/vnd.oci.image.index.v1+json")
    assert [d["platform"] for d in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
    ]
    for descriptor in index["manifests"]:
        check_document(descriptor, "application/vnd.oci.descriptor.v1+json")
        manifest = json.loads(blobs[descriptor["digest"]])
        check_document(manifest, descriptor["mediaType"])
        check_document(json.loads(blobs[manifest["config"]["digest"]]), manifest["config"]["mediaType"])


CROSS_DOCKERFILE = f"""\
FROM --platform=$BUILDPLATFORM {BASE} AS build
COPY src /out/tool

FROM scratch
ARG TARGETARCH
COPY --from=build /out/tool /usr/bin/tool-$TARGETARCH
"""


def test_a_buildplatform_stage_runs_once_for_every_target(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", CROSS_DOCKERFILE, {"src": "binary\n"})
    out = tmp_path / "multi.tar"
    events = Events()
    result = build(cache, ctx, platforms=["linux/amd64,linux/arm64"], outputs=[f"type=oci,dest={out}"],
                   progress=events)  # fmt: skip
    done = [(e.stage, e.instruction) for e in events.steps if e.status is StepStatus.DONE]
    # The build stage ran once, on the build platform, and says so; the last stage once per target.
    assert done.count((f"{HOST} build", "COPY src /out/tool")) == 1
    assert [(s, i.split()[0]) for s, i in done if s.endswith(" build")] == [
        (f"{HOST} build", "FROM"),
        (f"{HOST} build", "COPY"),
    ]
    copies = sorted(s for s, i in done if i.startswith("COPY --from=build"))
    assert copies == ["linux/amd64 stage-1", "linux/arm64 stage-1"]
    assert [r.stage for r in result.steps].count(f"{HOST} build") == 1
    for platform, (_, config) in _platform_images(out).items():
        assert config["architecture"] == platform.split("/")[1]


def test_the_cache_key_carries_the_stages_platform(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f /f\n", {"f": "x\n"})
    build(cache, ctx)
    again = build(cache, ctx, platforms=[OTHER])
    (step,) = again.steps
    assert not step.cached and f"platform changed: {HOST} -> {OTHER}" in step.reason
    assert build(cache, ctx, platforms=[OTHER]).steps[0].cached


def test_one_other_platform_builds_that_platforms_image(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f /f\n", {"f": "x\n"})
    result = build(cache, ctx, platforms=[OTHER], tags=["other:1"])
    assert result.config.architecture == OTHER.split("/")[1]
    from lamina.cache.store import Store
    from lamina.oci.image import MAX_DOCUMENT, Manifest

    with Store(cache) as store:  # one platform: a plain image manifest, as buildx's
        record = store.resolve("docker.io/library/other:1")
        Manifest.from_bytes(store.read_blob(record.manifest, MAX_DOCUMENT))


def test_docker_output_of_several_platforms_is_refused_as_buildx(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f /f\n", {"f": "x\n"})
    docker = f"type=docker,dest={tmp_path / 'd.tar'}"
    two = "linux/amd64,linux/arm64"
    proc = run_cli("build", "--platform", two, "-o", docker, str(ctx), cache=cache, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: docker exporter does not currently support exporting manifest lists"
    ]
    assert not (tmp_path / "d.tar").exists()


def test_a_run_for_a_platform_no_emulator_runs_fails_before_the_first_step(
    cache: Path, tmp_path: Path
) -> None:
    from lamina.errors import PlanError

    text = "FROM scratch\nCOPY f /f\nRUN true\n"
    ctx = write_context(tmp_path / "ctx", text, {"f": "x\n"})
    events = Events()
    with pytest.raises(PlanError, match=r"Dockerfile:3: RUN for linux/vax: cannot run linux/vax programs"):
        build(cache, ctx, platforms=["linux/vax"], progress=events)
    assert events.steps == []  # not even the COPY ran


def test_copy_only_targets_from_a_multi_platform_base(
    cache: Path, tmp_path: Path, multiplatform_image: Any
) -> None:
    from lamina.api import load
    from tests.support.multiplatform import MULTI_NAME

    load(str(multiplatform_image.archive), cache_dir=str(cache))
    ctx = write_context(tmp_path / "ctx", f"FROM {MULTI_NAME}\nCOPY f /f\n", {"f": "x\n"})
    out = tmp_path / "multi.tar"
    build(cache, ctx, platforms=["linux/amd64,linux/arm64"], outputs=[f"type=oci,dest={out}"])
    _, bases = _archive(multiplatform_image.archive)
    for platform, (manifest, config) in _platform_images(out).items():
        base = json.loads(bases[multiplatform_image.manifests[platform]])
        # each platform's image stands on that platform's base image
        assert manifest["layers"][: len(base["layers"])] == base["layers"]
        assert config["architecture"] == platform.split("/")[1]


def test_plan_shows_each_platforms_stages(tmp_path: Path, cache: Path) -> None:
    ctx = write_context(tmp_path / "ctx", CROSS_DOCKERFILE, {"src": "x\n"})
    proc = run_cli("plan", "--platform", "linux/amd64,linux/arm64", str(ctx), cache=cache)
    assert "== linux/amd64 ==" in proc.stdout and "== linux/arm64 ==" in proc.stdout
    assert "build (built once, with linux/amd64)" in proc.stdout


def test_buildkit_multi_platform_arg_makes_an_index_of_one_platform(cache: Path, tmp_path: Path) -> None:
    from lamina.errors import OutputError

    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f /f\n", {"f": "x\n"})
    out = tmp_path / "one.tar"
    build(cache, ctx, build_args={"BUILDKIT_MULTI_PLATFORM": "1"}, outputs=[f"type=oci,dest={out}"])
    assert list(_platform_images(out)) == [HOST]
    plain = tmp_path / "plain.tar"
    build(cache, ctx, build_args={"BUILDKIT_MULTI_PLATFORM": "false"}, outputs=[f"type=oci,dest={plain}"])
    top, _ = _archive(plain)
    assert top["manifests"][0]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    with pytest.raises(OutputError, match="invalid boolean value for BUILDKIT_MULTI_PLATFORM: maybe"):
        build(cache, ctx, build_args={"BUILDKIT_MULTI_PLATFORM": "maybe"})


def test_cache_export_and_import_hold_every_platform(
    cache: Path, tmp_path: Path, busybox_image: Path
) -> None:
    from tests.support.build import make_cache

    ctx = write_context(tmp_path / "ctx", "FROM scratch\nARG TARGETARCH\nCOPY f-$TARGETARCH /f\n",
                        {"f-amd64": "a\n", "f-arm64": "b\n"})  # fmt: skip
    two = ["linux/amd64,linux/arm64"]
    dest = tmp_path / "exported"
    build(cache, ctx, platforms=two, cache_to=[f"type=local,dest={dest},mode=min"])
    fresh = make_cache(tmp_path / "fresh", busybox_image)
    again = build(fresh, ctx, platforms=two, cache_from=[f"type=local,src={dest}"])
    assert sorted((r.stage, r.cached) for r in again.steps) == [
        ("linux/amd64 stage-0", True),
        ("linux/arm64 stage-0", True),
    ]


def test_a_base_of_another_platform_warns_as_buildkit(cache: Path, tmp_path: Path) -> None:
    # testBaseImagePlatformMismatch: an image built for OTHER, then used by a build for the host.
    ctx = write_context(tmp_path / "base", "FROM scratch\nCOPY foo /foo\n", {"foo": "test"})
    build(cache, ctx, platforms=[OTHER], tags=["base-other:latest"])
    user = write_context(tmp_path / "user", "\nFROM base-other:latest\nENV foo=bar\n")
    result = build(cache, user)
    detail = f'Base image base-other:latest was pulled with platform "{OTHER}", expected "{HOST}"'
    found = [(w.rule, w.detail, w.start_line) for w in result.checks]
    assert found == [("InvalidBaseImagePlatform", detail + " for current build", 2)]
    assert result.config.architecture == OTHER.split("/")[1]  # built on as it is, as BuildKit


def test_inline_cache_of_each_platform_is_pushed_and_read_back(
    registry: Any, tmp_path: Path, busybox_image: Path
) -> None:
    # testCacheMultiPlatformImportExport: a $BUILDPLATFORM stage per target arch, the images pushed
    # with an inline cache; an empty store then builds both platforms from that cache alone.
    from tests.support.build import make_cache

    text = """\
FROM --platform=$BUILDPLATFORM scratch AS base
ARG TARGETARCH
COPY f-$TARGETARCH /arch
FROM scratch
COPY --from=base /arch /
COPY unique /
"""
    ctx = write_context(tmp_path / "ctx", text, {"f-amd64": "amd64", "f-arm": "arm", "unique": "u\n"})
    image = f"{registry.host}/multi/inline:1"
    two = ["linux/amd64,linux/arm/v7"]
    first = build(make_cache(tmp_path / "a", busybox_image), ctx, platforms=two, tags=[image], push=True,
                  cache_to=["type=inline"])  # fmt: skip
    assert [ref for ref, _ in first.pushed] == [image]
    again = build(make_cache(tmp_path / "b", busybox_image), ctx, platforms=two,
                  cache_from=[f"type=registry,ref={image}"], cache_to=["type=inline"])  # fmt: skip
    final = [(r.stage, r.cached) for r in again.steps if not r.stage.endswith(" base")]
    assert sorted(final) == [
        ("linux/amd64 stage-1", True),
        ("linux/amd64 stage-1", True),
        ("linux/arm/v7 stage-1", True),
        ("linux/arm/v7 stage-1", True),
    ]
    assert again.image_digest == first.image_digest  # the same index, inline caches and all


def test_tar_and_local_outputs_hold_a_tree_per_platform(cache: Path, tmp_path: Path) -> None:
    # testExportMultiPlatform: linux/arm is arm/v7, as BuildKit normalises it
    text = "FROM scratch\nARG TARGETARCH\nCOPY arch-$TARGETARCH whoami\n"
    files = {f"arch-{a}": f"i am {a}" for a in ("arm", "amd64", "s390x")}
    ctx = write_context(tmp_path / "ctx", text, files)
    local, tar = tmp_path / "local", tmp_path / "out.tar"
    outputs = [f"type=local,dest={local}", f"type=tar,dest={tar}"]
    build(cache, ctx, platforms=["windows/amd64,linux/arm,linux/s390x"], outputs=outputs)
    expected = {"windows_amd64": "i am amd64", "linux_arm_v7": "i am arm", "linux_s390x": "i am s390x"}
    assert {p.name: (p / "whoami").read_text() for p in local.iterdir()} == expected
    with tarfile.open(tar) as archive:
        found = {}
        for name in expected:
            member = archive.extractfile(f"{name}/whoami")
            assert member is not None
            found[name] = member.read().decode()
    assert found == expected


def test_provenance_of_each_platform_is_attached_in_the_one_index(cache: Path, tmp_path: Path) -> None:
    # BuildKit's multi-platform export with attestations: after each image, its attestation
    # manifest (unknown/unknown, naming that image by digest), all in one index.
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f /f\n", {"f": "x\n"})
    out = tmp_path / "attested.tar"
    build(cache, ctx, platforms=["linux/amd64,linux/arm64"], provenance="mode=min", tags=["att:1"],
          outputs=[f"type=oci,dest={out}"])  # fmt: skip
    top, blobs = _archive(out)
    index = json.loads(blobs[top["manifests"][0]["digest"]])
    kind = "vnd.docker.reference.type"
    kinds = [(d["platform"]["os"], d["platform"]["architecture"], d.get("annotations", {}).get(kind))
             for d in index["manifests"]]  # fmt: skip
    assert kinds == [
        ("linux", "amd64", None),
        ("unknown", "unknown", "attestation-manifest"),
        ("linux", "arm64", None),
        ("unknown", "unknown", "attestation-manifest"),
    ]
    for image, attestation in zip(index["manifests"][::2], index["manifests"][1::2], strict=True):
        assert attestation["annotations"]["vnd.docker.reference.digest"] == image["digest"]
        statement = json.loads(blobs[json.loads(blobs[attestation["digest"]])["layers"][0]["digest"]])
        arch = image["platform"]["architecture"]
        assert [s["name"] for s in statement["subject"]] == [f"pkg:docker/att@1?platform=linux%2F{arch}"]


def test_an_sbom_of_each_platform_is_attached_in_the_one_index(cache: Path, tmp_path: Path) -> None:
    # BuildKit scans each platform's image with the generator: one SPDX statement per platform,
    # in the attestation manifest right after that platform's image (was: refused after building).
    scanner = "FROM " + BASE + "\nCOPY scan.sh /scan.sh\nCMD sh /scan.sh\n"
    script = (
        'set -e\ncat <<BUNDLE > "$BUILDKIT_SCAN_DESTINATION/spdx.json"\n'
        '{"_type": "https://in-toto.io/Statement/v1", "predicateType": "https://spdx.dev/Document",'
        ' "predicate": {"name": "$(cat $BUILDKIT_SCAN_SOURCE/arch)"}}\nBUNDLE\n'
    )
    build(cache, write_context(tmp_path / "scanner", scanner, {"scan.sh": script}), tags=["scanner:1"])
    text = "FROM scratch\nARG TARGETARCH\nCOPY <<EOF /arch\n$TARGETARCH\nEOF\n"
    ctx = write_context(tmp_path / "ctx", text)
    out = tmp_path / "sbom.tar"
    build(cache, ctx, platforms=["linux/amd64,linux/arm64"], sbom="generator=scanner:1",
          outputs=[f"type=oci,dest={out}"])  # fmt: skip
    top, blobs = _archive(out)
    index = json.loads(blobs[top["manifests"][0]["digest"]])
    for image, attestation in zip(index["manifests"][::2], index["manifests"][1::2], strict=True):
        assert attestation["annotations"]["vnd.docker.reference.digest"] == image["digest"]
        layers = json.loads(blobs[attestation["digest"]])["layers"]
        statements = [json.loads(blobs[layer["digest"]]) for layer in layers]
        names = [
            s["predicate"]["name"] for s in statements if s["predicateType"] == "https://spdx.dev/Document"
        ]
        assert names == [image["platform"]["architecture"]]


def test_an_os_version_reaches_targetplatform_and_targetosversion(cache: Path, tmp_path: Path) -> None:
    # testPlatformWithOSVersion (local part): TARGETPLATFORM is containerd's FormatAll
    text = "FROM scratch\nARG TARGETOSVERSION TARGETPLATFORM\nCOPY <<EOF /args\n"
    text += "$TARGETOSVERSION $TARGETPLATFORM\nEOF\n"
    ctx = write_context(tmp_path / "ctx", text)
    out, index = tmp_path / "local", tmp_path / "index.tar"
    platforms = ["windows(1.2.3)/bar,windows(1.1.0)/bar"]
    build(cache, ctx, platforms=platforms, outputs=[f"type=local,dest={out}", f"type=oci,dest={index}"])
    found = {p.name: (p / "args").read_text() for p in out.iterdir()}
    assert found == {
        "windows(1.2.3)_bar": "1.2.3 windows(1.2.3)/bar\n",
        "windows(1.1.0)_bar": "1.1.0 windows(1.1.0)/bar\n",
    }
    top, blobs = _archive(index)
    entries = json.loads(blobs[top["manifests"][0]["digest"]])["manifests"]
    assert [e["platform"] for e in entries] == [
        {"architecture": "bar", "os": "windows", "os.version": "1.2.3"},
        {"architecture": "bar", "os": "windows", "os.version": "1.1.0"},
    ]
    configs = [json.loads(blobs[json.loads(blobs[e["digest"]])["config"]["digest"]]) for e in entries]
    assert [c["os.version"] for c in configs] == ["1.2.3", "1.1.0"]  # as BuildKit's image.OSVersion


def test_the_image_of_a_target_platform_says_that_platform(cache: Path, tmp_path: Path) -> None:
    # BuildKit sets the target platform on the image even when the last stage is built
    # FROM --platform=$BUILDPLATFORM (convert.go, an explicit target platform).
    ctx = write_context(tmp_path / "ctx", f"FROM --platform=$BUILDPLATFORM {BASE}\nCOPY f /f\n", {"f": "x"})
    one = build(cache, ctx, platforms=["linux/arm/v7"])
    assert (one.config.os, one.config.architecture, one.config.variant) == ("linux", "arm", "v7")
    host = build(cache, ctx)  # no --platform: the stage's own, the host's
    assert host.config.architecture == host_platform().architecture


def test_one_job_builds_every_platform_and_the_shared_stage_once(cache: Path, tmp_path: Path) -> None:
    # --jobs bounds the stages of all platforms together: with one, they still all get built
    ctx = write_context(tmp_path / "ctx", CROSS_DOCKERFILE, {"src": "binary\n"})
    result = build(cache, ctx, platforms=["linux/amd64,linux/arm64,linux/riscv64"], jobs=1)
    assert sorted(r.stage for r in result.steps) == [
        f"{HOST} build",
        "linux/amd64 stage-1",
        "linux/arm64 stage-1",
        "linux/riscv64 stage-1",
    ]


def test_plan_json_has_a_document_per_platform(tmp_path: Path, cache: Path) -> None:
    ctx = write_context(tmp_path / "ctx", CROSS_DOCKERFILE, {"src": "x\n"})
    two = "linux/amd64,linux/arm/v7"
    proc = run_cli("plan", "--format", "json", "--platform", two, str(ctx), cache=cache)
    docs = json.loads(proc.stdout)["platforms"]
    assert [d["target_platform"] for d in docs] == ["linux/amd64", "linux/arm/v7"]
    assert [[s["stage_platform"] for s in d["stages"]] for d in docs] == [
        [HOST, "linux/amd64"],
        [HOST, "linux/arm/v7"],
    ]


def test_call_outline_sees_the_target_platform(tmp_path: Path, cache: Path) -> None:
    from lamina import api

    text = "FROM scratch\nARG TARGETARCH\nARG X=$TARGETARCH\nCOPY f /f\n"
    ctx = write_context(tmp_path / "ctx", text, {"f": "x"})
    out, error, _ = api.call("outline,format=json", ctx, cache_dir=cache, platforms=["linux/arm/v7"])
    assert not error
    assert [(a["name"], a["value"]) for a in json.loads(out)["args"]] == [("X", "arm")]


def test_a_host_platform_rebuild_is_cached_another_platform_is_not(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f /f\n", {"f": "x"})
    first = build(cache, ctx, platforms=[HOST], tags=["memo:1"])
    again = build(cache, ctx, platforms=[HOST], tags=["memo:1"])
    assert again.image_digest == first.image_digest and again.steps_cached == 1
    other = build(cache, ctx, platforms=[OTHER], tags=["memo:2"])  # never the host's memo
    assert other.config.architecture == OTHER.split("/")[1]


def test_a_failing_step_names_its_platform(cache: Path, tmp_path: Path) -> None:
    from lamina.errors import BuildError

    text = "FROM scratch\nARG TARGETARCH\nCOPY f-$TARGETARCH /f\n"
    ctx = write_context(tmp_path / "ctx", text, {"f-amd64": "x"})
    with pytest.raises(BuildError) as caught:
        build(cache, ctx, platforms=["linux/amd64,linux/arm64"])
    message = str(caught.value)
    assert message.startswith(f"{ctx}/Dockerfile:3: stage stage-0 (linux/arm64): COPY f-$TARGETARCH /f: ")
    assert "f-arm64" in message


def test_from_scratch_is_the_target_platform_whatever_platform_it_names() -> None:
    # BuildKit's convert.go gives a scratch stage the target platform even with FROM --platform
    from lamina.engine.dockerfile.parser import parse
    from lamina.engine.plan import make_plan, parse_platform

    dockerfile = parse(b"FROM --platform=$BUILDPLATFORM scratch AS a\nFROM --platform=linux/s390x scratch\n")
    plan = make_plan(dockerfile, target_platform=parse_platform("linux/arm64"))
    assert [str(s.stage_platform) for s in plan.stages] == ["linux/arm64", "linux/arm64"]


def test_local_output_of_each_platform_gets_its_provenance_and_the_epoch(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f /f\n", {"f": "x\n"})
    out = tmp_path / "local"
    build(cache, ctx, platforms=["linux/amd64,linux/arm64"], provenance="mode=min", source_date_epoch=7,
          outputs=[f"type=local,dest={out}"])  # fmt: skip
    for platform in ("linux_amd64", "linux_arm64"):
        statement = json.loads((out / platform / "provenance.json").read_text())
        digest = hashlib.sha256(b"x\n").hexdigest()
        assert statement["subject"] == [{"name": "f", "digest": {"sha256": digest}}]
        assert (out / platform / "f").stat().st_mtime == 7


def test_an_index_of_one_platform_splits_its_tree_unless_told_not_to(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f /f\n", {"f": "x\n"})
    multi = {"BUILDKIT_MULTI_PLATFORM": "1"}
    split, whole = tmp_path / "split", tmp_path / "whole"
    build(cache, ctx, build_args=multi, outputs=[f"type=local,dest={split}"])
    build(cache, ctx, build_args=multi, outputs=[f"type=local,dest={whole},platform-split=false"])
    assert (split / HOST.replace("/", "_") / "f").read_text() == (whole / "f").read_text() == "x\n"


def test_platform_values_as_buildx_and_containerd_read_them() -> None:
    from lamina.engine.plan import parse_platforms
    from lamina.errors import PlanError

    found = parse_platforms(["local,linux/aarch64", "linux/arm,linux/arm64/v8", "x86_64"])
    assert [str(p) for p in found] == [HOST, "linux/arm64", "linux/arm/v7"] + (
        [] if HOST == "linux/amd64" else ["linux/amd64"]
    )
    with pytest.raises(PlanError, match="--platform bogus: bogus: unknown operating system or architecture"):
        parse_platforms(["bogus"])


def test_the_image_id_of_an_index_is_its_digest_as_buildx_gives_it(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f /f\n", {"f": "x"})
    iid, meta = tmp_path / "iid", tmp_path / "meta.json"
    proc = run_cli("build", "-q", "--platform", "linux/amd64,linux/arm64", "--iidfile", str(iid),
                   "--metadata-file", str(meta), str(ctx), cache=cache)  # fmt: skip
    document = json.loads(meta.read_text())
    assert proc.stdout.strip() == iid.read_text() == document["containerimage.digest"]
    assert "containerimage.config.digest" not in document  # BuildKit gives none for an index


def test_a_base_images_onbuild_arg_targetarch_makes_the_stage_one_per_target(
    cache: Path, tmp_path: Path
) -> None:
    """A `FROM --platform=$BUILDPLATFORM` stage is one for every target unless it reads a
    TARGET* ARG, and an ARG its base image's ONBUILD triggers declare counts: BuildKit runs
    the triggers as the stage's first instructions, so each target gets its own value."""
    base_ctx = write_context(tmp_path / "base", f"FROM {BASE}\nONBUILD ARG TARGETARCH\n"
                             "ONBUILD RUN echo \"$TARGETARCH\" > /onbuild-arch\n")  # fmt: skip
    build(cache, base_ctx, tags=["onbuild/base:1"])
    ctx = write_context(
        tmp_path / "ctx",
        "FROM --platform=$BUILDPLATFORM onbuild/base:1 AS tools\n"
        "FROM scratch\nCOPY --from=tools /onbuild-arch /a\n",
    )
    out = tmp_path / "multi.tar"
    result = build(cache, ctx, platforms=["linux/amd64,linux/arm64"], outputs=[f"type=oci,dest={out}"])
    _, blobs = _archive(out)
    for platform, (manifest, _) in _platform_images(out).items():
        (layer,) = manifest["layers"]
        with tarfile.open(fileobj=io.BytesIO(blobs[layer["digest"]])) as tar:
            member = tar.extractfile("a")
            assert member is not None and member.read() == f"{platform.split('/')[1]}\n".encode()
    runs = [s for s in result.steps if s.instruction.startswith("ONBUILD RUN echo")]  # as BuildKit names it
    assert len(runs) == 2, [(s.stage, s.instruction) for s in result.steps]  # the triggers ran per target
