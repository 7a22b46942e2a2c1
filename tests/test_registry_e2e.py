"""lamina pull/push/login against Debian's docker-registry on 127.0.0.1, checked with skopeo.

Images get into the registry through skopeo (gzip and zstd layers, OCI and
Docker media types) and, for a two-platform index, through raw pushes of a
second config and an index. lamina pulls them into a fresh store and pushes
them back; skopeo must see the same digest lamina reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamina import api
from lamina.cache.store import Store
from lamina.cli import cli
from lamina.oci.digest import Digest
from lamina.oci.image import OCI_INDEX, Descriptor, ImageConfig, Manifest, Platform, canonical_json
from lamina.oci.reference import parse_reference
from lamina.oci.registry import RegistryClient, RemoteManifest
from tests import registry_server
from tests.support.registry import client_env, skopeo

pytestmark = [
    pytest.mark.skipif(registry_server.REGISTRY is None, reason="docker-registry is not installed"),
    pytest.mark.skipif(registry_server.SKOPEO is None, reason="skopeo is not installed"),
]

USER, PASSWORD = registry_server.USER, registry_server.PASSWORD


@pytest.fixture(scope="module")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry_server.Registry]:
    with registry_server.running_registry(tmp_path_factory.mktemp("open"), "none") as registry:
        yield registry


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry_server.Registry]:
    if registry_server.HTPASSWD is None:
        pytest.skip("htpasswd (apache2-utils) is not installed")
    with registry_server.running_registry(tmp_path_factory.mktemp("basic"), "basic") as registry:
        yield registry


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry_server.Registry]:
    if registry_server.OPENSSL is None:
        pytest.skip("openssl is not installed")
    with registry_server.running_registry(tmp_path_factory.mktemp("token"), "token") as registry:
        yield registry


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return client_env(tmp_path)


def skopeo_push(archive: Path, dest: str, *extra: str, creds: bool = False) -> None:
    auth = ["--dest-creds", f"{USER}:{PASSWORD}"] if creds else []
    skopeo(
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        *auth,
        *extra,
        f"oci-archive:{archive}",
        f"docker://{dest}",
    )


def remote_digest(ref: str, *, creds: bool = False) -> Digest:
    auth = ["--creds", f"{USER}:{PASSWORD}"] if creds else []
    raw = skopeo("inspect", "--raw", "--tls-verify=false", *auth, f"docker://{ref}")
    return Digest("sha256", hashlib.sha256(raw.encode()).hexdigest())


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> tuple[int, str]:
    """Exit code and what the user reads: stdout on success, stderr (the error line) on failure."""
    result = CliRunner().invoke(cli, list(args), env=env, input=stdin, catch_exceptions=False)
    return result.exit_code, result.stderr if result.exit_code else result.stdout


def assert_store_clean(cache: Path) -> None:
    """Nothing half-written: no temporary blob left, every blob hashes to its name."""
    blobs = cache / "blobs" / "sha256"
    if not blobs.exists():
        return
    for path in blobs.iterdir():
        assert not path.name.startswith(".tmp-"), f"half-written blob {path.name}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


def assert_pulled(env: dict[str, str], name: str, digest: Digest) -> None:
    with Store(env["LAMINA_CACHE"]) as store:
        record = store.resolve(name)
        assert record.manifest == digest
        manifest = Manifest.from_bytes(store.read_blob(digest, 1 << 22))
        for blob in (manifest.config, *manifest.layers):
            assert store.has_blob(blob.digest) and store.blob_size(blob.digest) == blob.size
        config = ImageConfig.from_bytes(store.read_blob(manifest.config.digest, 1 << 22))
        for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            record_ = store.layer(layer.digest)
            assert record_ is not None and record_.diff_id == diff_id
    assert_store_clean(Path(env["LAMINA_CACHE"]))


# --- pull -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("repo", "skopeo_args"),
    [
        ("oci-gzip", ()),
        ("oci-zstd", ("--dest-compress-format", "zstd")),
        ("docker-v2s2", ("--format", "v2s2")),
    ],
)
def test_pull_what_skopeo_pushed(
    open_registry: registry_server.Registry,
    busybox_image: Path,
    env: dict[str, str],
    repo: str,
    skopeo_args: tuple[str, ...],
) -> None:
    ref = f"{open_registry.host}/{repo}:1"
    skopeo_push(busybox_image, ref, *skopeo_args)
    expected = remote_digest(ref)
    code, out = run_cli(env, "pull", ref)
    assert code == 0, out
    assert str(expected) in out
    assert_pulled(env, ref, expected)
    # A second pull downloads nothing.
    code, out = run_cli(env, "pull", ref)
    assert code == 0 and "(0 blobs" in out


def test_pull_by_digest_verifies_and_names_the_digest(
    open_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str]
) -> None:
    tagged = f"{open_registry.host}/bydigest:1"
    skopeo_push(busybox_image, tagged)
    digest = remote_digest(tagged)
    pinned = f"{open_registry.host}/bydigest@{digest}"
    result = api.pull(pinned, environ=env)
    assert result.record.manifest == digest
    assert_pulled(env, pinned, digest)


def push_platform_index(registry: str, repo: str, busybox_image: Path) -> tuple[Digest, Digest, Digest]:
    """x:amd64 via skopeo, an arm64 twin (same layer, its own config), and an index of both."""
    skopeo_push(busybox_image, f"{registry}/{repo}:amd64", "--format", "oci")
    ref = parse_reference(f"{registry}/{repo}:multi")
    with RegistryClient() as client:
        amd = client.get_manifest(parse_reference(f"{registry}/{repo}:amd64"))
        manifest = Manifest.from_bytes(amd.data)
        config_bytes = _fetch(client, ref, manifest.config)
        arm_config = dataclasses.replace(
            ImageConfig.from_bytes(config_bytes), architecture="arm64", variant="v8"
        )
        arm_config_bytes = arm_config.to_bytes()
        arm_config_desc = Descriptor(manifest.config.media_type, Digest.of_bytes(arm_config_bytes),
                                     len(arm_config_bytes))  # fmt: skip
        client.push_blob(ref, arm_config_desc, lambda: _bytes_io(arm_config_bytes))
        arm = dataclasses.replace(manifest, config=arm_config_desc).to_bytes()
        arm_digest = Digest.of_bytes(arm)
        client.put_manifest(
            dataclasses.replace(ref, tag=None, digest=arm_digest),
            RemoteManifest(manifest.media_type, arm_digest, arm),
        )
        entries = [
            {"mediaType": amd.media_type, "digest": str(amd.digest), "size": len(amd.data),
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": manifest.media_type, "digest": str(arm_digest), "size": len(arm),
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        ]  # fmt: skip
        index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        index_digest = Digest.of_bytes(index)
        client.put_manifest(ref, RemoteManifest(OCI_INDEX, index_digest, index))
    return index_digest, amd.digest, arm_digest


def _fetch(client: RegistryClient, ref: object, blob: Descriptor) -> bytes:
    import io

    out = io.BytesIO()
    client.fetch_blob(ref, blob, out)  # type: ignore[arg-type]
    return out.getvalue()


def _bytes_io(data: bytes) -> object:
    import io

    return io.BytesIO(data)


def test_pull_index_chooses_platform(
    open_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str]
) -> None:
    index_digest, amd_digest, arm_digest = push_platform_index(open_registry.host, "multi", busybox_image)
    assert remote_digest(f"{open_registry.host}/multi:multi") == index_digest
    ref = f"{open_registry.host}/multi:multi"
    arm = api.pull(ref, platform="linux/arm64", environ=env)
    assert arm.manifest == arm_digest
    assert arm.index == arm.record.manifest == index_digest  # the name keeps the index
    amd = api.pull(ref, platform="linux/amd64", environ=env)
    assert amd.manifest == amd_digest and amd.record.manifest == index_digest
    # Both platforms are now under the one name, each run by its --platform.
    listed = {
        p: [r.manifest for r in api.images(platform=p, environ=env)] for p in ("linux/arm64", "linux/amd64")
    }
    assert listed == {"linux/arm64": [arm_digest], "linux/amd64": [amd_digest]}
    code, out = run_cli(env, "pull", "--platform", "linux/s390x", ref)
    assert code == 1
    assert (
        out
        == f"error: pull {ref}: no image for linux/s390x in the index (it has linux/amd64, linux/arm64/v8)\n"
    )


# --- push ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_push_then_skopeo_sees_the_same_digest(
    open_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str], chunked: bool
) -> None:
    api.load(busybox_image, name="local/app:1", environ=env)
    dest = f"{open_registry.host}/pushed-{'chunked' if chunked else 'mono'}:v1"
    args = ["push", "local/app:1", dest, *(["--chunk-size", "65536"] if chunked else [])]
    code, out = run_cli(env, *args)
    assert code == 0, out
    pushed = out.split("@", 1)[1].split()[0]
    assert remote_digest(dest) == Digest.parse(pushed)
    with Store(env["LAMINA_CACHE"]) as store:
        assert store.resolve("docker.io/local/app:1").manifest == Digest.parse(pushed)
    inspect = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{dest}"))
    assert inspect["Digest"] == pushed
    oci_dir = Path(env["HOME"]) / "copied"
    skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{dest}", f"oci:{oci_dir}:v1")
    assert (oci_dir / "index.json").exists()
    # Pushing again uploads nothing.
    code, out = run_cli(env, "push", "local/app:1", dest)
    assert code == 0 and "0 uploaded" in out


def test_push_mounts_blobs_from_a_pulled_repository(
    open_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str]
) -> None:
    source = f"{open_registry.host}/mount-src:1"
    skopeo_push(busybox_image, source)
    api.pull(source, environ=env)
    result = api.push(source, f"{open_registry.host}/mount-dst:1", environ=env)
    assert result.mounted == 2 and result.uploaded == 0
    assert remote_digest(f"{open_registry.host}/mount-dst:1") == result.digest


# --- auth -------------------------------------------------------------------------------


def test_basic_auth_login_pull_push_logout(
    basic_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str]
) -> None:
    host = basic_registry.host
    ref = f"{host}/private:1"
    skopeo_push(busybox_image, ref, creds=True)
    code, out = run_cli(env, "pull", ref)
    assert (code, out) == (
        1,
        f"error: pull {ref}: authentication required (401); run `lamina login {host}`\n",
    )
    code, out = run_cli(env, "login", host, "-u", USER, "--password-stdin", stdin="wrong\n")
    assert (code, out) == (1, f"error: login {host}: the credentials for {host} were rejected (401)\n")
    assert not Path(env["REGISTRY_AUTH_FILE"]).exists()
    code, out = run_cli(env, "login", host, "-u", USER, "--password-stdin", stdin=f"{PASSWORD}\n")
    assert code == 0, out
    code, out = run_cli(env, "pull", ref)
    assert code == 0, out
    code, out = run_cli(env, "push", ref, f"{host}/private-copy:2")
    assert code == 0, out
    assert remote_digest(f"{host}/private-copy:2", creds=True) == remote_digest(ref, creds=True)
    code, out = run_cli(env, "logout", host)
    assert code == 0
    code, out = run_cli(env, "pull", ref)
    assert code == 1


def test_wrong_credentials_in_auth_file(
    basic_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str]
) -> None:
    import base64

    host = basic_registry.host
    auth = base64.b64encode(f"{USER}:nope".encode()).decode()
    Path(env["REGISTRY_AUTH_FILE"]).write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    code, out = run_cli(env, "pull", f"{host}/whatever:1")
    assert (code, out) == (
        1,
        f"error: pull {host}/whatever:1: the credentials for {host} were rejected (401)\n",
    )
    assert_store_clean(Path(env["LAMINA_CACHE"]))


def test_token_auth_anonymous_pull_and_authenticated_push(
    token_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str]
) -> None:
    host = token_registry.host
    ref = f"{host}/tok:1"
    skopeo_push(busybox_image, ref, creds=True)
    code, out = run_cli(env, "pull", ref)  # anonymous token: pull allowed
    assert code == 0, out
    code, out = run_cli(env, "push", ref, f"{host}/tok-copy:1")  # anonymous token: push denied
    assert code == 1 and out.startswith(f"error: push {host}/tok-copy:1: ") and out.count("\n") == 1
    code, out = run_cli(env, "login", host, "-u", USER, "-p", "bad")
    assert (code, out) == (1, f"error: login {host}: token service refused the stored credentials (401)\n")
    code, out = run_cli(env, "login", host, "-u", USER, "-p", PASSWORD)
    assert code == 0, out
    code, out = run_cli(env, "push", ref, f"{host}/tok-copy:1")
    assert code == 0, out
    assert remote_digest(f"{host}/tok-copy:1", creds=True) == remote_digest(ref, creds=True)


# --- failures: one line, nothing half-written ---------------------------------------------


def test_missing_tag(open_registry: registry_server.Registry, env: dict[str, str]) -> None:
    ref = f"{open_registry.host}/nothing-here:nope"
    code, out = run_cli(env, "pull", ref)
    assert (code, out) == (1, f"error: pull {ref}: manifest unknown (404)\n")
    assert_store_clean(Path(env["LAMINA_CACHE"]))


def test_registry_down(env: dict[str, str]) -> None:
    port = registry_server.free_port()
    ref = f"127.0.0.1:{port}/x:1"
    code, out = run_cli(env, "pull", ref)
    assert code == 1
    assert out.startswith(f"error: pull {ref}: cannot reach 127.0.0.1:{port}: ")
    assert out.count("\n") == 1


def test_push_of_unknown_image(env: dict[str, str]) -> None:
    code, out = run_cli(env, "push", "never/built:1", "127.0.0.1:1/x:1")
    assert (code, out) == (1, "error: image never/built:1 is not in the store (see `lamina images`)\n")


@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[registry_server.Registry]:
    """A registry of its own, for tests that damage its storage (blobs are shared across repositories)."""
    with registry_server.running_registry(tmp_path / "private-registry", "none") as registry:
        yield registry


def test_corrupted_blob_in_registry_is_refused(
    private_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str]
) -> None:
    open_registry = private_registry
    ref = f"{open_registry.host}/corrupt:1"
    skopeo_push(busybox_image, ref)
    with RegistryClient() as client:
        manifest = Manifest.from_bytes(client.get_manifest(parse_reference(ref)).data)
    layer = manifest.layers[0].digest
    data = open_registry.storage / "docker/registry/v2/blobs/sha256" / layer.hex[:2] / layer.hex / "data"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    code, out = run_cli(env, "pull", ref)
    assert code == 1
    assert (
        out
        == f"error: pull {open_registry.host}/corrupt@{layer}: content hashes to "
        + out.split("hashes to ")[1]
    )
    assert out.count("\n") == 1
    with Store(env["LAMINA_CACHE"]) as store:
        assert not store.has_blob(layer)
        assert store.images() == ()
    assert_store_clean(Path(env["LAMINA_CACHE"]))


def test_host_platform_is_used_by_default() -> None:
    from lamina.oci.registry import host_platform

    platform = host_platform()
    assert isinstance(platform, Platform) and platform.os == "linux" and platform.architecture


def test_build_from_registry_image_then_push(
    open_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str], tmp_path: Path
) -> None:
    base = f"{open_registry.host}/base-for-build:1"
    skopeo_push(busybox_image, base)
    context = tmp_path / "context"
    context.mkdir()
    (context / "hello.txt").write_text("hello from the context\n")
    (context / "Dockerfile").write_text(f"FROM {base}\nCOPY hello.txt /hello.txt\nENV GREETING=hi\n")
    result = api.build(context, tags=["built/app:1"], environ=env, cache_dir=env["LAMINA_CACHE"])
    with Store(env["LAMINA_CACHE"]) as store:
        assert store.resolve(base).manifest == remote_digest(base)  # FROM pulled the base into the store
    dest = f"{open_registry.host}/built/app:1"
    code, out = run_cli(env, "push", "built/app:1", dest)
    assert code == 0, out
    pushed = Digest.parse(out.split("@", 1)[1].split()[0])
    assert remote_digest(dest) == pushed
    inspect = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{dest}"))
    assert inspect["Digest"] == str(pushed)
    assert "GREETING=hi" in inspect["Env"]
    assert len(inspect["Layers"]) == 2
    oci_dir = tmp_path / "copied"
    skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{dest}", f"oci:{oci_dir}:1")
    assert result is not None


def test_ensure_image_uses_the_stored_copy_unless_asked(
    open_registry: registry_server.Registry, busybox_image: Path, env: dict[str, str]
) -> None:
    from lamina.cache.transfer import ensure_image
    from lamina.errors import ImageNotFound

    ref = parse_reference(f"{open_registry.host}/ensure:1")
    skopeo_push(busybox_image, str(ref))
    made: list[int] = []

    def factory() -> RegistryClient:
        made.append(1)
        return RegistryClient()

    with Store(env["LAMINA_CACHE"]) as store:
        with pytest.raises(ImageNotFound):
            ensure_image(factory, store, ref, "never")
        first = ensure_image(factory, store, ref, "missing")
        assert made == [1]
        assert ensure_image(factory, store, ref, "missing") == first
        assert made == [1]  # stored: no client, no connection
        assert ensure_image(factory, store, ref, "always").manifest == first.manifest
        assert made == [1, 1]
