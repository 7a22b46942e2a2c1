"""Move images between a registry and the local store: pull, push, ensure_image.

The registry client (lamina.oci.registry) knows HTTP and digests; the store
(lamina.cache.store) knows files and names. These functions join them:

  - pull: resolve the reference (choosing the platform from an index),
    fetch the config and the missing layers in parallel into store blob
    writers (each verified while streaming, then verified again and renamed
    by the store), record every layer's diff_id, store the manifest, and
    only then name the image. An interrupted pull leaves no name and no
    half blob; the blobs it finished are reused by the next attempt.
  - push: upload the config and layers the registry lacks (existence check,
    cross-repository mount from another repository of the same registry
    that the store has an image from, then upload), then PUT the manifest
    exactly as stored, so the registry's digest is the local one.

Stored names are normalised references (`docker.io/library/alpine:latest`,
`127.0.0.1:5000/x:1`); `find_image` also accepts the short form a user typed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from lamina.errors import ImageNotFound, RegistryError
from lamina.oci.digest import Digest
from lamina.oci.image import (
    INDEX_TYPES,
    MAX_DOCUMENT,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    parse_document,
)
from lamina.oci.reference import Reference, parse_reference
from lamina.oci.registry import RegistryClient, RemoteManifest, parse_manifest

if TYPE_CHECKING:
    from lamina.cache.store import ImageRecord, Store
    from lamina.oci.image import Descriptor

DEFAULT_WORKERS = 4  # parallel blob transfers; a registry throttles more than this per client
PULL_POLICIES = ("missing", "always", "never")

Log = Callable[[str], None]
T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True, slots=True)
class PullResult:
    record: ImageRecord  # the name, pointing at the index when there was one, else the manifest
    reference: Reference
    index: Digest | None  # the index the manifest was chosen from, when there was one
    fetched: int  # blobs downloaded (ones already stored are not)
    fetched_bytes: int
    manifest: Digest | None = None  # the platform's image manifest (the record's, without an index)


@dataclasses.dataclass(frozen=True, slots=True)
class PushResult:
    reference: Reference
    digest: Digest  # what the registry now serves for the reference
    uploaded: int
    uploaded_bytes: int
    mounted: int
    existing: int


def pull(
    client: RegistryClient,
    store: Store,
    ref: Reference,
    *,
    platform: Platform | None = None,
    workers: int = DEFAULT_WORKERS,
    log: Log | None = None,
) -> PullResult:
    """Fetch `ref` into `store` and name it `str(ref)`; see the module docstring for the order."""
    from lamina.cache.store import LayerRecord

    what = f"pull {ref}"
    resolved = client.resolve(ref, platform)
    manifest = parse_manifest(resolved.manifest, what)
    config_data = _fetch_document(client, store, ref, manifest.config, what)
    config = ImageConfig.from_bytes(config_data, f"{what}: config {manifest.config.digest.short}")
    if len(config.diff_ids) != len(manifest.layers):
        raise RegistryError(
            f"{what}: the config lists {len(config.diff_ids)} diff_ids for {len(manifest.layers)} layers"
        )
    missing = [layer for layer in manifest.layers if not _stored(store, layer)]
    _parallel(missing, lambda layer: _fetch_blob(client, store, ref, layer, log), workers)
    # FIXME(diff_id): the diff_id is taken from the config, not recomputed here;
    # unpacking a layer is where its uncompressed digest is checked.
    for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        store.record_layer(LayerRecord(layer.digest, diff_id, layer.media_type, layer.size))
    store.put_bytes(resolved.manifest.data, resolved.manifest.digest)
    size = manifest.config.size + sum(layer.size for layer in manifest.layers)
    name = str(ref)
    top, index = resolved.manifest.digest, None
    if resolved.index is not None:
        # The name keeps the whole index, as the registry has it: a pull of another platform
        # adds that platform's image under the same name instead of renaming it.
        index = top = resolved.index.digest
        store.put_bytes(resolved.index.data, index)
        size = _stored_size(store, resolved.index.data, what)
    record = store.tag(name, top, size=size, created=config.created or "")
    fetched_bytes = sum(layer.size for layer in missing)
    return PullResult(record, ref, index, len(missing), fetched_bytes, resolved.manifest.digest)


def _stored_size(store: Store, index_data: bytes, what: str) -> int:
    """Bytes of the configs and layers of an index's platforms that are in the store."""
    blobs: dict[Digest, int] = {}
    for entry in Index.from_bytes(index_data, f"{what}: index").manifests:
        if entry.media_type in INDEX_TYPES or not store.has_blob(entry.digest):
            continue
        manifest = Manifest.from_bytes(store.read_blob(entry.digest, MAX_DOCUMENT), f"{what}: manifest")
        for blob in (manifest.config, *manifest.layers):
            blobs[blob.digest] = blob.size
    return sum(blobs.values())


def ensure_image(
    client_factory: Callable[[], RegistryClient],
    store: Store,
    ref: Reference,
    pull_policy: str = "missing",
    *,
    platform: Platform | None = None,
    log: Log | None = None,
) -> ImageRecord:
    """The stored image for `ref`, pulling it per `pull_policy` ("missing", "always", "never").

    A build calls this for `FROM host/x:tag`. The client is made only when
    the network is needed, so a cached base image costs no connection.
    """
    if pull_policy not in PULL_POLICIES:
        raise ValueError(f"pull policy {pull_policy!r} is not one of {PULL_POLICIES}")
    if pull_policy != "always":
        try:
            record = store.resolve(str(ref))
        except ImageNotFound:
            if pull_policy == "never":
                raise ImageNotFound(f"image {ref} is not in the store and pulling is off") from None
        else:
            if store.has_blob(record.manifest) and _holds(store, record, platform):
                return record
    with client_factory() as client:
        return pull(client, store, ref, platform=platform, log=log).record


def _holds(store: Store, record: ImageRecord, platform: Platform | None) -> bool:
    """Whether the stored image has `platform`'s image (a pulled index may hold only some)."""
    from lamina.cache.platforms import platform_manifest

    try:
        platform_manifest(store, record.manifest, platform, record.name, strict=False)
    except ImageNotFound:
        return False
    return True


def find_image(store: Store, name: str) -> ImageRecord:
    """The stored image called `name`, as typed or as its normalised reference."""
    try:
        return store.resolve(name)
    except ImageNotFound:
        pass
    try:
        normal = str(parse_reference(name))
    except RegistryError:
        normal = name
    if normal != name:
        try:
            return store.resolve(normal)
        except ImageNotFound:
            pass
    raise ImageNotFound(f"image {name} is not in the store (see `lamina images`)")


def push(
    client: RegistryClient,
    store: Store,
    name: str,
    ref: Reference,
    *,
    workers: int = DEFAULT_WORKERS,
    chunk_size: int | None = None,
    log: Log | None = None,
    platform: Platform | None = None,
) -> PushResult:
    """Push the stored image `name` to `ref`; return the digest the registry confirmed.

    A multi-platform image goes up whole (every platform's manifest, then the index);
    `platform` pushes only that platform's image, as `docker push --platform`.
    """
    record = find_image(store, name)
    what = f"push {ref}"
    top = record.manifest
    if platform is not None:
        from lamina.cache.platforms import platform_manifest

        try:
            top = platform_manifest(store, top, platform, what)
        except ImageNotFound as err:
            raise RegistryError(str(err)) from None
    counts = {"uploaded": 0, "mounted": 0, "exists": 0}
    uploaded_bytes = 0
    mount_from = _mount_candidates(store, ref)

    def push_blob(descriptor: Descriptor) -> str:
        outcome = client.push_blob(
            ref,
            descriptor,
            lambda: store.open_blob(descriptor.digest),
            mount_from=mount_from,
            chunk_size=chunk_size,
        )
        if log is not None:
            log(f"{descriptor.digest.short}: {outcome}")
        return outcome

    manifests = _manifests_below(store, top, what)
    for digest, media_type, data in manifests:
        if media_type in INDEX_TYPES:
            continue  # children are pushed (by digest) before the index that names them
        manifest = Manifest.from_bytes(data, f"{what}: manifest {digest.short}")
        blobs = _unique([manifest.config, *manifest.layers])
        for descriptor, outcome in zip(blobs, _parallel(blobs, push_blob, workers), strict=True):
            counts[outcome] += 1
            if outcome == "uploaded":
                uploaded_bytes += descriptor.size
        if digest != top:  # an index's child goes up by digest, untagged
            child = Reference(ref.registry, ref.repository, None, digest)
            client.put_manifest(child, RemoteManifest(media_type, digest, data))
    top_type, top_data = manifests[-1][1], manifests[-1][2]
    confirmed = client.put_manifest(ref, RemoteManifest(top_type, top, top_data))
    return PushResult(ref, confirmed, counts["uploaded"], uploaded_bytes, counts["mounted"], counts["exists"])


def _manifests_below(store: Store, digest: Digest, what: str) -> list[tuple[Digest, str, bytes]]:
    """`digest` and, for an index, its child manifests first: (digest, media type, bytes)."""
    data = store.read_blob(digest, MAX_DOCUMENT)
    media_type = parse_document(data, f"{what}: manifest {digest.short}").get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise RegistryError(f"{what}: stored manifest {digest.short} has no mediaType")
    out: list[tuple[Digest, str, bytes]] = []
    if media_type in INDEX_TYPES:
        from lamina.cache.platforms import never_pulled

        index = Index.from_bytes(data, f"{what}: index {digest.short}")
        missing = never_pulled(store, index)
        if missing:  # the registry would refuse an index naming what it does not have
            raise RegistryError(f"{what}: never pulled: {missing} (pull them, or push one --platform)")
        for child in index.manifests:
            out.extend(_manifests_below(store, child.digest, what))
    out.append((digest, media_type, data))
    return out


def _mount_candidates(store: Store, ref: Reference) -> tuple[str, ...]:
    """Other repositories on `ref`'s registry that this store has images from (a mount may work)."""
    repositories = []
    for image in store.images():
        try:
            other = parse_reference(image.name)
        except RegistryError:
            continue
        if other.registry == ref.registry and other.repository != ref.repository:
            repositories.append(other.repository)
    return tuple(dict.fromkeys(repositories))[:1]  # one mount try: a failed mount opens an upload


def _fetch_document(
    client: RegistryClient, store: Store, ref: Reference, blob: Descriptor, what: str
) -> bytes:
    if blob.size > MAX_DOCUMENT:
        raise RegistryError(f"{what}: config {blob.digest.short} is {blob.size} bytes, too large")
    if not _stored(store, blob):
        _fetch_blob(client, store, ref, blob, None)
    return store.read_blob(blob.digest, MAX_DOCUMENT)


def _fetch_blob(
    client: RegistryClient, store: Store, ref: Reference, blob: Descriptor, log: Log | None
) -> None:
    with store.blob_writer() as out:
        client.fetch_blob(ref, blob, out)
        out.commit(blob.digest, blob.size)
    if log is not None:
        log(f"{blob.digest.short}: fetched {blob.size} bytes")


def _stored(store: Store, blob: Descriptor) -> bool:
    return store.has_blob(blob.digest) and store.blob_size(blob.digest) == blob.size


def _unique(descriptors: Iterable[Descriptor]) -> list[Descriptor]:
    seen: dict[Digest, Descriptor] = {}
    for descriptor in descriptors:
        seen.setdefault(descriptor.digest, descriptor)
    return list(seen.values())


def _parallel(items: Sequence[T], work: Callable[[T], R], workers: int) -> list[R]:
    """Run `work` over `items` in a small pool; the first failure cancels what has not started."""
    if len(items) <= 1 or workers <= 1:
        return [work(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(work, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
