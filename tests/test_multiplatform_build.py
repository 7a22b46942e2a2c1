"""End to end: one Dockerfile built for linux/amd64 and linux/arm64 into one OCI index.

The base is lamina-test/busybox-multi:1.35 (tests/support/multiplatform.py): amd64 busybox
and Debian's arm64 busybox-static under one index. On this x86_64 host the arm64 RUN
steps run under qemu-user-static (binfmt_misc, or the sandbox's own; see
lamina/engine/sandbox/emulation.py), which CI installs and registers. The files are read
back from the written OCI archive, and the index goes through skopeo and the test registry.
"""

from __future__ import annotations

import base64
import io
import json
import platform
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from lamina import api
from lamina.cache.images import load_image_file
from lamina.cache.store import Store
from lamina.errors import SandboxError
from lamina.oci.compression import open_decompressed
from lamina.oci.digest import Digest
from lamina.oci.image import Index, Platform
from tests.support.build import build, run_cli, write_context
from tests.support.registry import skopeo

pytestmark = pytest.mark.sandbox

BASE = "lamina-test/busybox-multi:1.35"
PLATFORMS = ("linux/amd64", "linux/arm64")
ARCH = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}

DOCKERFILE = f"""\
FROM --platform=$BUILDPLATFORM {BASE} AS tools
RUN uname -m > /built-on
FROM {BASE}
ARG TARGETPLATFORM
COPY --from=tools /built-on /built-on
RUN uname -m > /arch && echo "$TARGETPLATFORM" > /target
"""


@pytest.fixture
def multi_cache(tmp_path: Path, multiplatform_image: Any) -> Path:
    """A store holding the two-platform base (and nothing else)."""
    if platform.machine() != "x86_64":
        pytest.skip("the arm64 steps are the emulated ones on an x86_64 host only")
    from lamina.engine.sandbox.emulation import emulator
    from lamina.engine.sandbox.isolation import choose, requested

    try:
        emulator(Platform.parse("linux/arm64"), choose(requested()).isolation.value)
    except SandboxError as err:
        pytest.skip(f"{err} (CI installs qemu-user-static and registers it: tests/support/binfmt.sh)")
    cache = tmp_path / "cache"
    with Store(cache) as store:
        load_image_file(store, multiplatform_image.archive)
    return cache


def images_in(archive: Path) -> dict[str, dict[str, bytes]]:
    """platform -> {path: content} of the regular files of each image of an OCI archive's index."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(archive) as outer:

        def blob(digest: str) -> bytes:
            member = outer.extractfile("blobs/sha256/" + digest.split(":")[1])
            assert member is not None
            return member.read()

        top = json.loads(blob(json.loads(outer.extractfile("index.json").read())["manifests"][0]["digest"]))  # type: ignore[union-attr]
        for entry in top["manifests"]:
            manifest = json.loads(blob(entry["digest"]))
            config = json.loads(blob(manifest["config"]["digest"]))
            wanted = f"{entry['platform']['os']}/{entry['platform']['architecture']}"
            assert f"{config['os']}/{config['architecture']}" == wanted  # the config says its platform
            files: dict[str, bytes] = {}
            for layer in manifest["layers"]:
                with tarfile.open(
                    fileobj=open_decompressed(io.BytesIO(blob(layer["digest"]))), mode="r|"
                ) as tar:
                    for info in tar:
                        if info.isfile():
                            reader = tar.extractfile(info)
                            assert reader is not None
                            files["/" + info.name.lstrip("./")] = reader.read()
            out[wanted] = files
    return out


def test_two_platform_build_runs_each_platform_and_the_build_stage_once(
    multi_cache: Path, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", DOCKERFILE)
    archive = tmp_path / "multi.tar"
    result = build(
        multi_cache, ctx, platforms=PLATFORMS, tags=["multi/app:1"], outputs=[f"type=oci,dest={archive}"]
    )
    images = images_in(archive)
    assert sorted(images) == sorted(PLATFORMS)
    for wanted, files in images.items():
        assert files["/arch"] == f"{ARCH[wanted]}\n".encode()  # the RUN ran as that platform
        assert files["/target"] == f"{wanted}\n".encode()
        assert files["/built-on"] == b"x86_64\n"  # the $BUILDPLATFORM stage: native
    # The build-platform stage ran once for both targets.
    tools_runs = [s for s in result.steps if s.instruction == "RUN uname -m > /built-on"]
    assert len(tools_runs) == 1, [(s.stage, s.instruction) for s in result.steps]
    # The tag names the index: `lamina run --platform` picks each image.
    with Store(multi_cache) as store:
        index = Index.from_bytes(store.read_blob(store.resolve("docker.io/multi/app:1").manifest, 1 << 20))
    assert sorted(str(m.platform) for m in index.manifests) == sorted(PLATFORMS)


def test_three_platforms_with_arm_v7_run_each_under_its_own_machine(
    multi_cache: Path, tmp_path: Path
) -> None:
    """amd64, arm64 and arm/v7 from the three-platform base: each RUN sees its machine (armv7l
    through qemu-arm), TARGETVARIANT is v7 for arm, each config names its variant."""
    arm = Platform.parse("linux/arm/v7")
    from lamina.engine.sandbox.emulation import emulator
    from lamina.engine.sandbox.isolation import choose, requested

    try:
        emulator(arm, choose(requested()).isolation.value)
    except SandboxError as err:
        pytest.skip(f"{err} (CI installs qemu-user-static and registers it: tests/support/binfmt.sh)")
    three = (*PLATFORMS, str(arm))
    dockerfile = DOCKERFILE + 'ARG TARGETVARIANT\nRUN echo "[$TARGETVARIANT]" > /variant\n'
    ctx = write_context(tmp_path / "ctx", dockerfile)
    archive = tmp_path / "three.tar"
    result = build(multi_cache, ctx, platforms=three, outputs=[f"type=oci,dest={archive}"])
    images = images_in(archive)
    assert sorted(images) == ["linux/amd64", "linux/arm", "linux/arm64"]
    machine = {"linux/amd64": b"x86_64\n", "linux/arm64": b"aarch64\n", "linux/arm": b"armv7l\n"}
    for wanted, files in images.items():
        assert files["/arch"] == machine[wanted], wanted
        assert files["/built-on"] == b"x86_64\n"  # the $BUILDPLATFORM stage: native, once
    assert images["linux/arm"]["/target"] == b"linux/arm/v7\n"
    assert images["linux/arm"]["/variant"] == b"[v7]\n"
    assert images["linux/arm64"]["/variant"] == images["linux/amd64"]["/variant"] == b"[]\n"
    assert len([s for s in result.steps if s.instruction == "RUN uname -m > /built-on"]) == 1
    with tarfile.open(archive) as tar:  # the index entry and the config both say arm/v7
        top = json.loads(tar.extractfile("blobs/sha256/" + result.image_digest.split(":")[1]).read())  # type: ignore[union-attr]
        (entry,) = [m for m in top["manifests"] if m["platform"]["architecture"] == "arm"]
        assert entry["platform"] == {"architecture": "arm", "os": "linux", "variant": "v7"}
        manifest = json.loads(tar.extractfile("blobs/sha256/" + entry["digest"].split(":")[1]).read())  # type: ignore[union-attr]
        config = json.loads(
            tar.extractfile("blobs/sha256/" + manifest["config"]["digest"].split(":")[1]).read()
        )  # type: ignore[union-attr]
    assert (config["architecture"], config["variant"]) == ("arm", "v7")


def test_a_multi_platform_oci_layout_context_gives_each_platform_its_image(
    multi_cache: Path, tmp_path: Path, multiplatform_image: Any
) -> None:
    """--build-context base=oci-layout://DIR:TAG of an index: each target's FROM picks its image."""
    ctx = write_context(tmp_path / "ctx", "FROM base\nRUN uname -m > /arch\n")
    archive = tmp_path / "multi.tar"
    context = f"base=oci-layout://{multiplatform_image.layout}:1.35"
    build(
        multi_cache, ctx, platforms=PLATFORMS, build_contexts=[context], outputs=[f"type=oci,dest={archive}"]
    )
    images = images_in(archive)
    assert {wanted: files["/arch"] for wanted, files in images.items()} == {
        wanted: f"{ARCH[wanted]}\n".encode() for wanted in PLATFORMS
    }


def test_lamina_debug_enters_a_failed_arm64_step_emulated(multi_cache: Path, tmp_path: Path) -> None:
    """The kept failure remembers its platform: `lamina debug` runs the step's shell as arm64."""
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN uname -m > /made && false\n")
    proc = run_cli("build", "--platform", "linux/arm64", str(ctx), cache=multi_cache, check=False)
    assert proc.returncode == 1, proc.stderr
    found = re.search(r"^debug: lamina debug ([0-9a-f]{12})", proc.stderr, re.M)
    assert found, proc.stderr
    kept = json.loads((multi_cache / "failures" / found.group(1) / "failure.json").read_text())
    assert kept["platform"] == "linux/arm64"
    shell = run_cli("debug", found.group(1), "sh", "-c", "cat /made; uname -m", cache=multi_cache)
    assert shell.stdout == "aarch64\naarch64\n"


def test_load_and_save_keep_a_multi_platform_index_with_its_attestations(
    multi_cache: Path, tmp_path: Path, registry: Any
) -> None:
    """A two-platform OCI archive with provenance (an attestation manifest after each image)
    loads whole into another store and saves as the same index and the same blobs; pushed
    whole, then one platform pulled, saving it says what was never pulled."""
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN uname -m > /arch\n")
    archive = tmp_path / "built.tar"
    build(multi_cache, ctx, platforms=PLATFORMS, tags=["multi/prov:1"], provenance="mode=min",
          outputs=[f"type=oci,dest={archive}"])  # fmt: skip
    other = {"LAMINA_CACHE": str(tmp_path / "other")}
    (record,) = api.load(archive, environ=other)
    saved = tmp_path / "saved.tar"
    descriptor = api.save("multi/prov:1", saved, environ=other)
    assert descriptor.digest == record.manifest

    def blobs(path: Path) -> set[str]:
        with tarfile.open(path) as tar:
            return {name for name in tar.getnames() if name.startswith("blobs/sha256/")}

    assert blobs(saved) == blobs(archive)
    index = Index.from_bytes(skopeo("inspect", "--raw", f"oci-archive:{saved}").encode())
    assert str(Digest.of_bytes(skopeo("inspect", "--raw", f"oci-archive:{archive}").encode())) == str(
        record.manifest
    )
    assert sorted(str(m.platform) for m in index.manifests) == sorted(
        [*PLATFORMS, "unknown/unknown", "unknown/unknown"]
    )
    remote = f"{registry.host}/prov:1"
    assert str(api.push("multi/prov:1", remote, environ=other).digest) == str(record.manifest)
    api.pull(remote, platform="linux/arm64", environ={"LAMINA_CACHE": str(tmp_path / "third")})
    done = run_cli("save", remote, "-o", str(tmp_path / "x.tar"), cache=tmp_path / "third", check=False)
    assert done.returncode == 1
    expected = "never pulled: linux/amd64 image, attestations; pull it, or save one platform with --platform"
    assert expected in done.stderr
    listed = run_cli("images", cache=tmp_path / "third").stdout.splitlines()[1].split()
    assert listed[2] == "(linux/amd64),linux/arm64"  # the index's platforms; amd64's never pulled


def test_the_built_index_goes_through_skopeo_and_the_registry_and_back(
    multi_cache: Path, tmp_path: Path, registry: Any
) -> None:
    ctx = write_context(tmp_path / "ctx", DOCKERFILE)
    archive = tmp_path / "multi.tar"
    build(multi_cache, ctx, platforms=PLATFORMS, outputs=[f"type=oci,dest={archive}"])
    raw = skopeo("inspect", "--raw", f"oci-archive:{archive}")
    index = Index.from_bytes(raw.encode())
    assert sorted(str(m.platform) for m in index.manifests) == sorted(PLATFORMS)
    dest = f"{registry.host}/built:1"
    skopeo(
        "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci-archive:{archive}", f"docker://{dest}"
    )
    served = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}")
    assert Digest.of_bytes(served.encode()) == Digest.of_bytes(raw.encode())  # pushed as written
    for entry in index.manifests:
        config = json.loads(
            skopeo(
                "inspect", "--config", "--tls-verify=false", f"docker://{registry.host}/built@{entry.digest}"
            )
        )
        assert f"{config['os']}/{config['architecture']}" == str(entry.platform)
    back = tmp_path / "back"
    skopeo("copy", "--all", "--quiet", "--src-tls-verify=false", f"docker://{dest}", f"oci:{back}:1")
    copied = json.loads((back / "index.json").read_text())["manifests"][0]["digest"]
    assert copied == str(Digest.of_bytes(raw.encode()))  # and back, the very index
    # lamina pulls each platform of it and finds what its RUN wrote.
    env = {"LAMINA_CACHE": str(multi_cache)}
    for wanted in PLATFORMS:
        pulled = api.pull(dest, platform=wanted, environ=env)
        assert str(pulled.record.manifest) == str(Digest.of_bytes(raw.encode()))
    out = tmp_path / "arch"
    code = api.run(dest, ["cat", "/arch"], platform="linux/arm64", environ=env, stdout=out.open("wb"))
    assert code == 0 and out.read_text() == "aarch64\n"


def test_a_base_in_a_registry_is_pulled_per_platform(
    multi_cache: Path, tmp_path: Path, registry: Any
) -> None:
    """FROM a registry's multi-platform image into an empty store: each target pulls its own."""
    remote = f"{registry.host}/base-multi:1"
    api.push(BASE, remote, environ={"LAMINA_CACHE": str(multi_cache)})
    empty = tmp_path / "empty-cache"
    ctx = write_context(tmp_path / "ctx", f"FROM {remote}\nRUN uname -m > /arch\n")
    archive = tmp_path / "multi.tar"
    build(empty, ctx, platforms=PLATFORMS, outputs=[f"type=oci,dest={archive}"])
    assert {wanted: files["/arch"] for wanted, files in images_in(archive).items()} == {
        wanted: f"{ARCH[wanted]}\n".encode() for wanted in PLATFORMS
    }
    with Store(empty) as store:  # the name keeps the registry's index, the two platforms built in it
        index = Index.from_bytes(store.read_blob(store.resolve(remote).manifest, 1 << 20))
        pulled = {str(entry.platform): store.has_blob(entry.digest) for entry in index.manifests}
        assert pulled == {"linux/amd64": True, "linux/arm64": True, "linux/arm/v7": False}


def test_an_unchanged_multi_platform_build_is_replayed_to_the_same_index(
    multi_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The no-op rebuild of a two-platform build comes from the build memo (not planned, every
    step cached, each platform's steps named), tags the same index and writes the same archive;
    once one platform's base changes in the index, it builds again."""
    ctx = write_context(tmp_path / "ctx", DOCKERFILE)
    first = build(multi_cache, ctx, platforms=PLATFORMS, tags=["multi/memo:1"],
                  outputs=[f"type=oci,dest={tmp_path / 'a.tar'}"])  # fmt: skip
    from lamina.engine.steps import dispatch

    real = dispatch.make_plans

    def planned(*args: object, **kwargs: object) -> None:
        raise AssertionError("the unchanged build was planned again, not replayed")

    monkeypatch.setattr(dispatch, "make_plans", planned)
    again = build(multi_cache, ctx, platforms=PLATFORMS, tags=["multi/memo:1"],
                  outputs=[f"type=oci,dest={tmp_path / 'b.tar'}"])  # fmt: skip
    assert again.image_digest == first.image_digest and again.index
    assert again.steps and all(step.cached for step in again.steps)
    assert {
        s.stage.split()[0] for s in again.steps if s.instruction.startswith("RUN uname -m > /arch")
    } == set(PLATFORMS)
    assert (tmp_path / "b.tar").read_bytes() == (tmp_path / "a.tar").read_bytes()
    build(multi_cache, ctx, platforms=PLATFORMS, tags=["multi/memo:2"])  # replayed under a new tag
    with Store(multi_cache) as store:
        assert str(store.resolve("docker.io/multi/memo:2").manifest) == first.image_digest
    # the same build for one of the platforms is another build (its own image, not the index)
    with pytest.raises(AssertionError, match="planned again"):
        build(multi_cache, ctx, platforms=PLATFORMS[1:])
    monkeypatch.setattr(dispatch, "make_plans", real)
    # The base's arm64 image changes (a new index under the same name): arm64 builds again.
    with Store(multi_cache) as store:
        name = f"docker.io/{BASE}"
        base = Index.from_bytes(store.read_blob(store.resolve(name).manifest, 1 << 20))
        built = Index.from_bytes(store.read_blob(Digest.parse(first.image_digest), 1 << 20))
        arm64 = next(e for e in built.manifests if str(e.platform) == "linux/arm64")
        entries = tuple(arm64 if str(e.platform) == "linux/arm64" else e for e in base.manifests)
        data = Index(entries).to_bytes()
        store.put_bytes(data, Digest.of_bytes(data))
        store.tag(name, Digest.of_bytes(data), size=1)
    rebuilt = build(multi_cache, ctx, platforms=PLATFORMS)
    ran = {s.stage.split()[0] for s in rebuilt.steps if not s.cached}
    assert ran == {"linux/arm64"}, [(s.stage, s.instruction, s.cached) for s in rebuilt.steps]
    # replayed again, the summary line names the index as an index
    done = run_cli("build", "--platform", ",".join(PLATFORMS), str(ctx), cache=multi_cache)
    digest = rebuilt.image_digest
    assert f"built image {digest} (index {digest}) in " in done.stderr
    assert "FROM lamina-test/busybox-multi:1.35  CACHED" in done.stderr, done.stderr  # the memo's


def test_each_platforms_run_output_is_under_its_own_step(multi_cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN uname -m\n")
    args = ("build", "--platform", ",".join(PLATFORMS), "--progress", "rawjson", str(ctx))
    events = [json.loads(line) for line in run_cli(*args, cache=multi_cache).stderr.splitlines() if line]
    names = {v["digest"]: v["name"] for e in events for v in e.get("vertexes", ())}
    logs = {
        (names.get(log["vertex"]), base64.b64decode(log["data"])) for e in events for log in e.get("logs", ())
    }
    # Each machine's output belongs to that platform's RUN vertex (BuildKit: one vertex per platform).
    assert logs == {
        ("[linux/amd64 2/2] RUN uname -m", b"x86_64\n"),
        ("[linux/arm64 2/2] RUN uname -m", b"aarch64\n"),
    }


def test_a_failure_of_one_platform_ends_the_build_while_the_other_has_stages_queued(
    multi_cache: Path, tmp_path: Path
) -> None:
    # --jobs 1: when the arm64 RUN fails, amd64's stages wait in the shared pool, dropped; the
    # build must end with the failure, not wait forever for them.
    text = f'FROM {BASE} AS a\nARG TARGETARCH\nRUN [ "$TARGETARCH" != arm64 ]\n'
    text += "".join(f"FROM {BASE} AS {name}\nRUN sleep 1\n" for name in "bcd")
    text += "FROM scratch\n" + "".join(f"COPY --from={name} /bin/busybox /{name}\n" for name in "abcd")
    ctx = write_context(tmp_path / "ctx", text)
    args = ("build", "--no-cache", "--jobs", "1", "--platform", "linux/arm64,linux/amd64", str(ctx))
    done = run_cli(*args, cache=multi_cache, check=False, timeout=90)
    assert done.returncode == 1
    assert "stage a (linux/arm64): process" in done.stderr.splitlines()[-2], done.stderr
