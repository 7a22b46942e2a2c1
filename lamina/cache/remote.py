"""The remote step cache: build cache results shared through a registry
(`--cache-to/--cache-from type=registry,ref=REF`), beside the local one (`store`).

This module knows nothing of builds: the engine (engine.stepcache) asks it
for a step's key on a local miss and hands it the entries to export. Its
parts: the registry format (one OCI manifest per step key, below), the
`--cache-from`/`--cache-to` values (`CacheSpec`), the result an entry holds
(`wrap_result`), importing one key into the store (`RemoteCache`) and
pushing entries (`push_entries`).


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
import functools
import io
import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from lamina.errors import LaminaError, PlanError, RegistryError
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


# --- --cache-from / --cache-to values -------------------------------------------------------

MODES = ("min", "max")
_WORKERS = 4  # parallel uploads of an export
# BuildKit's cache attributes that lamina's format already honours at these values (its entries
# are OCI image manifests); any other value, or an attribute not listed, is refused.
_HONOURED = {"oci-mediatypes": "true", "image-manifest": "true"}
_REFUSED_KEYS = {
    "compression": "cache layers are written in the build's --compression",
    "compression-level": "cache layers are written in the build's --compression",
    "force-compression": "cache layers are written in the build's --compression",
    "digest": "a local cache is read by its tag (tag=)",
}


@dataclasses.dataclass(frozen=True, slots=True)
class CacheSpec:
    """One `--cache-to` or `--cache-from` value."""

    ref: Reference
    mode: str = "min"  # --cache-to only
    ignore_error: bool = False  # --cache-to only: a failed export is a warning
    path: str = ""  # type=local: the OCI layout directory (dest= / src=); ref's tag is tag=
    inline: bool = False  # --cache-to type=inline: the entries ride in the image config


def parse_cache_spec(text: str, flag: str) -> CacheSpec:
    """`type=registry,ref=REF[,mode=min|max][,ignore-error=true]`; a bare REF means type=registry;
    `type=local,dest=DIR` (--cache-to) / `type=local,src=DIR` (--cache-from), `[,tag=T]`: the same
    entries in an OCI layout directory (lamina.oci.layoutclient), as BuildKit's local cache."""
    from lamina.oci.reference import parse_reference

    fields = _spec_fields(text, flag)
    kind = fields.pop("type", "registry")
    if kind == "inline":
        return _inline_spec(fields, text, flag)
    if kind in ("gha", "s3", "azblob"):
        raise PlanError(f"{flag} type={kind} is not supported: use type=registry or type=local")
    if kind not in ("registry", "local"):
        raise PlanError(f"invalid {flag} {text!r}: type must be registry or local, not {kind!r}")
    path = ""
    if kind == "local":
        path = fields.pop("dest" if flag == "--cache-to" else "src", "")
        if not path:
            need = "dest" if flag == "--cache-to" else "src"
            raise PlanError(f"invalid {flag} {text!r}: type=local needs {need}=")
        fields["ref"] = f"local/cache:{fields.pop('tag', DEFAULT_TAG)}"
    for key, value in _HONOURED.items():
        given = fields.pop(key, value)
        if given.lower() != value:
            raise PlanError(
                f"{flag} {key}={given} is not supported: lamina's cache entries are OCI manifests"
            )
    for key, why in _REFUSED_KEYS.items():
        if key in fields:
            raise PlanError(f"{flag} {key}= is not supported: {why}")
    ref_text = fields.pop("ref", "")
    if not ref_text:
        raise PlanError(f"invalid {flag} {text!r}: missing ref=")
    mode = fields.pop("mode", "min").lower()
    if mode not in MODES or (mode != "min" and flag == "--cache-from"):
        raise PlanError(f"invalid {flag} {text!r}: mode must be min or max (and only for --cache-to)")
    ignore = fields.pop("ignore-error", "false").lower()
    if ignore not in ("true", "false"):
        raise PlanError(f"invalid {flag} {text!r}: ignore-error must be true or false")
    unknown = sorted(fields)
    if unknown:
        raise PlanError(f"invalid {flag} {text!r}: unknown key {unknown[0]!r}")
    try:
        ref = parse_reference(ref_text)
    except RegistryError as err:
        raise PlanError(f"invalid {flag} {text!r}: {err}") from err
    if ref.digest is not None:
        raise PlanError(f"invalid {flag} {text!r}: a cache ref takes a tag, not a digest")
    return CacheSpec(ref, mode, ignore == "true", path)


def _spec_fields(text: str, flag: str) -> dict[str, str]:
    """`k=v,k=v` as a dict (keys lower case); a bare REF is `type=registry,ref=REF`."""
    if "=" not in text:
        return {"type": "registry", "ref": text.strip()}
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise PlanError(f"invalid {flag} {text!r}: {part!r} is not key=value")
        fields[key] = value.strip()
    return fields


def _inline_spec(fields: dict[str, str], text: str, flag: str) -> CacheSpec:
    """`--cache-to type=inline`: the cache in the image's own config (mode=min only)."""
    if flag != "--cache-to":
        raise PlanError(f"invalid {flag} {text!r}: read an inline cache with type=registry,ref=IMAGE")
    if fields.pop("mode", "min") != "min":
        raise PlanError(f"invalid {flag} {text!r}: an inline cache is mode=min only, as BuildKit's")
    if fields:
        raise PlanError(f"invalid {flag} {text!r}: unknown key {sorted(fields)[0]!r}")
    return CacheSpec(Reference("inline", "cache"), inline=True)


def parse_cache_specs(texts: Iterable[str], flag: str) -> tuple[CacheSpec, ...]:
    return tuple(parse_cache_spec(text, flag) for text in texts)


# --- the result an entry holds ----------------------------------------------------------------
#
# The engine's own result JSON (layer dir id, created time, inputs; opaque
# here but for its "layer") wrapped with the compression and
# SOURCE_DATE_EPOCH its layer blob was written with. An importer whose build
# uses the same two records the fetched blob as that layer dir's blob, so its
# image reuses the exact bytes and gets the exporter's digest; with other
# settings the layer is recompressed from the unpacked dir when needed.

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True, slots=True)
class WrappedResult:
    step: str  # the engine's result JSON
    layer: str | None  # its layer dir id (64 hex digits), None for a step that changed nothing
    compression: str
    epoch: int | None


def wrap_result(step: str, compression: str, epoch: int | None) -> str:
    return canonical_json({"compression": compression, "epoch": epoch, "step": step}).decode()


def unwrap_result(text: str) -> WrappedResult | None:
    """The wrapped result, or None when it is not one lamina wrote (a remote value is untrusted)."""
    try:
        outer = json.loads(text)
        step = outer["step"]
        layer = json.loads(step)["layer"]
        compression, epoch = outer["compression"], outer["epoch"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(step, str) or not isinstance(compression, str):
        return None
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
        return None
    # The layer id names a directory of the store: nothing but 64 hex digits.
    if layer is not None and not (isinstance(layer, str) and _HEX64.fullmatch(layer)):
        return None
    return WrappedResult(step, layer, compression, epoch)


def _named_by_key(wrapped: WrappedResult, key: str) -> WrappedResult:
    """The result with its layer dir named by the step's key, whatever the exporter called it.

    A remote entry must not be able to point a step at a directory this
    store already has for something else (a base layer's diff_id, another
    step's result); the key's own name can only hold this step's result.
    """
    hexdigest = key.split(":", 1)[1]
    step = json.loads(wrapped.step)
    step["layer"] = hexdigest
    return dataclasses.replace(wrapped, step=json.dumps(step), layer=hexdigest)


# --- import, on a local miss ------------------------------------------------------------------

# Unpack a fetched blob as the store's layer dir `name` (engine.unpack.unpacked_layer).
Unpack = Callable[["Store", Digest, Digest], Any]
# The index key under which a layer dir's blob is remembered (engine.cachekey.layer_blob_key).
BlobMemoKey = Callable[[str, str, "int | None"], str]


class RemoteCache:
    """The --cache-from side of one build: a registry client made on first use, refs that failed.

    Each reference in order is asked for a step's key; a hit's layer is
    fetched, verified (digest, size, diff_id), unpacked into the store
    (`unpack`: inside the user namespace when rootless) and indexed, so the
    step is cached and a later RUN has its lower layers. An import never
    fails a build: a corrupted or malformed entry is a warning and the step
    is rebuilt, and a registry that cannot be reached or refuses us is warned
    about once and not asked again during this build.
    """

    def __init__(
        self,
        specs: Sequence[CacheSpec],
        client_factory: Callable[[], RegistryClient] | None,
        warn: Warn,
        unpack: Unpack,
        blob_memo_key: BlobMemoKey,
    ) -> None:
        self.specs = tuple(specs)
        self._factory = client_factory
        self._warn = warn
        self._unpack = unpack
        self._blob_memo_key = blob_memo_key
        self._client: RegistryClient | None = None
        self._layouts: dict[str, Any] = {}  # type=local: a LayoutClient per directory
        self._inline: dict[Reference, dict[str, CacheEntry]] = {}  # an image's inline cache, by ref
        self._lock = threading.Lock()
        self._disabled: set[Reference] = set()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _get_client(self, spec: CacheSpec | None = None) -> RegistryClient:
        if spec is not None and spec.path:
            from pathlib import Path

            from lamina.oci.layoutclient import LayoutClient

            with self._lock:
                if spec.path not in self._layouts:
                    self._layouts[spec.path] = LayoutClient(Path(spec.path))
                return self._layouts[spec.path]  # type: ignore[no-any-return]
        with self._lock:
            if self._client is None:
                if self._factory is None:
                    raise RegistryError("--cache-from needs a registry client")
                self._client = self._factory()
            return self._client

    def fetch(self, store: Store, key: str) -> bool:
        """Import `key`'s result into `store` from the first reference that has it; True if one did.

        Call it under the step's key lock, after a local miss.
        """
        for spec in self.specs:
            if spec.ref in self._disabled:
                continue
            if self._import(store, spec, key):
                return True
        return False

    def _import(self, store: Store, spec: CacheSpec, key: str) -> bool:
        ref = spec.ref
        try:
            entry = self._inline_entry(store, spec, key)
            if entry is None:
                entry = import_entry(self._get_client(spec), store, ref, key, warn=self._warn)
        except RegistryError as err:
            with self._lock:
                self._disabled.add(ref)
            where = f"type=local,src={spec.path}" if spec.path else str(ref)
            self._warn(f"--cache-from {where}: {err}; not using it for the rest of this build")
            return False
        if entry is None:
            return False
        what = f"import cache {ref} key {key}"
        wrapped = unwrap_result(entry.result)
        if wrapped is None or (wrapped.layer is None) != (entry.layer is None):
            self._warn(f"{what}: not a result this lamina understands; rebuilding the step instead")
            return False
        refs: list[Digest] = []
        if wrapped.layer is not None and entry.layer is not None and entry.diff_id is not None:
            wrapped = _named_by_key(wrapped, key)
            try:
                self._unpack(store, entry.layer.digest, Digest("sha256", wrapped.layer))
            except LaminaError as err:  # a verified blob can still be a hostile tar
                self._warn(f"{what}: {err}; rebuilding the step instead")
                return False
            self._remember_blob(store, wrapped, entry.layer, entry.diff_id)
            refs.append(Digest("sha256", wrapped.layer))
        store.cache_put(key, wrapped.step, refs=refs)
        return True

    def _inline_entry(self, store: Store, spec: CacheSpec, key: str) -> CacheEntry | None:
        """`key` from the inline cache of the image `spec.ref` names (`--cache-to type=inline`),
        its layer fetched and checked as import_entry checks a registry entry; None on a miss."""
        if spec.path:
            return None
        client = self._get_client(spec)
        with self._lock:
            table = self._inline.get(spec.ref)
        if table is None:
            table = read_inline(client, spec.ref, self._warn)
            with self._lock:
                self._inline[spec.ref] = table
        entry = table.get(key)
        if entry is None or entry.layer is None or entry.diff_id is None:
            return entry
        from lamina.cache.store import LayerRecord
        from lamina.errors import DigestMismatch

        layer = entry.layer
        what = f"import inline cache {spec.ref} key {key}"
        try:
            if not (store.has_blob(layer.digest) and store.blob_size(layer.digest) == layer.size):
                with store.blob_writer() as out:
                    client.fetch_blob(spec.ref, layer, out)
                    out.commit(layer.digest, layer.size)
            _check_diff_id(store, layer, entry.diff_id, what)
        except DigestMismatch as err:
            self._warn(f"{err}; rebuilding the step instead")
            return None
        store.record_layer(LayerRecord(layer.digest, entry.diff_id, layer.media_type, layer.size))
        return entry

    def _remember_blob(self, store: Store, wrapped: WrappedResult, blob: Descriptor, diff_id: Digest) -> None:
        """Record `blob` as the layer dir's blob, as engine.output.layer_blob's memo does.

        The dir was unpacked from exactly this blob, made by the exporter from
        its dir with this compression and epoch, so an output with the same
        settings uses these bytes instead of writing new ones.
        """
        from lamina.oci.compression import Compression

        try:
            if Compression.parse(wrapped.compression).media_type != blob.media_type:
                return
        except LaminaError:
            return
        memo = self._blob_memo_key(str(wrapped.layer), wrapped.compression, wrapped.epoch)
        record = {
            "digest": str(blob.digest),
            "diff_id": str(diff_id),
            "size": blob.size,
            "media_type": blob.media_type,
        }
        store.cache_put(memo, json.dumps(record), refs=[blob.digest, Digest("sha256", str(wrapped.layer))])


# --- inline: the entries of the image's own steps in its config ------------------------------
#
# `--cache-to type=inline` (BuildKit writes `moby.buildkit.cache.v0` into the image config): the
# config gets INLINE_FIELD = {"entries": [{"key", "result", "layer"}], "version": 1}, where
# "layer" is the index of the step's layer among the image's own layers (null for a step that
# changed no file). `--cache-from type=registry,ref=IMAGE` reads it back: the layer blob and
# diff_id come from the image's manifest and config, checked as a registry entry's are.

INLINE_FIELD = "dev.lamina.cache.v1"
_MAX_INLINE = 1 << 22


def inline_value(entries: Sequence[CacheEntry], diff_ids: Sequence[Digest]) -> str:
    """The INLINE_FIELD value (JSON text) for `entries` of an image whose layers are `diff_ids`."""
    position = {diff_id: i for i, diff_id in enumerate(diff_ids)}
    out = []
    for entry in entries:
        if entry.diff_id is not None and entry.diff_id not in position:
            continue  # a layer that is not the image's own (mode=min keeps the target's chain)
        layer = position[entry.diff_id] if entry.diff_id is not None else None
        out.append({"key": entry.key, "layer": layer, "result": entry.result})
    return canonical_json({"entries": out, "version": FORMAT_VERSION}).decode()


def read_inline(client: RegistryClient, ref: Reference, warn: Warn) -> dict[str, CacheEntry]:
    """The inline cache entries of the image `ref` names, by key (none when it has none).

    Image manifests only: of an index, every platform's image (a multi-platform build puts
    each platform's entries in its own config; attestations are skipped). Each config is
    fetched by digest and size-capped.
    """
    from lamina.errors import DigestMismatch, ImageFormatError
    from lamina.oci.image import INDEX_TYPES, MANIFEST_TYPES, Index

    what = f"inline cache {ref}"
    try:
        if client.head_manifest(ref, what=what) is None:
            return {}
        remote = client.get_manifest(ref, what=what)
        if remote.media_type not in INDEX_TYPES:
            return _inline_entries(client, ref, remote, what)
        out: dict[str, CacheEntry] = {}
        for m in Index.from_bytes(remote.data, what).manifests:
            if m.media_type in MANIFEST_TYPES and (m.platform is None or m.platform.os != "unknown"):
                child = Reference(ref.registry, ref.repository, None, m.digest)
                out.update(_inline_entries(client, ref, client.get_manifest(child, what=what), what))
        return out
    except (DigestMismatch, ImageFormatError, ValueError, KeyError, TypeError, AttributeError) as err:
        warn(f"{what}: {err}; not using it")
        return {}


def _inline_entries(client: RegistryClient, ref: Reference, remote: Any, what: str) -> dict[str, CacheEntry]:
    """The inline entries in the config of one image manifest `remote` (none when it has none)."""
    from lamina.errors import ImageFormatError
    from lamina.oci.image import MANIFEST_TYPES

    if remote.media_type not in MANIFEST_TYPES:
        return {}
    manifest = Manifest.from_bytes(remote.data, f"{what}: manifest")
    if manifest.config.media_type == CACHE_CONFIG or manifest.config.size > _MAX_INLINE:
        return {}
    config = json.loads(_fetch_bytes(client, ref, manifest.config))
    table = config.get(INLINE_FIELD) if isinstance(config, dict) else None
    if table is None:
        return {}
    diff_ids = [Digest.parse(d) for d in config["rootfs"]["diff_ids"]]
    if table.get("version") != FORMAT_VERSION or len(diff_ids) != len(manifest.layers):
        raise ImageFormatError(f"{what}: not an inline cache this lamina reads")
    out: dict[str, CacheEntry] = {}
    for item in table["entries"]:
        key, result, layer = item["key"], item["result"], item["layer"]
        if not isinstance(key, str) or not isinstance(result, str):
            raise ImageFormatError(f"{what}: a malformed entry")
        if layer is None:
            out[key] = CacheEntry(key, result)
        elif isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < len(diff_ids):
            out[key] = CacheEntry(key, result, manifest.layers[layer], diff_ids[layer])
        else:
            raise ImageFormatError(f"{what}: entry {key} names layer {layer!r}")
    return out


# --- export ------------------------------------------------------------------------------------


def in_parallel(items: Sequence[Any], work: Callable[[Any], Any]) -> list[Any]:
    """`work` over `items` on a few threads (compression and HTTP release the GIL); first error raised."""
    if len(items) <= 1:
        return [work(item) for item in items]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(_WORKERS, len(items))) as pool:
        return list(pool.map(work, items))


def _export_one(client: RegistryClient, store: Store, ref: Reference, entry: CacheEntry) -> int:
    return export_entries(client, store, ref, [entry])


def push_entries(
    client_factory: Callable[[], RegistryClient] | None,
    store: Store,
    ref: Reference,
    entries: Sequence[CacheEntry],
    path: str = "",
) -> int:
    """Push `entries` under `ref` (--cache-to), side by side; return how many were written.
    With `path` (type=local) they go into that OCI layout directory instead."""
    if path:
        from pathlib import Path

        from lamina.oci.layoutclient import LayoutClient

        layout: Any = LayoutClient(Path(path), create=True)
        return sum(in_parallel(entries, functools.partial(_export_one, layout, store, ref)))
    if client_factory is None:
        raise RegistryError("--cache-to needs a registry client")
    with client_factory() as client:
        # One entry per call: entries are independent, so they go up side by side.
        one = functools.partial(_export_one, client, store, ref)
        return sum(in_parallel(entries, one))
