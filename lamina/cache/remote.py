"""Share build cache results through a registry (`--cache-to/--cache-from type=registry,ref=REF`).

Format (version 1). For a cache reference `host/repo:TAG` (TAG defaults to
`cache`), each step cache key `sha256:<hex>` is one tag of `host/repo`:

    TAG-<hex>            e.g. 127.0.0.1:5000/team/cache:main-3f2a...  (64 hex digits)

and that tag is an OCI image manifest:

    config   application/vnd.lamina.cache.step.v1+json
             {"diff_id": "sha256:..." | null, "key": "sha256:<hex>",
              "result": "<the executor's result JSON, opaque here>", "version": 1}
    layers   [] for a step that changed no file, else one layer blob
             (application/vnd.oci.image.layer.v1.tar+gzip or +zstd): the
             step's filesystem diff, whose uncompressed digest is `diff_id`
    annotations  {"dev.lamina.cache.key": "sha256:<hex>"}

Why this shape:
  - One manifest per key means writers never read-modify-write a shared
    document: two machines exporting at once each PUT their own tags (the
    same key twice is last-writer-wins between two equally valid results),
    and blobs are content-addressed, so concurrent uploads agree.
  - An importer asks only for the keys it is about to need (HEAD/GET of
    one tag) and fetches only those layers: a build whose target needs
    three steps pulls three layers, whatever else the cache holds.
  - Everything fetched is verified: the manifest by its digest, the config
    and layer by theirs, and the layer's uncompressed bytes against
    `diff_id`. A corrupted or mismatching entry is reported once through
    `warn` and treated as a miss, so the step is rebuilt, never used.
  - It is a plain OCI manifest, so registries accept it, `skopeo inspect`
    shows it and registry GC keeps its blobs.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from lamina.errors import LaminaError, RegistryError
from lamina.oci.digest import Digest
from lamina.oci.image import OCI_MANIFEST, Descriptor, Manifest, canonical_json, descriptor_of
from lamina.oci.reference import Reference
from lamina.oci.registry import RemoteManifest

if TYPE_CHECKING:
    from lamina.cache.store import Store
    from lamina.oci.registry import RegistryClient

CACHE_CONFIG = "application/vnd.lamina.cache.step.v1+json"
KEY_ANNOTATION = "dev.lamina.cache.key"
FORMAT_VERSION = 1
DEFAULT_TAG = "cache"
_MAX_PREFIX = 60  # a tag is at most 128 characters: prefix, '-', 64 hex digits

Warn = Callable[[str], None]


@dataclasses.dataclass(frozen=True, slots=True)
class CacheEntry:
    """One step's cached result as shared through a registry.

    `layer` is a blob already in the local store (on export) or fetched into
    it (on import); None for a step that changed no file.
    """

    key: str
    result: str
    layer: Descriptor | None = None
    diff_id: Digest | None = None


def entry_reference(cache_ref: Reference, key: str) -> Reference:
    """The tag that holds `key` under `cache_ref` (see the module docstring)."""
    algorithm, _, hexdigest = key.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64:
        raise RegistryError(f"cache key {key!r} is not sha256:<64 hex digits>")
    prefix = (cache_ref.tag or DEFAULT_TAG)[:_MAX_PREFIX]
    return Reference(cache_ref.registry, cache_ref.repository, f"{prefix}-{hexdigest}")


def export_entries(
    client: RegistryClient,
    store: Store,
    cache_ref: Reference,
    entries: Iterable[CacheEntry],
) -> int:
    """Push every entry (its layer blob, config and manifest tag); return how many were written.

    An entry whose tag already holds the same manifest is skipped without
    uploading. A failure is raised: an export the user asked for must not
    half-succeed silently.
    """
    written = 0
    for entry in entries:
        ref = entry_reference(cache_ref, entry.key)
        config = _config_bytes(entry)
        config_desc = descriptor_of(config, CACHE_CONFIG)
        layers = (entry.layer,) if entry.layer is not None else ()
        manifest = Manifest(
            config_desc, layers, media_type=OCI_MANIFEST, annotations=((KEY_ANNOTATION, entry.key),)
        ).to_bytes()
        digest = Digest.of_bytes(manifest)
        if client.head_manifest(ref, what=f"export cache {ref}") == digest:
            continue
        if entry.layer is not None:
            layer = entry.layer
            client.push_blob(ref, layer, lambda layer=layer: store.open_blob(layer.digest))
        client.push_blob(ref, config_desc, lambda config=config: _reader(config))
        client.put_manifest(ref, RemoteManifest(OCI_MANIFEST, digest, manifest))
        written += 1
    return written


def import_entry(
    client: RegistryClient,
    store: Store,
    cache_ref: Reference,
    key: str,
    *,
    warn: Warn | None = None,
) -> CacheEntry | None:
    """The entry for `key` from the registry, its layer fetched into `store` and verified; None on a miss.

    A missing tag is a plain miss. A corrupted or inconsistent entry (digest,
    size, diff_id or format mismatch) is a miss too, reported through `warn`,
    and records nothing (a verified but unusable blob is left for gc).
    Connection and auth failures raise.
    """
    from lamina.cache.store import LayerRecord
    from lamina.errors import DigestMismatch, ImageFormatError

    ref = entry_reference(cache_ref, key)
    what = f"import cache {ref}"
    try:
        if client.head_manifest(ref, what=what) is None:
            return None
        remote = client.get_manifest(ref, what=what)
        manifest = Manifest.from_bytes(remote.data, f"{what}: manifest")
        if manifest.config.media_type != CACHE_CONFIG or len(manifest.layers) > 1:
            raise ImageFormatError(f"{what}: not a lamina cache entry")
        if manifest.config.size > 1 << 22:
            raise ImageFormatError(f"{what}: config of {manifest.config.size} bytes is too large")
        config = _fetch_bytes(client, ref, manifest.config)
        entry = _parse_config(config, what)
        if entry.key != key:
            raise ImageFormatError(f"{what}: entry is for key {entry.key}, not {key}")
        if manifest.layers:
            layer = manifest.layers[0]
            if entry.diff_id is None:
                raise ImageFormatError(f"{what}: a layer without a diff_id")
            if not (store.has_blob(layer.digest) and store.blob_size(layer.digest) == layer.size):
                with store.blob_writer() as out:
                    client.fetch_blob(ref, layer, out)
                    out.commit(layer.digest, layer.size)
            _check_diff_id(store, layer, entry.diff_id, what)
            store.record_layer(LayerRecord(layer.digest, entry.diff_id, layer.media_type, layer.size))
            entry = dataclasses.replace(entry, layer=layer)
        return entry
    except (DigestMismatch, ImageFormatError) as err:
        if warn is not None:
            warn(f"{err}; rebuilding the step instead")
        return None


def _config_bytes(entry: CacheEntry) -> bytes:
    return canonical_json(
        {
            "diff_id": str(entry.diff_id) if entry.diff_id is not None else None,
            "key": entry.key,
            "result": entry.result,
            "version": FORMAT_VERSION,
        }
    )


def _parse_config(data: bytes, what: str) -> CacheEntry:
    from lamina.errors import ImageFormatError
    from lamina.oci.image import parse_document

    obj = parse_document(data, f"{what}: config")
    key, result, diff_id = obj.get("key"), obj.get("result"), obj.get("diff_id")
    if obj.get("version") != FORMAT_VERSION:
        raise ImageFormatError(f"{what}: cache format version {obj.get('version')!r}, want {FORMAT_VERSION}")
    if not isinstance(key, str) or not isinstance(result, str) or not isinstance(diff_id, str | None):
        raise ImageFormatError(f"{what}: malformed cache config")
    try:
        parsed = Digest.parse(diff_id) if diff_id is not None else None
    except LaminaError as err:
        raise ImageFormatError(f"{what}: {err}") from err
    return CacheEntry(key, result, None, parsed)


def _check_diff_id(store: Store, layer: Descriptor, diff_id: Digest, what: str) -> None:
    """Decompress the stored layer and compare its digest with `diff_id` (the tar the step made)."""
    from lamina.errors import DigestMismatch, ImageFormatError
    from lamina.oci.compression import Compression, hash_decoded

    try:
        compression = Compression.from_media_type(layer.media_type)
    except LaminaError as err:
        raise ImageFormatError(f"{what}: {err}") from err
    try:
        with store.open_blob(layer.digest) as raw:
            got, _ = hash_decoded(raw, compression)
    except (OSError, EOFError, LaminaError, ValueError) as err:
        raise DigestMismatch(f"{what}: layer {layer.digest.short} does not decompress: {err}") from err
    if got != diff_id:
        raise DigestMismatch(f"{what}: layer {layer.digest.short} unpacks to {got}, not {diff_id}")


def _fetch_bytes(client: RegistryClient, ref: Reference, blob: Descriptor) -> bytes:
    out = io.BytesIO()
    client.fetch_blob(ref, blob, out)
    return out.getvalue()


def _reader(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
