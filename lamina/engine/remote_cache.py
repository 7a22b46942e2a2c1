"""The executor's side of sharing the build cache through a registry.

`--cache-to type=registry,ref=REF[,mode=min|max]` and `--cache-from
type=registry,ref=REF`. lamina.cache.remote owns the registry format (one
OCI manifest per step key) and knows nothing of builds; this module turns
the executor's step results into `CacheEntry` values after a build, and a
remote entry back into a local result when a step misses.

What is exported:
  - mode=min (the default, as in BuildKit): the steps of the target stage
    and of the stages it is built FROM, i.e. the steps whose layers the
    image has.
  - mode=max: every filesystem step that ran or hit in this build, builder
    stages included. That is what lets another machine skip a builder
    stage: `COPY --from=builder` is keyed by the content of the files it
    copies, so the builder's layers must be present to compute its key.

What an entry's `result` holds: the executor's own result JSON (layer dir
id, created time, inputs; opaque here) wrapped with the compression and
SOURCE_DATE_EPOCH its layer blob was written with. An importer whose build
uses the same two records the fetched blob as that layer dir's blob, so
its image reuses the exact bytes and gets the exporter's digest; with other
settings the layer is recompressed from the unpacked dir when needed.

Import, on a local miss, before the step would run: each --cache-from
reference in order is asked for the step's key; a hit's layer is fetched,
verified (digest, size, diff_id), unpacked into the store (inside the user
namespace when rootless) and indexed, so the step is CACHED and a later
RUN has its lower layers. Only steps the target needs are ever asked for.

Failures: an export the user asked for fails the build (unless
`ignore-error=true`). An import never fails it: a corrupted or malformed
entry is a warning and the step is rebuilt (lamina.cache.remote), and a
registry that cannot be reached or refuses us is warned about once and not
asked again during this build.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from lamina.engine.model import CacheSpec
from lamina.engine.unpack import unpacked_layer
from lamina.errors import LaminaError, PlanError, RegistryError
from lamina.oci.digest import Digest

if TYPE_CHECKING:
    from lamina.cache.remote import CacheEntry
    from lamina.cache.store import Store
    from lamina.engine.cachekey import KeyInputs
    from lamina.engine.model import BuildResult, StageState, StepHost
    from lamina.engine.output import ImageLayer
    from lamina.oci.image import Descriptor
    from lamina.oci.reference import Reference
    from lamina.oci.registry import RegistryClient

MODES = ("min", "max")
_WORKERS = 4  # parallel layer compressions and uploads of an export
_HEX64 = re.compile(r"[0-9a-f]{64}")
# buildx keys that mean nothing for lamina's format; accepted so copied flags work.
_IGNORED_KEYS = frozenset({"oci-mediatypes", "image-manifest", "compression", "compression-level"})


def parse_cache_spec(text: str, flag: str) -> CacheSpec:
    """`type=registry,ref=REF[,mode=min|max][,ignore-error=true]`; a bare REF means type=registry."""
    from lamina.oci.reference import parse_reference

    fields: dict[str, str] = {}
    if "=" not in text:
        fields = {"type": "registry", "ref": text.strip()}
    for part in text.split(",") if not fields else ():
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise PlanError(f"invalid {flag} {text!r}: {part!r} is not key=value")
        fields[key] = value.strip()
    kind = fields.pop("type", "registry")
    if kind != "registry":
        raise PlanError(f"invalid {flag} {text!r}: only type=registry is supported, not {kind!r}")
    ref_text = fields.pop("ref", "")
    if not ref_text:
        raise PlanError(f"invalid {flag} {text!r}: missing ref=")
    mode = fields.pop("mode", "min").lower()
    if mode not in MODES or (mode != "min" and flag == "--cache-from"):
        raise PlanError(f"invalid {flag} {text!r}: mode must be min or max (and only for --cache-to)")
    ignore = fields.pop("ignore-error", "false").lower()
    if ignore not in ("true", "false"):
        raise PlanError(f"invalid {flag} {text!r}: ignore-error must be true or false")
    unknown = sorted(set(fields) - _IGNORED_KEYS)
    if unknown:
        raise PlanError(f"invalid {flag} {text!r}: unknown key {unknown[0]!r}")
    try:
        ref = parse_reference(ref_text)
    except RegistryError as err:
        raise PlanError(f"invalid {flag} {text!r}: {err}") from err
    if ref.digest is not None:
        raise PlanError(f"invalid {flag} {text!r}: a cache ref takes a tag, not a digest")
    return CacheSpec(ref, mode, ignore == "true")


def parse_cache_specs(texts: Iterable[str], flag: str) -> tuple[CacheSpec, ...]:
    return tuple(parse_cache_spec(text, flag) for text in texts)


# --- the wrapped result ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Wrapped:
    step: str  # the executor's result JSON
    layer: str | None  # its layer dir id (64 hex digits), None for a step that changed nothing
    compression: str
    epoch: int | None


def _wrap(step: str, compression: str, epoch: int | None) -> str:
    from lamina.oci.image import canonical_json

    return canonical_json({"compression": compression, "epoch": epoch, "step": step}).decode()


def _unwrap(text: str) -> _Wrapped | None:
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
    return _Wrapped(step, layer, compression, epoch)


# --- import ---------------------------------------------------------------------------


class RemoteCache:
    """The --cache-from side of one build: a registry client made on first use, refs that failed."""

    def __init__(
        self,
        specs: Sequence[CacheSpec],
        client_factory: Callable[[], RegistryClient] | None,
        warn: Callable[[str], None],
    ) -> None:
        self.specs = tuple(specs)
        self._factory = client_factory
        self._warn = warn
        self._client: RegistryClient | None = None
        self._lock = threading.Lock()
        self._disabled: set[Reference] = set()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _get_client(self) -> RegistryClient:
        with self._lock:
            if self._client is None:
                if self._factory is None:
                    raise RegistryError("--cache-from needs a registry client")
                self._client = self._factory()
            return self._client

    def fetch(self, executor: StepHost, inputs: KeyInputs, state: StageState) -> Any:
        """The step's result after importing it from a --cache-from ref, or None (run the step).

        Call it under the step's key lock, after a local miss.
        """
        if executor.options.no_cache or state.no_cache or executor.options.dry_run:
            return None
        key = inputs.key()
        for spec in self.specs:
            if spec.ref in self._disabled:
                continue
            if self._import(executor, spec.ref, key):
                return executor.lookup(inputs, state)
        return None

    def _import(self, executor: StepHost, ref: Reference, key: str) -> bool:
        from lamina.cache.remote import import_entry

        store = executor.store
        try:
            entry = import_entry(self._get_client(), store, ref, key, warn=self._warn)
        except RegistryError as err:
            with self._lock:
                self._disabled.add(ref)
            self._warn(f"--cache-from {ref}: {err}; not using it for the rest of this build")
            return False
        if entry is None:
            return False
        what = f"import cache {ref} key {key}"
        wrapped = _unwrap(entry.result)
        if wrapped is None or (wrapped.layer is None) != (entry.layer is None):
            self._warn(f"{what}: not a result this lamina understands; rebuilding the step instead")
            return False
        refs: list[Digest] = []
        if wrapped.layer is not None and entry.layer is not None and entry.diff_id is not None:
            wrapped = _named_by_key(wrapped, key)
            try:
                unpacked_layer(store, entry.layer.digest, Digest("sha256", wrapped.layer))
            except LaminaError as err:  # a verified blob can still be a hostile tar
                self._warn(f"{what}: {err}; rebuilding the step instead")
                return False
            _remember_blob(store, wrapped, entry.layer, entry.diff_id)
            refs.append(Digest("sha256", wrapped.layer))
        store.cache_put(key, wrapped.step, refs=refs)
        return True


def _named_by_key(wrapped: _Wrapped, key: str) -> _Wrapped:
    """The result with its layer dir named by the step's key, whatever the exporter called it.

    A remote entry must not be able to point a step at a directory this
    store already has for something else (a base layer's diff_id, another
    step's result); the key's own name can only hold this step's result.
    """
    hexdigest = key.split(":", 1)[1]
    step = json.loads(wrapped.step)
    step["layer"] = hexdigest
    return dataclasses.replace(wrapped, step=json.dumps(step), layer=hexdigest)


def _remember_blob(store: Store, wrapped: _Wrapped, blob: Descriptor, diff_id: Digest) -> None:
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
    from lamina.engine.cachekey import layer_blob_key

    memo = layer_blob_key(str(wrapped.layer), wrapped.compression, wrapped.epoch)
    record = {
        "digest": str(blob.digest),
        "diff_id": str(diff_id),
        "size": blob.size,
        "media_type": blob.media_type,
    }
    store.cache_put(memo, json.dumps(record), refs=[blob.digest, Digest("sha256", str(wrapped.layer))])


# --- export ---------------------------------------------------------------------------


def stage_chain(executor: StepHost) -> set[str]:
    """Names of the target stage and the stages it is built FROM (mode=min's steps)."""
    plan = executor.plan
    names: set[str] = set()
    index: int | None = plan.target
    while index is not None and index in plan.stages:
        names.add(plan.stages[index].name)
        index = plan.stages[index].base_stage
    return names


def cache_entries(executor: StepHost, result: BuildResult, mode: str) -> list[CacheEntry]:
    """The entries to export: each step's result and (compressed on demand) layer blob."""
    from lamina.cache.remote import CacheEntry
    from lamina.engine.output import layer_blob

    store = executor.store
    options = executor.options
    layers = _layers_by_dir(executor)
    chain = stage_chain(executor) if mode == "min" else None
    entries: list[CacheEntry] = []
    jobs: list[tuple[int, ImageLayer, list[Any]]] = []  # entries whose layer blob is still to be found
    seen: set[str] = set()
    for step in result.steps:
        if not step.key or step.key in seen or (chain is not None and step.stage not in chain):
            continue
        seen.add(step.key)
        text = store.cache_get(step.key)
        if text is None:
            continue
        wrapped = _wrap(text, options.compression, executor.epoch)
        unwrapped = _unwrap(wrapped)
        if unwrapped is None:
            continue  # not a result of this lamina's format
        if unwrapped.layer is None:
            entries.append(CacheEntry(step.key, wrapped))
            continue
        found = layers.get(unwrapped.layer)
        if found is None:
            continue  # a result another build wrote for this key, with a layer this one never used
        layer, lowers = found
        jobs.append((len(entries), layer, lowers))
        entries.append(CacheEntry(step.key, wrapped))

    def compress(job: tuple[int, ImageLayer, list[Any]]) -> None:
        index, layer, lowers = job
        blob, diff_id = layer_blob(store, layer, options.compression, executor.epoch, lowers)
        entries[index] = dataclasses.replace(entries[index], layer=blob, diff_id=diff_id)

    _in_parallel(jobs, compress)  # a blob made once (e.g. for the image) is found, not redone
    return entries


def _in_parallel(items: Sequence[Any], work: Callable[[Any], Any]) -> list[Any]:
    """`work` over `items` on a few threads (compression and HTTP release the GIL); first error raised."""
    if len(items) <= 1:
        return [work(item) for item in items]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(_WORKERS, len(items))) as pool:
        return list(pool.map(work, items))


def _layers_by_dir(executor: StepHost) -> dict[str, tuple[ImageLayer, list[Any]]]:
    """Every built layer of every stage of this build, with the layer dirs below it (top-most first)."""
    out: dict[str, tuple[ImageLayer, list[Any]]] = {}
    for index in executor.plan.stages:
        try:
            outcome = executor.outcome(index)
        except LaminaError:
            continue
        for i, layer in enumerate(outcome.layers):
            if layer.dir_id and layer.dir_id not in out:
                out[layer.dir_id] = (layer, [below.path for below in reversed(outcome.layers[:i])])
    return out


def _export_one(client: RegistryClient, store: Store, ref: Reference, entry: CacheEntry) -> int:
    from lamina.cache.remote import export_entries

    return export_entries(client, store, ref, [entry])


def export_cache(executor: StepHost, result: BuildResult) -> int:
    """Push this build's cache to every --cache-to ref; return the entries written."""
    factory = executor.options.client_factory
    written = 0
    for spec in executor.options.cache_to:
        try:
            if factory is None:
                raise RegistryError("--cache-to needs a registry client")
            entries = cache_entries(executor, result, spec.mode)
            with factory() as client:
                # One entry per call: entries are independent, so they go up side by side.
                one = functools.partial(_export_one, client, executor.store, spec.ref)
                counts = _in_parallel(entries, one)
                written += sum(counts)
        except LaminaError as err:
            if not spec.ignore_error:
                raise
            executor.sink.warn(f"--cache-to {spec.ref}: {err} (ignored: ignore-error=true)")
    return written
