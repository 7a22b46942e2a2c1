"""A client of the OCI distribution API: resolve, fetch and push manifests and blobs.

`RegistryClient` is a context manager around one `httpx.Client`; its
transport is a constructor argument, so tests hand it an
`httpx.MockTransport` and no network is touched.

What it guarantees:
  - HTTPS with TLS verification, except plain HTTP for loopback hosts and
    the hosts named in `insecure_registries` (as docker's
    `--insecure-registry`: a host you named, not a fallback on TLS failure).
  - Auth follows the registry's 401 challenge: Bearer tokens (anonymous,
    with user/password, or with an identity token) and Basic. Tokens are
    cached per scope and fetched up front once the registry's challenge is
    known, so a pull costs one 401, not one per blob.
  - 429, 5xx and connection failures are retried with exponential backoff
    (honouring a short `Retry-After`); anything else fails at once with one
    line naming the operation and reference:
    `pull localhost:5000/x:1: manifest unknown (404)`.
  - Manifests are read with a size cap and checked against the digest that
    pinned them; blobs stream to a caller's file while being hashed and
    counted, resume with `Range` after a broken connection, and a digest or
    size mismatch is an error, never a silent success. The caller owns the
    file, so it decides how a verified blob becomes visible (atomically).
  - Uploads check for the blob first, try a cross-repository mount, then
    upload monolithically (POST, PUT) or in chunks (POST, PATCH..., PUT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO, Protocol

from lamina.errors import DigestMismatch, RegistryError
from lamina.oci.auth import Challenge, Credential, parse_challenges
from lamina.oci.digest import Digest
from lamina.oci.image import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    host_platform,
    match_platform,
    platforms_of,
)
from lamina.oci.reference import DOCKER_HUB, DOCKER_HUB_API, Reference

if TYPE_CHECKING:
    import httpx

DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
_ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST))

MAX_MANIFEST = 4 * 1024 * 1024  # distribution's own limit for a manifest body
CHUNK = 1024 * 1024
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_CONNECT_ATTEMPTS = 3
_MAX_ERROR_BODY = 64 * 1024  # an error body is a sentence or two; read no more
_MAX_TOKEN_BODY = 1024 * 1024
_MAX_RETRY_AFTER = 30.0  # seconds; a longer Retry-After is a failure, not a wait


class Sink(Protocol):
    """Where a fetched blob goes: anything with write() (a file, the store's BlobWriter)."""

    def write(self, data: bytes, /) -> object: ...


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteManifest:
    """A manifest or index as the registry served it: exact bytes, their digest and media type."""

    media_type: str
    digest: Digest
    data: bytes

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    """The outcome of resolving a reference for a platform: the image manifest and the index it came from."""

    reference: Reference
    manifest: RemoteManifest
    index: RemoteManifest | None = None


def is_loopback(registry: str) -> bool:
    hostname = _hostname(registry)
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def select_platform(index: RemoteManifest, want: Platform, what: str) -> Descriptor:
    """The descriptor in `index` for platform `want` (lamina.oci.image.match_platform)."""
    entries = Index.from_bytes(index.data, f"{what}: index {index.digest.short}").manifests
    found = match_platform(entries, want)
    if found is None:
        raise RegistryError(f"{what}: no image for {want} in the index (it has {platforms_of(entries)})")
    return found


def parse_manifest(manifest: RemoteManifest, what: str) -> Manifest:
    """The image manifest's config and layer descriptors; ImageFormatError names `what` if malformed."""
    return Manifest.from_bytes(manifest.data, f"{what}: manifest {manifest.digest.short}")


def _hostname(registry: str) -> str:
    if registry.startswith("["):
        return registry[1 : registry.index("]")]
    return registry.rsplit(":", 1)[0] if ":" in registry else registry


class RegistryClient:
    """Talks to any number of registries; safe to share between threads."""

    def __init__(
        self,
        *,
        credentials: Callable[[str], Credential | None] = lambda registry: None,
        insecure_registries: Collection[str] = (),
        transport: httpx.BaseTransport | None = None,
        retries: int = 4,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        timeout: float = 60.0,
        user_agent: str = "lamina",
    ) -> None:
        import httpx

        self._credentials = credentials
        self._insecure = frozenset(insecure_registries)
        self._retries = retries
        self._backoff = backoff
        self._sleep = sleep
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,  # blob GETs redirect to storage; httpx drops Authorization cross-origin
            headers={"User-Agent": user_agent},
        )
        self._lock = threading.Lock()
        self._challenge: dict[str, Challenge] = {}  # registry -> the challenge it answered with
        self._tokens: dict[tuple[str, tuple[str, ...]], str] = {}  # (registry, scopes) -> Authorization
        self._basic: dict[str, str] = {}  # registry -> Basic Authorization, good for every scope

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- addressing --------------------------------------------------------

    def base_url(self, registry: str) -> str:
        scheme = "http" if self._plain_http(registry) else "https"
        api_host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        return f"{scheme}://{api_host}"

    def _plain_http(self, registry: str) -> bool:
        return is_loopback(registry) or registry in self._insecure or _hostname(registry) in self._insecure

    def _url(self, ref: Reference, kind: str, tail: str) -> str:
        return f"{self.base_url(ref.registry)}/v2/{ref.repository}/{kind}/{tail}"

    # --- manifests ---------------------------------------------------------

    def ping(self, registry: str, *, login: bool = False) -> None:
        """GET /v2/; with `login`, authenticate with the stored credential and require success."""
        what = f"login {registry}" if login else f"ping {registry}"
        url = f"{self.base_url(registry)}/v2/"
        response = self._send(what, registry, "GET", url, scopes=(), require_credential=login)
        response.close()

    def get_manifest(self, ref: Reference, *, what: str | None = None) -> RemoteManifest:
        """Fetch the manifest or index `ref` names; a digest in `ref` is verified."""
        what = what or f"pull {ref}"
        response = self._send(
            what,
            ref.registry,
            "GET",
            self._url(ref, "manifests", ref.identifier),
            scopes=(f"repository:{ref.repository}:pull",),
            headers={"Accept": _ACCEPT},
            stream=True,
        )
        try:
            data = _read_capped(response, MAX_MANIFEST, what)
        finally:
            response.close()
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in MANIFEST_TYPES | INDEX_TYPES:
            media_type = _embedded_media_type(data) or media_type
        if media_type in DOCKER_SCHEMA1:
            raise RegistryError(f"{what}: Docker schema 1 manifests are not supported; re-push the image")
        if media_type not in MANIFEST_TYPES | INDEX_TYPES:
            raise RegistryError(f"{what}: unsupported manifest media type {media_type or 'none'!r}")
        algorithm = ref.digest.algorithm if ref.digest else "sha256"
        digest = _digest_of(data, algorithm)
        if ref.digest is not None and digest != ref.digest:
            raise DigestMismatch(f"{what}: manifest hashes to {digest}, not the pinned digest")
        served = response.headers.get("Docker-Content-Digest")
        if served and served.startswith(f"{algorithm}:") and served != str(digest):
            raise DigestMismatch(f"{what}: manifest hashes to {digest}, registry says {served}")
        return RemoteManifest(media_type, digest, data)

    def resolve(self, ref: Reference, platform: Platform | None = None) -> Resolved:
        """Resolve `ref` to one image manifest, choosing `platform` (default: this host) from an index."""
        what = f"pull {ref}"
        top = self.get_manifest(ref, what=what)
        if not top.is_index:
            return Resolved(ref, top)
        chosen = select_platform(top, platform or host_platform(), what)
        manifest = self.get_manifest(ref.with_digest(chosen.digest), what=what)
        if len(manifest.data) != chosen.size or manifest.is_index:
            raise RegistryError(f"{what}: manifest {chosen.digest.short} does not match its index entry")
        return Resolved(ref, manifest, top)

    def head_manifest(self, ref: Reference, *, what: str | None = None) -> Digest | None:
        """The digest the registry holds for `ref`, or None when it has none (404)."""
        what = what or f"inspect {ref}"
        response = self._send(
            what,
            ref.registry,
            "HEAD",
            self._url(ref, "manifests", ref.identifier),
            scopes=(f"repository:{ref.repository}:pull",),
            headers={"Accept": _ACCEPT},
            ok=(200, 404),
        )
        response.close()
        served = response.headers.get("Docker-Content-Digest")
        if response.status_code == 404 or not served:
            return None
        return Digest.parse(served)

    def put_manifest(self, ref: Reference, manifest: RemoteManifest) -> Digest:
        """PUT `manifest` under `ref`'s tag (or digest); return the digest the registry confirmed."""
        what = f"push {ref}"
        tail = ref.tag if ref.tag is not None else str(manifest.digest)
        for attempt in range(2):
            try:
                response = self._send(
                    what,
                    ref.registry,
                    "PUT",
                    self._url(ref, "manifests", tail),
                    scopes=(f"repository:{ref.repository}:pull,push",),
                    headers={"Content-Type": manifest.media_type},
                    content=lambda: manifest.data,
                    ok=(200, 201),
                )
                break
            except RegistryError:
                # distribution stores a manifest as a blob: two writers putting the
                # same bytes at once race there, and the loser hears DIGEST_INVALID.
                # The writer that won put the very same manifest; else try once more.
                if self.head_manifest(ref, what=what) == manifest.digest:
                    return manifest.digest
                if attempt:
                    raise
        response.close()
        served = response.headers.get("Docker-Content-Digest")
        if served and served != str(manifest.digest):
            raise RegistryError(f"{what}: registry stored the manifest as {served}, not {manifest.digest}")
        return manifest.digest

    # --- blobs -------------------------------------------------------------

    # Kept whole: `written` counts across a break mid-body, which the resume with Range needs.
    def fetch_blob(
        self,
        ref: Reference,
        blob: Descriptor,
        out: Sink,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream `blob` of `ref`'s repository into `out`, verifying size and digest.

        A connection that breaks mid-body is resumed with `Range` from the
        byte where it stopped; a registry that ignores Range (200) is read
        from the start with the bytes already written skipped.
        """
        what = f"pull {ref.name}@{blob.digest}"
        try:
            hasher = hashlib.new(blob.digest.algorithm)
        except ValueError as err:
            raise RegistryError(f"{what}: unsupported digest algorithm {blob.digest.algorithm!r}") from err
        import httpx

        written = 0
        url = self._url(ref, "blobs", str(blob.digest))
        for attempt in range(self._retries + 1):
            # identity: byte ranges and counts must be of the blob itself, not a re-encoding.
            headers = {"Accept-Encoding": "identity"}
            if written:
                headers["Range"] = f"bytes={written}-"
            response = self._send(
                what,
                ref.registry,
                "GET",
                url,
                scopes=(f"repository:{ref.repository}:pull",),
                headers=headers,
                ok=(200, 206),
                stream=True,
            )
            try:
                skip = written if response.status_code == 200 else 0
                if response.status_code == 206 and not response.headers.get("Content-Range", "").startswith(
                    f"bytes {written}-"
                ):
                    raise RegistryError(f"{what}: registry answered a different range than asked")
                for chunk in response.iter_bytes():  # as received: nothing buffered is lost on a break
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                        if not chunk:
                            continue
                    written += len(chunk)
                    if written > blob.size:
                        raise DigestMismatch(f"{what}: registry sent more than {blob.size} bytes")
                    hasher.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
                break
            except httpx.TransportError as err:
                if attempt == self._retries:
                    raise RegistryError(f"{what}: download broken at byte {written}: {_reason(err)}") from err
                self._sleep(self._delay(attempt))
            finally:
                response.close()
        if written != blob.size:
            raise DigestMismatch(f"{what}: got {written} bytes, the manifest declares {blob.size}")
        got = Digest(blob.digest.algorithm, hasher.hexdigest())
        if got != blob.digest:
            raise DigestMismatch(f"{what}: content hashes to {got}")

    def blob_exists(self, ref: Reference, digest: Digest, *, what: str | None = None) -> bool:
        response = self._send(
            what or f"push {ref}",
            ref.registry,
            "HEAD",
            self._url(ref, "blobs", str(digest)),
            scopes=(f"repository:{ref.repository}:pull,push",),
            ok=(200, 404),
        )
        response.close()
        return response.status_code == 200

    def push_blob(
        self,
        ref: Reference,
        blob: Descriptor,
        opener: Callable[[], BinaryIO],
        *,
        mount_from: Sequence[str] = (),
        chunk_size: int | None = None,
    ) -> str:
        """Make `blob` present in `ref`'s repository; return "exists", "mounted" or "uploaded".

        `opener` returns a fresh stream of the blob's bytes (called again on a
        retry). `mount_from` names repositories on the same registry that may
        hold it already. With `chunk_size`, the upload is a series of PATCHes.
        """
        what = f"push {ref}: blob {blob.digest.short}"
        if self.blob_exists(ref, blob.digest, what=what):
            return "exists"
        import httpx

        for attempt in range(self._retries + 1):
            try:
                location = None
                for source in mount_from:
                    if source == ref.repository:
                        continue
                    location = self._start_upload(ref, what, mount=(blob.digest, source))
                    if location is None:
                        return "mounted"
                    break  # not there: upload through the session the failed mount opened
                if location is None:
                    location = self._start_upload(ref, what)
                try:
                    if chunk_size:
                        self._upload_chunked(ref, blob, opener, location, chunk_size, what)
                    else:
                        self._upload_monolithic(ref, blob, opener, location, what)
                except RegistryError:
                    # Two writers finishing the same blob at once race inside the
                    # registry's storage (distribution answers DIGEST_INVALID to the
                    # loser); when the blob is there now, the push has succeeded.
                    if self.blob_exists(ref, blob.digest, what=what):
                        return "exists"
                    raise
                return "uploaded"
            except (httpx.TransportError, _Transient) as err:
                if attempt == self._retries:
                    raise RegistryError(f"{what}: upload failed: {_reason(err)}") from err
                self._sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def _start_upload(self, ref: Reference, what: str, mount: tuple[Digest, str] | None = None) -> str | None:
        """POST an upload session; its Location, or None when a mount made the blob present."""
        scopes = [f"repository:{ref.repository}:pull,push"]
        params = ""
        if mount is not None:
            scopes.append(f"repository:{mount[1]}:pull")
            params = f"?mount={mount[0]}&from={mount[1]}"
        response = self._send(
            what,
            ref.registry,
            "POST",
            self._url(ref, "blobs", "uploads/") + params,
            scopes=tuple(scopes),
            headers={"Content-Length": "0"},
            ok=(201, 202),
        )
        response.close()
        if response.status_code == 201 and mount is not None:
            return None
        return self._location(response, what)

    def _location(self, response: httpx.Response, what: str) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"{what}: registry gave no upload location ({response.status_code})")
        return str(response.url.join(location))

    def _upload_monolithic(
        self, ref: Reference, blob: Descriptor, opener: Callable[[], BinaryIO], location: str, what: str
    ) -> None:
        import httpx

        url = httpx.URL(location).copy_merge_params({"digest": str(blob.digest)})

        def body() -> Iterator[bytes]:
            # A fresh stream per send: a re-sent PUT (after a 401) starts from byte 0.
            with opener() as stream:
                yield from _chunks(stream, blob.size)

        response = self._send(
            what,
            ref.registry,
            "PUT",
            str(url),
            scopes=(f"repository:{ref.repository}:pull,push",),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
            content=body,
            ok=(201,),
            retry=False,
        )
        response.close()

    def _upload_chunked(
        self,
        ref: Reference,
        blob: Descriptor,
        opener: Callable[[], BinaryIO],
        location: str,
        chunk_size: int,
        what: str,
    ) -> None:
        import httpx

        scopes = (f"repository:{ref.repository}:pull,push",)
        offset = 0
        with opener() as stream:
            while offset < blob.size:
                data = stream.read(min(chunk_size, blob.size - offset))
                if not data:
                    raise RegistryError(f"{what}: local blob ended at byte {offset} of {blob.size}")
                end = offset + len(data) - 1
                response = self._send(
                    what,
                    ref.registry,
                    "PATCH",
                    location,
                    scopes=scopes,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{end}",
                        "Content-Length": str(len(data)),
                    },
                    content=lambda data=data: data,
                    ok=(202,),
                    retry=False,
                )
                response.close()
                location = self._location(response, what)
                offset = end + 1
        url = httpx.URL(location).copy_merge_params({"digest": str(blob.digest)})
        response = self._send(
            what,
            ref.registry,
            "PUT",
            str(url),
            scopes=scopes,
            headers={"Content-Length": "0"},
            ok=(201,),
            retry=False,
        )
        response.close()

    # --- transport, retries and auth --------------------------------------

    def _send(
        self,
        what: str,
        registry: str,
        method: str,
        url: str,
        *,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None = None,
        content: Callable[[], bytes | Iterator[bytes]] | None = None,
        ok: tuple[int, ...] = (200,),
        stream: bool = False,
        retry: bool = True,
        require_credential: bool = False,
    ) -> httpx.Response:
        """Send one request with auth, retrying transient failures; raise RegistryError otherwise.

        With `stream`, the caller reads the body (and closes the response);
        without, a small body is read here, so the connection goes back to
        the pool, and the response is returned closed.
        """
        import httpx

        attempts = self._retries + 1 if retry else 1
        authenticated = False
        attempt = 0
        while True:
            request_headers = self._with_authorization(what, registry, scopes, headers, require_credential)
            try:
                request = self._http.build_request(
                    method, url, headers=request_headers, content=content() if content else None
                )
                # Always streamed: no body is read unless a caller reads it, with a cap.
                response = self._http.send(request, stream=True)
            except httpx.TransportError as err:
                attempt += 1
                # A refused connection is rarely transient: give it two more tries, not all.
                limit = min(attempts, _CONNECT_ATTEMPTS) if isinstance(err, httpx.ConnectError) else attempts
                if attempt >= limit:
                    if not retry:
                        raise
                    raise RegistryError(f"{what}: cannot reach {registry}: {_reason(err)}") from err
                self._sleep(self._delay(attempt - 1))
                continue
            if response.status_code == 401 and not authenticated:
                # A first 401 (or an expired token) earns one fresh authentication.
                challenges = parse_challenges(response.headers.get("WWW-Authenticate", ""))
                _drain(response, what)
                self._authenticate(what, registry, challenges, scopes, require_credential)
                authenticated = True
                continue
            if response.status_code in _RETRY_STATUS and attempt + 1 < attempts:
                delay = self._retry_after(response) or self._delay(attempt)
                _drain(response, what)
                attempt += 1
                self._sleep(delay)
                continue
            return self._accepted(what, registry, response, ok, stream, retry, authenticated)

    def _with_authorization(
        self,
        what: str,
        registry: str,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None,
        require_credential: bool,
    ) -> dict[str, str]:
        """`headers` and, when there is one for these scopes, the Authorization header."""
        request_headers = dict(headers or {})
        authorization = self._authorization(what, registry, scopes, require_credential)
        if authorization:
            request_headers["Authorization"] = authorization
        return request_headers

    def _accepted(
        self,
        what: str,
        registry: str,
        response: httpx.Response,
        ok: tuple[int, ...],
        stream: bool,
        retry: bool,
        authenticated: bool,
    ) -> httpx.Response:
        """`response` when its status is `ok` (its body drained unless `stream`); else the error
        it is (_Transient for a status to retry when the caller retries)."""
        if response.status_code in _RETRY_STATUS and not retry:
            response.close()
            raise _Transient(f"{response.status_code} {response.reason_phrase}")
        if response.status_code == 401 and authenticated and self._credentials(registry) is not None:
            response.close()
            raise RegistryError(f"{what}: the credentials for {registry} were rejected (401)")
        if response.status_code not in ok:
            raise self._status_error(what, response)
        if not stream:
            _drain(response, what)
        return response

    def _delay(self, attempt: int) -> float:
        return self._backoff * (2**attempt)

    def _retry_after(self, response: httpx.Response) -> float | None:
        try:
            seconds = float(response.headers.get("Retry-After", ""))
        except ValueError:
            return None
        return seconds if 0 <= seconds <= _MAX_RETRY_AFTER else None

    def _status_error(self, what: str, response: httpx.Response) -> RegistryError:
        body = b""
        # The body only improves the message; failing to read it is not the error.
        with contextlib.suppress(Exception):
            body = _read_capped(response, _MAX_ERROR_BODY, what)
        response.close()
        message = _registry_message(body) or response.reason_phrase.lower() or "error"
        status = response.status_code
        hint = ""
        if status == 401:
            hint = "; check `lamina login`" if "auth" not in message else ""
        elif status == 403:
            message = message if "denied" in message else f"denied: {message}"
        elif status == 429:
            message = "too many requests"
        return RegistryError(f"{what}: {message} ({status}){hint}")

    def _authorization(
        self, what: str, registry: str, scopes: tuple[str, ...], require_credential: bool
    ) -> str | None:
        """The Authorization header to send up front, fetching a token if the challenge is known."""
        with self._lock:
            challenge = self._challenge.get(registry)
            cached = self._basic.get(registry) or self._tokens.get((registry, scopes))
        if cached is not None:
            return cached
        if challenge is None:
            return None
        self._authenticate(what, registry, (challenge,), scopes, require_credential)
        with self._lock:
            return self._tokens.get((registry, scopes))

    def _authenticate(
        self,
        what: str,
        registry: str,
        challenges: tuple[Challenge, ...],
        scopes: tuple[str, ...],
        require_credential: bool,
    ) -> None:
        credential = self._credentials(registry)
        if require_credential and credential is None:
            raise RegistryError(f"{what}: no credentials stored for {registry}")
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            token = self._fetch_token(what, bearer, credential, scopes)
            with self._lock:
                self._challenge[registry] = bearer
                self._tokens[(registry, scopes)] = f"Bearer {token}"
            return
        if basic is not None:
            if credential is None:
                raise RegistryError(f"{what}: authentication required (401); run `lamina login {registry}`")
            with self._lock:
                self._basic[registry] = _basic(credential.username, credential.password)
            return
        raise RegistryError(f"{what}: unauthorized (401) and no supported auth challenge")

    def _fetch_token(
        self, what: str, challenge: Challenge, credential: Credential | None, scopes: tuple[str, ...]
    ) -> str:
        import httpx

        realm = challenge.get("realm")
        if not realm:
            raise RegistryError(f"{what}: bearer challenge without a realm")
        service = challenge.get("service")
        # The challenge may name several space-separated scopes (a mount asks for two).
        wanted = [*scopes, *(challenge.get("scope") or "").split()]
        scope_list = list(dict.fromkeys(wanted))
        try:
            if credential is not None and credential.identity_token:
                form = {"grant_type": "refresh_token", "client_id": "lamina"}
                form["refresh_token"] = credential.identity_token
                if service:
                    form["service"] = service
                if scope_list:
                    form["scope"] = " ".join(scope_list)
                request = self._http.build_request("POST", realm, data=form)
            else:
                params: list[tuple[str, str]] = [("service", service)] if service else []
                params += [("scope", s) for s in scope_list]
                auth = (credential.username, credential.password) if credential else None
                if auth:
                    params.append(("account", credential.username if credential else ""))
                request = self._http.build_request("GET", realm, params=params)
                if auth:
                    request.headers["Authorization"] = _basic(*auth)
            response = self._http.send(request, stream=True)
            try:
                body = _read_capped(response, _MAX_TOKEN_BODY, what)
            finally:
                response.close()
        except httpx.TransportError as err:
            raise RegistryError(f"{what}: cannot reach token service {realm}: {_reason(err)}") from err
        if response.status_code in (401, 403):
            who = "the stored credentials" if credential else "anonymous access"
            raise RegistryError(f"{what}: token service refused {who} ({response.status_code})")
        if response.status_code != 200:
            raise RegistryError(f"{what}: token service {realm} answered {response.status_code}")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError) as err:
            raise RegistryError(f"{what}: token service {realm} sent no token") from err
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{what}: token service {realm} sent no token")
        return token


class _Transient(Exception):
    """A retryable status inside a multi-request upload (the whole upload is retried)."""


def _chunks(stream: BinaryIO, size: int) -> Iterator[bytes]:
    """Yield exactly `size` bytes of `stream` in fixed chunks; a short stream is an error."""
    left = size
    while left:
        data = stream.read(min(CHUNK, left))
        if not data:
            raise RegistryError(f"local blob ended {left} bytes short of {size}")
        left -= len(data)
        yield data


def _drain(response: httpx.Response, what: str) -> None:
    """Read a small body (keeping the connection reusable) and close; a large one is dropped."""
    with contextlib.suppress(Exception):
        _read_capped(response, _MAX_ERROR_BODY, what)
    response.close()


def _basic(username: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    parts: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            raise RegistryError(f"{what}: manifest larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _embedded_media_type(data: bytes) -> str | None:
    """The media type a manifest names itself, or (OCI allows omitting it) what its shape says."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    media_type = value.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    if value.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    if value.get("schemaVersion") == 2 and "manifests" in value:
        return OCI_INDEX
    if value.get("schemaVersion") == 2 and "config" in value:
        return OCI_MANIFEST
    return None


def _digest_of(data: bytes, algorithm: str) -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def _registry_message(body: bytes) -> str:
    """The first message of a distribution-spec error body, lowercased like the spec's codes."""
    try:
        errors = json.loads(body).get("errors")
        first = errors[0]
        message = first.get("message") or first.get("code", "")
    except (ValueError, AttributeError, IndexError, TypeError, KeyError):
        return ""
    return str(message).strip().splitlines()[0].lower() if message else ""


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    if text:
        return text[0]
    return type(err).__name__
