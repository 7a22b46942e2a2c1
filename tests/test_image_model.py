"""OCI documents: canonical bytes, round trips, schema validity, ChainID, the schema's blind spots."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import ImageFormatError
from lamina.oci.digest import Digest
from lamina.oci.image import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    ContainerConfig,
    Descriptor,
    Healthcheck,
    History,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    canonical_json,
    chain_id,
    chain_ids,
    default_config,
    descriptor_of,
    format_time,
)
from lamina.oci.validate import config_problems
from tests.support import schema

EXAMPLES = Path("/work/shared/conformance/oci-image-spec/examples")
needs_schemas = pytest.mark.skipif(not schema.available(), reason="conformance schemas not found")

D1 = Digest.of_bytes(b"one")
D2 = Digest.of_bytes(b"two")


def _config() -> ImageConfig:
    return ImageConfig(
        created="2024-01-01T00:00:00Z",
        config=ContainerConfig(
            user="app",
            exposed_ports=("443/tcp", "80/tcp"),
            env=("PATH=/bin", "A=<&>"),
            entrypoint=("/bin/sh", "-c"),
            cmd=(),
            volumes=("/data",),
            working_dir="/srv",
            labels=(("a", "1"), ("b", "2")),
            stop_signal="SIGTERM",
            healthcheck=Healthcheck(("CMD", "true"), interval=30_000_000_000, retries=3),
            on_build=("RUN true",),
            shell=("/bin/sh", "-c"),
        ),
        diff_ids=(D1, D2),
        history=(History("2024-01-01T00:00:00Z", "RUN x"), History(created_by="ENV y", empty_layer=True)),
    )


def test_canonical_json_is_go_style() -> None:
    assert canonical_json({"b": "<a&b>", "a": 1}) == b'{"b":"\\u003ca\\u0026b\\u003e","a":1}'
    assert canonical_json({"x": "é\u2028"}) == '{"x":"é\\u2028"}'.encode()


def test_config_keeps_go_field_order_and_sorts_maps() -> None:
    config = _config()
    shuffled = dataclasses.replace(
        config.config, labels=(("b", "2"), ("a", "1")), exposed_ports=("80/tcp", "443/tcp")
    )
    obj = json.loads(dataclasses.replace(config, config=shuffled).to_bytes())
    assert list(obj) == ["created", "architecture", "os", "config", "rootfs", "history"]
    cfg = obj["config"]
    assert list(cfg) == [
        "User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir",
        "Labels", "StopSignal", "Healthcheck", "OnBuild", "Shell",
    ]  # fmt: skip
    assert list(cfg["Labels"]) == ["a", "b"]
    assert list(cfg["ExposedPorts"]) == ["443/tcp", "80/tcp"]
    assert cfg["Cmd"] == []  # set-to-empty survives, unlike unset


def test_config_round_trip() -> None:
    config = _config()
    again = ImageConfig.from_bytes(config.to_bytes())
    assert again == config
    assert again.to_bytes() == config.to_bytes()


def test_config_of_a_platform_with_an_os_version_keeps_it_where_go_writes_it() -> None:
    config = dataclasses.replace(
        _config(), architecture="amd64", os="windows", os_version="10.0.17763.1234", variant="v2"
    )
    obj = json.loads(config.to_bytes())
    assert list(obj)[:5] == [
        "created",
        "architecture",
        "os",
        "os.version",
        "variant",
    ]  # ocispec.Platform's order
    again = ImageConfig.from_bytes(config.to_bytes())
    assert again == config and str(again.platform) == "windows/amd64/v2"
    assert again.platform.os_version == "10.0.17763.1234"


def test_unset_and_empty_cmd_differ() -> None:
    unset = ImageConfig.from_bytes(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}')
    assert unset.config.cmd is None
    empty = ImageConfig.from_bytes(b'{"os":"linux","config":{"Cmd":[]},"rootfs":{"type":"layers"}}')
    assert empty.config.cmd == ()


def test_manifest_and_index_round_trip() -> None:
    manifest = Manifest(
        Descriptor(OCI_CONFIG, D1, 10),
        (Descriptor(OCI_LAYER_GZIP, D2, 20, annotations=(("k", "v"),)),),
        annotations=(("org.opencontainers.image.created", "2024-01-01T00:00:00Z"),),
    )
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest
    data = manifest.to_bytes()
    assert data.startswith(b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"')
    index = Index((descriptor_of(data, OCI_MANIFEST).replace_annotations({"b": "1", "a": "2"}),))
    index = Index(
        (Descriptor(OCI_MANIFEST, D1, 5, index.manifests[0].annotations, Platform("arm64", "linux", "v8")),)
    )
    assert Index.from_bytes(index.to_bytes()) == index
    assert b'"platform":{"architecture":"arm64","os":"linux","variant":"v8"}' in index.to_bytes()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"schemaVersion":1,"config":{},"layers":[]}', "schemaVersion"),
        (b"[]", "not a JSON object"),
        (b"{", "not valid JSON"),
        (b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:XYZ","size":1}}', "invalid"),
        (
            b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"' + str(D1).encode() + b'","size":-1}}',
            "size",
        ),
        (
            b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"'
            + str(D1).encode()
            + b'","size":true}}',
            "type",
        ),
        (
            b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}',
            "not an image manifest",
        ),
    ],
)
def test_bad_manifests_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageFormatError, match=message):
        Manifest.from_bytes(data)


def test_oversized_document_is_refused_unparsed() -> None:
    with pytest.raises(ImageFormatError, match="more than"):
        Manifest.from_bytes(b" " * (4 * 1024 * 1024 + 1))


def test_config_without_layers_rootfs_is_refused() -> None:
    with pytest.raises(ImageFormatError, match=r"rootfs\.type"):
        ImageConfig.from_bytes(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"other"}}')


def test_chain_id() -> None:
    assert chain_id([]) is None
    assert chain_id([D1]) == D1
    second = Digest.of_bytes(f"{D1} {D2}".encode())
    assert chain_ids([D1, D2]) == (D1, second)
    assert chain_id([D1, D2, D1]) == Digest.of_bytes(f"{second} {D1}".encode())


def test_default_config_is_buildkit_scratch() -> None:
    config = default_config(Platform("arm64", "linux", "v8"))
    obj = json.loads(config.to_bytes())
    assert obj["architecture"] == "arm64" and obj["variant"] == "v8"
    assert obj["config"] == {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "WorkingDir": "/",
    }
    assert obj["rootfs"] == {"type": "layers", "diff_ids": []}


def test_media_types_and_compressions() -> None:
    from lamina.errors import LayerError
    from lamina.oci.compression import Compression

    assert Compression.ZSTD.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    docker_gzip = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert Compression.GZIP.docker_media_type == docker_gzip
    assert Compression.from_media_type(docker_gzip) is Compression.GZIP
    nondistributable = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
    assert Compression.from_media_type(nondistributable) is Compression.ZSTD
    with pytest.raises(LayerError, match="unsupported layer media type"):
        Compression.from_media_type(OCI_CONFIG)


def test_format_time() -> None:
    assert format_time(1704067200) == "2024-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"created": "yesterday"}, "RFC 3339"),
        ({"config": {"Env": ["NOEQUALS"]}}, "Env entry"),
        ({"history": [{"created": "2024-13-01T00:00:00Z"}]}, "history 0"),
        ({"architecture": ""}, "architecture and os"),
    ],
)
def test_config_rules_the_schema_misses(config: dict[str, object], problem: str) -> None:
    doc = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}, **config}
    problems = config_problems(json.dumps(doc).encode())
    assert any(problem in p for p in problems), problems


def test_good_config_has_no_problems() -> None:
    assert config_problems(_config().to_bytes()) == []


# --- schema validation --------------------------------------------------------------


@needs_schemas
@pytest.mark.parametrize(
    "row",
    list(csv.DictReader((EXAMPLES / "index.tsv").open(), delimiter="\t")) if EXAMPLES.is_dir() else [],
    ids=lambda row: row["file"],
)
def test_schema_setup_accepts_the_spec_examples(row: dict[str, str]) -> None:
    schema.check_document((EXAMPLES / row["file"]).read_bytes(), row["mediatype"])


@needs_schemas
def test_documents_lamina_writes_are_schema_valid() -> None:
    config = _config().to_bytes()
    schema.check_document(config, OCI_CONFIG)
    manifest = Manifest(descriptor_of(config, OCI_CONFIG), (Descriptor(OCI_LAYER_GZIP, D1, 3),)).to_bytes()
    schema.check_document(manifest, OCI_MANIFEST)
    index = Index((descriptor_of(manifest, OCI_MANIFEST).replace_annotations({"a": "b"}),)).to_bytes()
    schema.check_document(index, OCI_INDEX)
    schema.check_document(default_config().to_bytes(), OCI_CONFIG)


@needs_schemas
def test_schema_rejects_what_it_should() -> None:
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        schema.check_document({"schemaVersion": 1, "config": {}, "layers": []}, OCI_MANIFEST)
    with pytest.raises(jsonschema.ValidationError):
        schema.check_document({"architecture": "amd64", "os": "linux"}, OCI_CONFIG)


# --- property: any config survives a round trip -------------------------------------

_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)


@given(
    env=st.lists(
        st.builds(lambda k, v: f"{k}={v}", st.text("ABC_", min_size=1, max_size=5), _text), max_size=4
    ),
    cmd=st.none() | st.lists(_text, max_size=3).map(tuple),
    labels=st.dictionaries(_text, _text, max_size=3),
    user=_text,
)
def test_container_config_round_trips(
    env: list[str], cmd: tuple[str, ...] | None, labels: dict[str, str], user: str
) -> None:
    config = ImageConfig(
        config=ContainerConfig(user=user, env=tuple(env), cmd=cmd, labels=tuple(sorted(labels.items())))
    )
    data = config.to_bytes()
    assert ImageConfig.from_bytes(data) == config
    assert ImageConfig.from_bytes(data).to_bytes() == data
