"""The registry client against scripted registries (httpx.MockTransport): auth, retries, verification."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from lamina.errors import DigestMismatch, ImageFormatError, RegistryError
from lamina.oci.auth import Credential
from lamina.oci.digest import Digest
from lamina.oci.image import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Platform,
)
from lamina.oci.reference import parse_reference
from lamina.oci.registry import RegistryClient, RemoteManifest, select_platform

Handler = Callable[[httpx.Request], httpx.Response]
REF = parse_reference("localhost:5000/x:1")
BLOB = b"layer bytes " * 1000
BLOB_DESC = Descriptor(OCI_LAYER_GZIP, Digest.of_bytes(BLOB), len(BLOB))


def manifest_bytes(media_type: str = OCI_MANIFEST) -> bytes:
    config = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": str(BLOB_DESC.digest),
        "size": 1,
    }
    layer = {"mediaType": OCI_LAYER_GZIP, "digest": str(BLOB_DESC.digest), "size": len(BLOB)}
    doc = {"schemaVersion": 2, "mediaType": media_type, "config": config, "layers": [layer]}
    return json.dumps(doc).encode()


def client(handler: Handler, sleeps: list[float] | None = None, **kwargs: object) -> RegistryClient:
    record = sleeps if sleeps is not None else []
    return RegistryClient(
        transport=httpx.MockTransport(handler),
        sleep=record.append,
        **kwargs,  # type: ignore[arg-type]
    )


def error_body(code: str, message: str) -> dict[str, object]:
    return {"errors": [{"code": code, "message": message, "detail": None}]}


def serve_manifest(data: bytes, media_type: str = OCI_MANIFEST) -> httpx.Response:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
    return httpx.Response(200, content=data, headers=headers)


# --- addressing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registry", "insecure", "url"),
    [
        ("ghcr.io", (), "https://ghcr.io/v2/"),
        ("docker.io", (), "https://registry-1.docker.io/v2/"),
        ("localhost:5000", (), "http://localhost:5000/v2/"),
        ("127.0.0.2:8080", (), "http://127.0.0.2:8080/v2/"),
        ("[::1]:5000", (), "http://[::1]:5000/v2/"),
        ("reg.lan:5000", ("reg.lan:5000",), "http://reg.lan:5000/v2/"),
        ("reg.lan:5000", ("reg.lan",), "http://reg.lan:5000/v2/"),
        ("reg.lan:5000", ("other.lan",), "https://reg.lan:5000/v2/"),
    ],
)
def test_https_unless_loopback_or_named_insecure(registry: str, insecure: tuple[str, ...], url: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    with client(handler, insecure_registries=insecure) as c:
        c.ping(registry)
    assert seen == [url]


# --- auth --------------------------------------------------------------------------


def bearer_registry(tokens: list[httpx.Request], *, want_user: tuple[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            tokens.append(request)
            if want_user is not None:
                expected = "Basic " + base64.b64encode(":".join(want_user).encode()).decode()
                if request.headers.get("Authorization") != expected:
                    return httpx.Response(401)
            return httpx.Response(200, json={"token": f"tok{len(tokens)}"})
        if request.headers.get("Authorization", "").startswith("Bearer tok"):
            return serve_manifest(manifest_bytes())
        challenge = 'Bearer realm="https://auth.example/token",service="reg",scope="repository:x:pull"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    return handler


def test_anonymous_bearer_token_is_fetched_once_and_reused() -> None:
    tokens: list[httpx.Request] = []
    with client(bearer_registry(tokens)) as c:
        c.get_manifest(REF)
        c.get_manifest(REF)
    assert len(tokens) == 1
    assert "Authorization" not in tokens[0].headers
    params = tokens[0].url.params
    assert params["service"] == "reg"
    assert params.get_list("scope") == ["repository:x:pull"]


def test_bearer_with_credentials_sends_basic_to_token_service() -> None:
    tokens: list[httpx.Request] = []
    handler = bearer_registry(tokens, want_user=("u", "p"))
    with client(handler, credentials=lambda reg: Credential("u", "p")) as c:
        assert c.get_manifest(REF).media_type == OCI_MANIFEST


def test_bearer_wrong_credentials_one_line() -> None:
    tokens: list[httpx.Request] = []
    handler = bearer_registry(tokens, want_user=("u", "p"))
    with (
        client(handler, credentials=lambda reg: Credential("u", "bad")) as c,
        pytest.raises(RegistryError) as info,
    ):
        c.get_manifest(REF)
    assert str(info.value) == "pull localhost:5000/x:1: token service refused the stored credentials (401)"


def test_identity_token_uses_oauth_refresh_grant() -> None:
    tokens: list[httpx.Request] = []
    with client(
        bearer_registry(tokens), credentials=lambda reg: Credential("<token>", "", "refresh-me")
    ) as c:
        c.get_manifest(REF)
    assert tokens[0].method == "POST"
    form = dict(x.split("=", 1) for x in tokens[0].content.decode().split("&"))
    assert form["grant_type"] == "refresh_token"
    assert form["refresh_token"] == "refresh-me"


def basic_registry(user: str, password: str) -> Handler:
    good = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") == good:
            return serve_manifest(manifest_bytes())
        return httpx.Response(
            401,
            headers={"WWW-Authenticate": 'Basic realm="reg"'},
            json=error_body("UNAUTHORIZED", "authentication required"),
        )

    return handler


def test_basic_auth() -> None:
    with client(basic_registry("u", "p"), credentials=lambda reg: Credential("u", "p")) as c:
        c.get_manifest(REF)


def test_basic_auth_wrong_password() -> None:
    creds = lambda reg: Credential("u", "wrong")  # noqa: E731
    with client(basic_registry("u", "p"), credentials=creds) as c, pytest.raises(RegistryError) as info:
        c.get_manifest(REF)
    assert (
        str(info.value) == "pull localhost:5000/x:1: the credentials for localhost:5000 were rejected (401)"
    )


def test_basic_auth_without_credentials_suggests_login() -> None:
    with client(basic_registry("u", "p")) as c, pytest.raises(RegistryError) as info:
        c.get_manifest(REF)
    assert "lamina login localhost:5000" in str(info.value)


# --- status errors and retries -----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (404, error_body("MANIFEST_UNKNOWN", "manifest unknown"), "manifest unknown (404)"),
        (403, error_body("DENIED", "requested access to the resource is denied"), "denied (403)"),
        (403, {}, "denied: forbidden (403)"),
        (400, error_body("NAME_INVALID", "invalid repository name"), "invalid repository name (400)"),
    ],
)
def test_status_errors_are_one_line_naming_the_reference(
    status: int, body: dict[str, object], message: str
) -> None:
    with client(lambda request: httpx.Response(status, json=body)) as c, pytest.raises(RegistryError) as info:
        c.get_manifest(REF)
    text = str(info.value)
    assert text.startswith("pull localhost:5000/x:1: ")
    assert text.endswith(message)
    assert "\n" not in text


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_status_is_retried_with_backoff(status: int) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return serve_manifest(manifest_bytes()) if len(calls) == 3 else httpx.Response(status)

    sleeps: list[float] = []
    with client(handler, sleeps, backoff=0.5) as c:
        c.get_manifest(REF)
    assert sleeps == [0.5, 1.0]


def test_retry_after_is_honoured() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "3"})
        return serve_manifest(manifest_bytes())

    sleeps: list[float] = []
    with client(handler, sleeps) as c:
        c.get_manifest(REF)
    assert sleeps == [3.0]


def test_persistent_5xx_gives_up_after_retries() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503)

    with client(handler, retries=2) as c, pytest.raises(RegistryError) as info:
        c.get_manifest(REF)
    assert len(calls) == 3
    assert str(info.value) == "pull localhost:5000/x:1: service unavailable (503)"


def test_too_many_requests_message() -> None:
    with client(lambda r: httpx.Response(429), retries=0) as c, pytest.raises(RegistryError) as info:
        c.get_manifest(REF)
    assert str(info.value) == "pull localhost:5000/x:1: too many requests (429)"


def test_connection_refused_is_retried_then_one_line() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("[Errno 111] Connection refused")

    with client(handler, retries=1) as c, pytest.raises(RegistryError) as info:
        c.get_manifest(REF)
    assert len(calls) == 2
    assert str(info.value) == (
        "pull localhost:5000/x:1: cannot reach localhost:5000: [Errno 111] Connection refused"
    )


# --- manifests ---------------------------------------------------------------------


def test_manifest_accepts_oci_and_docker_types() -> None:
    accepts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        accepts.append(request.headers["Accept"])
        return serve_manifest(manifest_bytes(DOCKER_MANIFEST), DOCKER_MANIFEST)

    with client(handler) as c:
        assert c.get_manifest(REF).media_type == DOCKER_MANIFEST
    for media_type in (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, "manifest.list.v2+json"):
        assert media_type in accepts[0]


def test_pinned_digest_mismatch_is_refused() -> None:
    pinned = parse_reference(f"localhost:5000/x@sha256:{'0' * 64}")
    with client(lambda r: serve_manifest(manifest_bytes())) as c, pytest.raises(DigestMismatch) as info:
        c.get_manifest(pinned)
    assert "not the pinned digest" in str(info.value)


def test_registry_digest_header_must_match_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            content=manifest_bytes(),
            headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": f"sha256:{'1' * 64}"},
        )

    with client(handler) as c, pytest.raises(DigestMismatch):
        c.get_manifest(REF)


def test_oversized_manifest_is_refused() -> None:
    big = b"{" + b" " * (5 * 1024 * 1024) + b"}"
    with client(lambda r: serve_manifest(big)) as c, pytest.raises(RegistryError) as info:
        c.get_manifest(REF)
    assert "larger than" in str(info.value)


def test_schema1_manifest_is_a_clear_error() -> None:
    data = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode()
    headers = {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
    served = client(lambda r: httpx.Response(200, content=data, headers=headers))
    with served as c, pytest.raises(RegistryError) as info:
        c.get_manifest(REF)
    assert "schema 1" in str(info.value)


def make_index(*platforms: tuple[str, str, str]) -> tuple[RemoteManifest, dict[str, bytes]]:
    children: dict[str, bytes] = {}
    entries = []
    for os_name, arch, variant in platforms:
        data = manifest_bytes().replace(b"}]}", b'}], "annotations": {"p": "%s"}}' % arch.encode())
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        children[digest] = data
        platform = {"os": os_name, "architecture": arch, **({"variant": variant} if variant else {})}
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data), "platform": platform})
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    return RemoteManifest(OCI_INDEX, Digest.of_bytes(data), data), children


@pytest.mark.parametrize(
    ("want", "picked"),
    [
        (Platform("amd64", "linux"), "amd64"),
        (Platform("arm64", "linux", "v8"), "arm64"),
        (Platform("arm", "linux", "v7"), "arm"),
    ],
)
def test_select_platform_from_index(want: Platform, picked: str) -> None:
    index, _ = make_index(("linux", "arm", "v6"), ("linux", "arm", "v7"), ("linux", "arm64", ""),
                                 ("linux", "amd64", ""))  # fmt: skip
    descriptor = select_platform(index, want, "pull x")
    assert descriptor.platform is not None
    assert descriptor.platform.architecture == picked
    assert descriptor.platform.variant == want.variant or picked == "arm64"


def test_select_platform_arm64_host_takes_an_entry_that_spells_out_v8() -> None:
    index, _ = make_index(("linux", "amd64", ""), ("linux", "arm64", "v8"))
    descriptor = select_platform(index, Platform(architecture="arm64", os="linux"), "pull x")
    assert descriptor.platform is not None and str(descriptor.platform) == "linux/arm64/v8"


def test_select_platform_missing_lists_what_is_there() -> None:
    index, _ = make_index(("linux", "arm64", ""), ("linux", "s390x", ""))
    with pytest.raises(RegistryError) as info:
        select_platform(index, Platform("amd64", "linux"), "pull x")
    assert (
        str(info.value) == "pull x: no image for linux/amd64 in the index (it has linux/arm64, linux/s390x)"
    )


def test_resolve_follows_index_to_platform_manifest() -> None:
    index, children = make_index(("linux", "arm64", ""), ("linux", "amd64", ""))

    def handler(request: httpx.Request) -> httpx.Response:
        tail = request.url.path.rsplit("/", 1)[1]
        if tail == "1":
            return serve_manifest(index.data, OCI_INDEX)
        return serve_manifest(children[tail])

    with client(handler) as c:
        resolved = c.resolve(REF, Platform("amd64", "linux"))
    assert resolved.index is not None and resolved.index.digest == index.digest
    assert b'"p": "amd64"' in resolved.manifest.data


def test_malformed_index_is_a_format_error_naming_the_reference() -> None:
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{"size": -1}]}).encode()
    with client(lambda r: serve_manifest(data, OCI_INDEX)) as c, pytest.raises(ImageFormatError) as info:
        c.resolve(REF)
    assert str(info.value).startswith("pull localhost:5000/x:1: index")


# --- blobs -------------------------------------------------------------------------


class BrokenStream(httpx.SyncByteStream):
    """Sends `data[:cut]` and then fails like a dropped connection."""

    def __init__(self, data: bytes, cut: int) -> None:
        self.data, self.cut = data, cut

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: self.cut]
        raise httpx.ReadError("connection reset by peer")


def test_fetch_blob_resumes_with_range_after_a_dropped_connection() -> None:
    ranges: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("Range"))
        if len(ranges) == 1:
            return httpx.Response(200, stream=BrokenStream(BLOB, 5000))
        start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
        headers = {"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"}
        return httpx.Response(206, content=BLOB[start:], headers=headers)

    out = io.BytesIO()
    with client(handler) as c:
        c.fetch_blob(REF, BLOB_DESC, out)
    assert ranges == [None, "bytes=5000-"]
    assert out.getvalue() == BLOB


def test_fetch_blob_resume_when_registry_ignores_range() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(200, stream=BrokenStream(BLOB, 777))
        return httpx.Response(200, content=BLOB)  # the whole blob again

    out = io.BytesIO()
    with client(handler) as c:
        c.fetch_blob(REF, BLOB_DESC, out)
    assert out.getvalue() == BLOB


def test_fetch_blob_digest_mismatch() -> None:
    evil = BLOB[:-1] + b"!"
    with client(lambda r: httpx.Response(200, content=evil)) as c, pytest.raises(DigestMismatch) as info:
        c.fetch_blob(REF, BLOB_DESC, io.BytesIO())
    assert str(BLOB_DESC.digest) in str(info.value)
    assert "hashes to" in str(info.value)


def test_fetch_blob_longer_than_declared_stops_early() -> None:
    with client(lambda r: httpx.Response(200, content=BLOB + b"extra")) as c, pytest.raises(DigestMismatch):
        c.fetch_blob(REF, BLOB_DESC, io.BytesIO())


def test_fetch_blob_shorter_than_declared() -> None:
    with (
        client(lambda r: httpx.Response(200, content=BLOB[:100])) as c,
        pytest.raises(DigestMismatch) as info,
    ):
        c.fetch_blob(REF, BLOB_DESC, io.BytesIO())
    assert f"got 100 bytes, the manifest declares {len(BLOB)}" in str(info.value)


class UploadRegistry:
    """Just enough of the upload protocol to check what the client sends."""

    def __init__(self, *, has_blob: bool = False, mountable: bool = False) -> None:
        self.has_blob, self.mountable = has_blob, mountable
        self.received = b""
        self.log: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, query = request.url.path, request.url.params
        self.log.append(f"{request.method} {path}{'?' + str(query) if query else ''}")
        if request.method == "HEAD":
            return httpx.Response(200 if self.has_blob else 404)
        if request.method == "POST":
            if "mount" in query and self.mountable:
                return httpx.Response(201)
            return httpx.Response(202, headers={"Location": "/v2/x/blobs/uploads/u1?_state=s0"})
        if request.method == "PATCH":
            start, end = map(int, request.headers["Content-Range"].split("-"))
            assert start == len(self.received)
            self.received += request.read()
            assert end == len(self.received) - 1
            return httpx.Response(202, headers={"Location": f"/v2/x/blobs/uploads/u1?_state=s{end}"})
        if request.method == "PUT":
            self.received += request.read()
            digest = query["digest"]
            if "sha256:" + hashlib.sha256(self.received).hexdigest() != digest:
                return httpx.Response(400, json=error_body("DIGEST_INVALID", "provided digest did not match"))
            return httpx.Response(201, headers={"Docker-Content-Digest": digest})
        return httpx.Response(405)


def test_push_blob_monolithic() -> None:
    registry = UploadRegistry()
    with client(registry) as c:
        assert c.push_blob(REF, BLOB_DESC, lambda: io.BytesIO(BLOB)) == "uploaded"
    assert registry.received == BLOB
    assert [line.split("?")[0] for line in registry.log] == [
        f"HEAD /v2/x/blobs/{BLOB_DESC.digest}",
        "POST /v2/x/blobs/uploads/",
        "PUT /v2/x/blobs/uploads/u1",
    ]
    assert "_state=s0" in registry.log[-1]


def test_push_blob_chunked_patches_in_order() -> None:
    registry = UploadRegistry()
    with client(registry) as c:
        assert c.push_blob(REF, BLOB_DESC, lambda: io.BytesIO(BLOB), chunk_size=5000) == "uploaded"
    assert registry.received == BLOB
    methods = [line.split()[0] for line in registry.log]
    assert methods == ["HEAD", "POST", "PATCH", "PATCH", "PATCH", "PUT"]


def test_push_blob_skips_existing() -> None:
    registry = UploadRegistry(has_blob=True)
    with client(registry) as c:
        assert c.push_blob(REF, BLOB_DESC, lambda: io.BytesIO(b"never read")) == "exists"
    assert len(registry.log) == 1


def test_push_blob_mounts_from_another_repository() -> None:
    registry = UploadRegistry(mountable=True)
    with client(registry) as c:
        assert c.push_blob(REF, BLOB_DESC, lambda: io.BytesIO(b""), mount_from=["base/img"]) == "mounted"
    last = httpx.URL(registry.log[-1].split()[1])
    assert last.path == "/v2/x/blobs/uploads/"
    assert (last.params["mount"], last.params["from"]) == (str(BLOB_DESC.digest), "base/img")


def test_push_blob_failed_mount_uploads_through_its_session() -> None:
    registry = UploadRegistry()
    with client(registry) as c:
        assert c.push_blob(REF, BLOB_DESC, lambda: io.BytesIO(BLOB), mount_from=["base/img"]) == "uploaded"
    assert [line.split()[0] for line in registry.log] == ["HEAD", "POST", "PUT"]


def test_push_blob_wrong_bytes_rejected_by_registry() -> None:
    registry = UploadRegistry()
    with client(registry) as c, pytest.raises(RegistryError) as info:
        c.push_blob(REF, BLOB_DESC, lambda: io.BytesIO(BLOB[:-1] + b"?"))
    assert str(info.value) == (
        f"push localhost:5000/x:1: blob {BLOB_DESC.digest.short}: provided digest did not match (400)"
    )


def test_push_blob_retries_whole_upload_after_a_5xx() -> None:
    registry = UploadRegistry()
    failures = [1]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and failures:
            failures.pop()
            request.read()
            return httpx.Response(503)
        return registry(request)

    with client(handler) as c:
        assert c.push_blob(REF, BLOB_DESC, lambda: io.BytesIO(BLOB)) == "uploaded"
    assert registry.received == BLOB
    assert [line.split()[0] for line in registry.log] == ["HEAD", "POST", "POST", "PUT"]


def test_put_manifest_sends_exact_bytes_and_type() -> None:
    data = manifest_bytes()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        digest = "sha256:" + hashlib.sha256(request.read()).hexdigest()
        return httpx.Response(201, headers={"Docker-Content-Digest": digest})

    manifest = RemoteManifest(OCI_MANIFEST, Digest.of_bytes(data), data)
    with client(handler) as c:
        assert c.put_manifest(REF, manifest) == manifest.digest
    assert seen[0].content == data
    assert seen[0].headers["Content-Type"] == OCI_MANIFEST
    assert seen[0].url.path == "/v2/x/manifests/1"


def test_expired_token_is_renewed_once() -> None:
    tokens: list[str] = []
    uses = {"tok1": 1, "tok2": 99}  # the first token expires after one request

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            tokens.append(f"tok{len(tokens) + 1}")
            return httpx.Response(200, json={"access_token": tokens[-1]})
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if uses.get(token, 0) > 0:
            uses[token] -= 1
            return serve_manifest(manifest_bytes())
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/t"'})

    with client(handler) as c:
        c.get_manifest(REF)
        c.get_manifest(REF)
    assert tokens == ["tok1", "tok2"]


def test_challenge_with_several_scopes_asks_for_each() -> None:
    asked: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            asked.append(request.url.params.get_list("scope"))
            return httpx.Response(200, json={"token": "t"})
        if request.headers.get("Authorization") == "Bearer t":
            return httpx.Response(404 if request.method == "HEAD" else 201)
        challenge = (
            'Bearer realm="https://auth.example/t",scope="repository:x:pull,push repository:base:pull"'
        )
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    with client(handler) as c:
        assert c.push_blob(REF, BLOB_DESC, lambda: io.BytesIO(b""), mount_from=["base"]) == "mounted"
    assert "repository:base:pull" in asked[-1] and "repository:x:pull,push" in asked[-1]


def test_upload_resent_after_401_starts_from_the_first_byte() -> None:
    registry = UploadRegistry()
    put_401 = [1]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and put_401:
            put_401.pop()
            request.read()
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return registry(request)

    with client(handler, credentials=lambda reg: Credential("u", "p")) as c:
        assert c.push_blob(REF, BLOB_DESC, lambda: io.BytesIO(BLOB)) == "uploaded"
    assert registry.received == BLOB


def test_manifest_without_media_type_is_recognised_by_shape() -> None:
    doc = json.loads(manifest_bytes())
    del doc["mediaType"]
    data = json.dumps(doc).encode()
    with client(
        lambda r: httpx.Response(200, content=data, headers={"Content-Type": "application/json"})
    ) as c:
        assert c.get_manifest(REF).media_type == OCI_MANIFEST


def test_huge_error_body_is_not_read_whole() -> None:
    served: list[int] = []

    class Endless(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            for _ in range(10_000):  # 640 MB if anyone read it all
                served.append(1)
                yield b"x" * 65536

    with client(lambda r: httpx.Response(404, stream=Endless())) as c, pytest.raises(RegistryError) as info:
        c.get_manifest(REF)
    assert str(info.value) == "pull localhost:5000/x:1: not found (404)"
    assert len(served) < 10
