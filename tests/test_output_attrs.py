"""Exporter attributes through the CLI, as BuildKit's exporters take them (issue 13).

Each test builds with `lamina build -o ...` and reads the image it wrote:
media types, the layer blobs' real compression (by magic), diff_ids,
annotations and index entries. Refusals assert the one-line error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from lamina.oci.compression import Compression
from lamina.oci.digest import Digest
from lamina.oci.image import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)
from tests.support.build import BASE, make_cache, run_cli, write_context

DOCKERFILE = f"FROM {BASE}\nARG V=1\nRUN echo hi > /hi\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> Path:
    return make_cache(tmp_path_factory.mktemp("attrs"), busybox_image)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_context(tmp_path_factory.mktemp("ctx"), DOCKERFILE)


class Archive:
    """An OCI layout tarball as written: documents and blobs by digest."""

    def __init__(self, path: Path) -> None:
        with tarfile.open(path) as tar:
            self.files = {
                m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar
                if m.isfile()
            }

    def blob(self, digest: str) -> bytes:
        return self.files["blobs/sha256/" + digest.split(":", 1)[1]]

    def doc(self, digest: str) -> Any:
        data = self.blob(digest)
        assert Digest.of_bytes(data) == Digest.parse(digest)
        return json.loads(data)

    @property
    def index(self) -> Any:
        return json.loads(self.files["index.json"])

    def manifest(self) -> Any:
        """The image manifest (through the index when the entry is one)."""
        entry = self.index["manifests"][0]
        top = self.doc(entry["digest"])
        if top["mediaType"] == OCI_INDEX:
            images = [m for m in top["manifests"] if m["platform"]["os"] != "unknown"]
            return self.doc(images[0]["digest"])
        return top


def build(cache: Path, ctx: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli("build", "--progress", "plain", *args, str(ctx), cache=cache, check=check)


def oci(cache: Path, ctx: Path, tmp_path: Path, attrs: str = "", *args: str) -> Archive:
    tmp_path.mkdir(parents=True, exist_ok=True)
    dest = tmp_path / "out.tar"
    build(cache, ctx, "-o", f"type=oci,dest={dest}{attrs}", *args)
    return Archive(dest)


def magic(archive: Archive, layer: Any) -> Compression:
    return Compression.sniff(archive.blob(layer["digest"])[:4])


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_compression_zstd_writes_new_layers_in_zstd_and_keeps_the_base(
    cache: Path, ctx: Path, tmp_path: Path
) -> None:
    plain = oci(cache, ctx, tmp_path / "a")
    zstd = oci(cache, ctx, tmp_path / "b", ",compression=zstd")
    base, built = zstd.manifest()["layers"]
    assert (base["mediaType"], magic(zstd, base)) == (OCI_LAYER_GZIP, Compression.GZIP)
    assert (built["mediaType"], magic(zstd, built)) == (OCI_LAYER_ZSTD, Compression.ZSTD)
    # Same files: the config (diff_ids) is the one the gzip build has.
    assert zstd.manifest()["config"] == plain.manifest()["config"]


def test_force_compression_recompresses_base_layers_too(cache: Path, ctx: Path, tmp_path: Path) -> None:
    archive = oci(cache, ctx, tmp_path, ",compression=zstd,force-compression=true,name=attrs:umoci")
    layers = archive.manifest()["layers"]
    assert [(m["mediaType"], magic(archive, m)) for m in layers] == [(OCI_LAYER_ZSTD, Compression.ZSTD)] * 2
    if shutil.which("skopeo"):  # a real reader takes the zstd layers (umoci has no zstd)
        done = subprocess.run(
            ["skopeo", "copy", f"oci-archive:{tmp_path / 'out.tar'}", f"oci:{tmp_path / 'copy'}:x"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr


def test_uncompressed_layers_are_their_own_diff_ids(cache: Path, ctx: Path, tmp_path: Path) -> None:
    archive = oci(cache, ctx, tmp_path, ",compression=uncompressed,force-compression=true")
    manifest = archive.manifest()
    config = archive.doc(manifest["config"]["digest"])
    assert [m["mediaType"] for m in manifest["layers"]] == [OCI_LAYER, OCI_LAYER]
    assert [m["digest"] for m in manifest["layers"]] == config["rootfs"]["diff_ids"]


def test_compression_level_recompresses_at_that_level(cache: Path, ctx: Path, tmp_path: Path) -> None:
    default = oci(cache, ctx, tmp_path / "a").manifest()["layers"]
    best = oci(cache, ctx, tmp_path / "b", ",compression-level=9").manifest()["layers"]
    again = oci(cache, ctx, tmp_path / "c", ",compression-level=9").manifest()["layers"]
    assert best[0] == default[0]  # the base layer keeps its blob
    assert best[1]["mediaType"] == OCI_LAYER_GZIP and best[1]["digest"] != default[1]["digest"]
    assert again == best  # deterministic


def test_oci_mediatypes_false_and_type_docker_use_docker_types(
    cache: Path, ctx: Path, tmp_path: Path
) -> None:
    archive = oci(cache, ctx, tmp_path, ",oci-mediatypes=false")
    manifest = archive.manifest()
    assert manifest["mediaType"] == DOCKER_MANIFEST and manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert {m["mediaType"] for m in manifest["layers"]} == {DOCKER_LAYER_GZIP}
    dest = tmp_path / "docker.tar"
    build(cache, ctx, "-t", "attrs:docker", "-o", f"type=docker,dest={dest}")
    docker = Archive(dest)
    assert docker.manifest() == manifest  # BuildKit's docker exporter: the same tarball, docker's types
    assert json.loads(docker.files["manifest.json"])[0]["RepoTags"] == ["attrs:docker"]
    oci_types = Archive(_build_to(cache, ctx, tmp_path / "d.tar", "type=docker,oci-mediatypes=true"))
    assert oci_types.manifest()["mediaType"] == OCI_MANIFEST
    if shutil.which("skopeo"):
        done = subprocess.run(
            ["skopeo", "inspect", f"docker-archive:{dest}"], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr


def _build_to(cache: Path, ctx: Path, dest: Path, spec: str) -> Path:
    build(cache, ctx, "-o", f"{spec},dest={dest}")
    return dest


def test_annotations_land_on_the_manifest_and_its_descriptor(cache: Path, ctx: Path, tmp_path: Path) -> None:
    archive = oci(
        cache,
        ctx,
        tmp_path,
        ",annotation.org.opencontainers.image.title=T,annotation-manifest-descriptor.d=1",
        "--annotation",
        "org.opencontainers.image.vendor=V",
        "--annotation",
        "manifest,manifest-descriptor:both=2",
    )
    manifest = archive.manifest()
    assert manifest["annotations"] == {
        "both": "2",
        "org.opencontainers.image.title": "T",
        "org.opencontainers.image.vendor": "V",
    }
    entry = archive.index["manifests"][0]
    assert entry["annotations"]["d"] == "1" and entry["annotations"]["both"] == "2"
    # BuildKit's oci exporter stamps the entry with a creation time: here the image's own.
    created = archive.doc(manifest["config"]["digest"])["created"]
    assert entry["annotations"]["org.opencontainers.image.created"] == created[:19] + "Z"
    assert "org.opencontainers.image.title" not in entry["annotations"]
    qualified = oci(cache, ctx, tmp_path / "q", "", "--annotation", "manifest[linux/amd64]:q=1")
    assert qualified.manifest()["annotations"] == {"q": "1"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "type=oci,dest={d},compression=estargz"], "compression=estargz is not supported"),
        (["-o", "type=oci,dest={d},compression=lz4"], "compression must be gzip, zstd or uncompressed"),
        (["-o", "type=oci,dest={d},compression-level=12"], "compression-level=12: gzip takes 0..9"),
        (
            ["-o", "type=oci,dest={d},compression-level=x"],
            "non-integer value x specified for compression-level",
        ),
        (
            ["-o", "type=oci,dest={d},oci-mediatypes=maybe"],
            "non-bool value 'maybe' specified for oci-mediatypes",
        ),
        (["-o", "type=oci,dest={d},bogus=1"], "unknown key 'bogus' for type=oci"),
        (["-o", "type=image,name=x:1,push-by-digest=true"], "push-by-digest=true needs push=true"),
        (["-o", "type=oci,dest={d},rewrite-timestamp=false"], "rewrite-timestamp=false is not supported"),
        (["-o", "type=local,dest={d},mode=delete"], "mode=delete is not supported"),
        (
            ["-o", "type=oci,dest={d},oci-artifact=true,oci-mediatypes=false"],
            'exporter option "oci-artifact=true" conflicts with "oci-mediatypes=false"',
        ),
        (["-o", "type=local,dest={d},annotation.a=b"], "type=local has no manifest to annotate"),
        (
            ["-o", "type=oci,dest={d},annotation-index.a=b"],
            "index annotations not supported for single platform",
        ),
        (["-o", "type=oci,dest={d},annotation-bogus.a=b"], "unrecognized annotation type bogus"),
        (
            ["-o", "type=oci,dest={d},oci-mediatypes=false,annotation-manifest-descriptor.a=b"],
            'cannot export annotations with "oci-mediatypes=false"',
        ),
        (["-o", "type=oci,dest={d}", "--annotation", "noequals"], 'invalid annotation "noequals"'),
        (["-o", "type=oci,dest={d}", "--annotation", "=x"], 'invalid annotation "=x", expected key=value'),
        (["-o", "type=oci,dest={d}", "--annotation", "index:=x"], 'invalid annotation "index:=x"'),
        (["-o", "type=oci,dest={d}", "--annotation", "blob:a=b"], 'unknown annotation type "blob"'),
        (["-o", "type=oci,dest={d}", "--annotation", "manifest[linux/s390x]:a=b"], "no platform linux/s390x"),
        (["-o", "{d}", "--annotation", "a=b"], "--annotation: no output of this build is an image"),
        (["-o", "type=registry"], "tag is needed when pushing to registry"),
        (["--sbom", "generator="], "--sbom: sbom scanner cannot be empty"),
        (["--attest", "type=sbom,generator=Not A Ref"], "--sbom: failed to parse sbom scanner Not A Ref"),
        (["--attest", "type=nope"], 'unknown attestation type "nope"'),
        (["--provenance", "mode=all"], 'invalid --provenance mode "all"'),
        (
            ["--provenance", "true", "-o", "type=docker,dest={d}"],
            "docker exporter does not currently support",
        ),
    ],
)
def test_refused_attributes_fail_before_the_build_in_one_line(
    cache: Path, ctx: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    dest = tmp_path / "out"
    proc = build(cache, ctx, *[a.replace("{d}", str(dest)) for a in args], check=False)
    assert message in one_error(proc)
    assert "RUN" not in proc.stderr  # refused before any step ran
    assert not dest.exists()


def test_type_image_attributes_apply_to_the_stored_image(cache: Path, ctx: Path, tmp_path: Path) -> None:
    build(cache, ctx, "-t", "attrs:zstd", "-o", "type=image,name=attrs:named,compression=zstd")
    for name in ("attrs:zstd", "attrs:named"):
        dest = tmp_path / f"{name.replace(':', '-')}.tar"
        run_cli("save", name, "-o", str(dest), cache=cache)
        layers = Archive(dest).manifest()["layers"]
        assert [m["mediaType"] for m in layers] == [OCI_LAYER_GZIP, OCI_LAYER_ZSTD]


def test_a_no_op_rebuild_with_attributes_is_not_replayed_as_the_plain_image(
    cache: Path, ctx: Path, tmp_path: Path
) -> None:
    build(cache, ctx, "-t", "attrs:replay", "-o", "type=image")
    build(cache, ctx, "-t", "attrs:replay", "-o", "type=image")  # replayed from its memo
    build(cache, ctx, "-t", "attrs:replay", "-o", "type=image,compression=zstd")
    run_cli("save", "attrs:replay", "-o", str(tmp_path / "r.tar"), cache=cache)
    layers = Archive(tmp_path / "r.tar").manifest()["layers"]
    assert [m["mediaType"] for m in layers] == [OCI_LAYER_GZIP, OCI_LAYER_ZSTD]


def test_platform_split_puts_the_tree_under_the_platform(cache: Path, ctx: Path, tmp_path: Path) -> None:
    from lamina.oci.image import host_platform

    split = str(host_platform()).replace("/", "_")
    build(cache, ctx, "-o", f"type=local,dest={tmp_path / 'l'},platform-split=true")
    assert (tmp_path / "l" / split / "hi").read_text() == "hi\n"
    build(cache, ctx, "-o", f"type=tar,dest={tmp_path / 't.tar'},platform-split=true")
    with tarfile.open(tmp_path / "t.tar") as tar:
        assert f"{split}/hi" in tar.getnames()


def _provenance(archive: Archive) -> tuple[Any, Any, Any]:
    """(index, attestation manifest descriptor, statement) of an archive with attestations."""
    entry = archive.index["manifests"][0]
    assert entry["mediaType"] == OCI_INDEX
    index = archive.doc(entry["digest"])
    image, attestation = index["manifests"]
    assert attestation["platform"] == {"architecture": "unknown", "os": "unknown"}
    assert attestation["annotations"] == {
        "vnd.docker.reference.digest": image["digest"],
        "vnd.docker.reference.type": "attestation-manifest",
    }
    layer = archive.doc(attestation["digest"])["layers"][0]
    assert layer["mediaType"] == "application/vnd.in-toto+json"
    assert layer["annotations"] == {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v1"}
    return index, attestation, archive.doc(layer["digest"])


def test_provenance_is_an_attestation_manifest_in_the_index(cache: Path, ctx: Path, tmp_path: Path) -> None:
    archive = oci(
        cache,
        ctx,
        tmp_path,
        ",name=attrs:prov,annotation-index.i=1,annotation-index-descriptor.d=2",
        "--provenance",
        "mode=min",
        "--build-arg",
        "V=2",
    )
    index, _, statement = _provenance(archive)
    assert index["annotations"] == {"i": "1"} and archive.index["manifests"][0]["annotations"]["d"] == "2"
    image = archive.manifest()
    assert index["manifests"][0]["platform"]["os"] == "linux"
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["subject"] == [
        {
            "name": "pkg:docker/attrs@prov?platform="
            + index["manifests"][0]["platform"]["os"]
            + "%2F"
            + index["manifests"][0]["platform"]["architecture"],
            "digest": {"sha256": index["manifests"][0]["digest"].split(":")[1]},
        }
    ]
    predicate = statement["predicate"]
    request = predicate["buildDefinition"]["externalParameters"]["request"]
    assert request["frontend"] == "dockerfile.v0" and "args" not in request  # min: build args dropped
    assert predicate["runDetails"]["metadata"]["buildkit_completeness"]["request"] is False
    deps = predicate["buildDefinition"]["resolvedDependencies"]
    assert deps[0]["uri"].startswith("pkg:docker/lamina-test/busybox@1.35?platform=")
    assert image["layers"][1]["mediaType"] == OCI_LAYER_GZIP
    maximal = oci(cache, ctx, tmp_path / "max", "", "--attest", "type=provenance", "--build-arg", "V=2")
    predicate = _provenance(maximal)[2]["predicate"]
    assert predicate["buildDefinition"]["externalParameters"]["request"]["args"] == {"build-arg:V": "2"}
    assert (
        predicate["runDetails"]["metadata"]["buildkit_metadata"]["source"]["infos"][0]["filename"]
        == "Dockerfile"
    )
    artifact = oci(cache, ctx, tmp_path / "artifact", ",oci-artifact=true", "--provenance", "mode=min")
    index = artifact.doc(artifact.index["manifests"][0]["digest"])
    image, attestation = index["manifests"]
    document = artifact.doc(attestation["digest"])
    assert document["artifactType"] == "application/vnd.docker.attestation.manifest.v1+json"
    assert document["subject"] == {k: image[k] for k in ("mediaType", "digest", "size")}
    assert document["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert artifact.blob(document["config"]["digest"]) == b"{}"
    plain = oci(cache, ctx, tmp_path / "none", "", "--provenance", "false", "--sbom", "false")
    assert plain.index["manifests"][0]["mediaType"] == OCI_MANIFEST


def test_provenance_in_a_filesystem_output_is_provenance_json(cache: Path, ctx: Path, tmp_path: Path) -> None:
    import hashlib

    dest = tmp_path / "local"
    build(cache, ctx, "--provenance", "mode=min", "-o", f"type=local,dest={dest}")
    statement_file = dest / "provenance.json"
    assert statement_file.stat().st_mode & 0o777 == 0o600
    statement = json.loads(statement_file.read_text())
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["hi"] == hashlib.sha256(b"hi\n").hexdigest()
    assert "bin/busybox" in subjects and "provenance.json" not in subjects
    prefixed = f"type=local,dest={tmp_path / 'p'},attestation-prefix=att."
    build(cache, ctx, "--provenance", "true", "-o", prefixed)
    assert json.loads((tmp_path / "p" / "att.provenance.json").read_text())["subject"]
    build(cache, ctx, "--provenance", "true", "-o", f"type=tar,dest={tmp_path / 'r.tar'}")
    with tarfile.open(tmp_path / "r.tar") as tar:
        member = tar.getmember("provenance.json")
        assert member.mode == 0o600
        data = tar.extractfile(member)
        assert data is not None and json.loads(data.read())["subject"]


def _remote_manifest(ref: str) -> Any:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed")
    done = subprocess.run(
        [skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_type_registry_and_push_true_push_the_output_image(
    cache: Path, ctx: Path, registry: Any, tmp_path: Path
) -> None:
    host = registry.host
    build(cache, ctx, "-o", f"type=registry,name={host}/attrs/reg:1")
    assert [m["mediaType"] for m in _remote_manifest(f"{host}/attrs/reg:1")["layers"]] == [OCI_LAYER_GZIP] * 2
    proc = build(cache, ctx, "-o", f"type=image,name={host}/attrs/zstd:1,push=true,compression=zstd")
    assert f"pushed {host}/attrs/zstd:1@sha256:" in proc.stderr
    layers = _remote_manifest(f"{host}/attrs/zstd:1")["layers"]
    assert [m["mediaType"] for m in layers] == [OCI_LAYER_GZIP, OCI_LAYER_ZSTD]
    by_digest = build(cache, ctx, "-o", f"type=registry,name={host}/attrs/bydigest,push-by-digest=true")
    digest = by_digest.stderr.split(f"pushed {host}/attrs/bydigest@")[1].split()[0]
    assert _remote_manifest(f"{host}/attrs/bydigest@{digest}")["mediaType"] == OCI_MANIFEST
    import urllib.error
    import urllib.request

    try:  # pushed without a tag: this registry answers 404 for a repository with no tags
        with urllib.request.urlopen(f"http://{host}/v2/attrs/bydigest/tags/list", timeout=10) as answer:
            assert json.loads(answer.read()).get("tags") in ([], None)
    except urllib.error.HTTPError as err:
        assert err.code == 404
    meta = tmp_path / "meta.json"
    build(
        cache,
        ctx,
        "-t",
        f"{host}/attrs/prov:1",
        "--push",
        "--provenance",
        "mode=min",
        "--metadata-file",
        str(meta),
    )
    pushed = _remote_manifest(f"{host}/attrs/prov:1")
    document = json.loads(meta.read_text())  # BuildKit reports the index it pushed
    assert document["containerimage.digest"] == document["lamina.push"][0]["digest"]
    assert pushed["mediaType"] == OCI_INDEX and len(pushed["manifests"]) == 2
    assert pushed["manifests"][1]["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
    assert OCI_CONFIG  # the image manifest's config stays OCI's


def test_save_keeps_the_provenance_a_push_would_send(cache: Path, ctx: Path, tmp_path: Path) -> None:
    build(cache, ctx, "-t", "attrs:saved", "--provenance", "mode=min")
    saved = tmp_path / "saved.tar"
    run_cli("save", "attrs:saved", "-o", str(saved), cache=cache)
    archive = Archive(saved)
    index, _, statement = _provenance(archive)
    assert statement["subject"][0]["digest"]["sha256"] == index["manifests"][0]["digest"].split(":")[1]
    assert archive.manifest()["layers"][1]["mediaType"] == OCI_LAYER_GZIP
