"""The step cache of one build: a step's key looked up, its layer committed, a miss explained.

Every filesystem step goes through `layerstep.layer_step`, which uses only
this: `lookup` in the store's index (the key layout is cachekey's), on a
miss `fetch_remote` (--cache-from, lamina.cache.remote) under `step_lock`,
else a `new_upper` dir the step fills and `commit_layer` publishes;
`apply_result` moves the stage past the step. `step_position`,
`remember_position` and `explain` say why a step missed, against what the
same step had last time. After the build `export_cache` hands this build's
results to --cache-to.

What is exported:
  - mode=min (the default, as in BuildKit): the steps of the target stage
    and of the stages it is built FROM, i.e. the steps whose layers the
    image has. A `COPY --from=builder` among them goes by two keys: the
    content of the files it copies, and its definition key (the builder's
    key in their place, `define`), which an importer matches when the
    builder, not exported, ran again and made other files (`fetch_defined`).
  - mode=max: every filesystem step that ran or hit in this build, builder
    stages included, so another machine skips the builder stages too.
An export the user asked for fails the build (unless `ignore-error=true`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.model import CacheResult
from lamina.errors import BuildError, LaminaError, RegistryError
from lamina.oci.digest import Digest

# The executor imports this module on the no-op replay path too (tests/test_imports.py):
# what only a real build needs (the remote cache, the output writers, the sandbox,
# the miss explainer) is imported in the functions that use it.
if TYPE_CHECKING:
    from lamina.cache.remote import CacheEntry, RemoteCache
    from lamina.cache.store import Store
    from lamina.engine.cachekey import KeyInputs
    from lamina.engine.model import BuildOptions, BuildResult, StageState, StepHost, StepRecord
    from lamina.engine.output import ImageLayer


def _now() -> str:
    from lamina.oci.image import format_time

    return format_time(int(time.time()))


class BuildStepCache:
    """The step cache as one build sees it: the store's index, and --cache-from on a miss.

    `records` is the build's list of step records (read by `explain`, to name
    the upstream steps that ran); it meets model.StepCache.
    """

    def __init__(
        self, options: BuildOptions, store: Store, records: list[StepRecord], warn: Callable[[str], None]
    ) -> None:
        self.options = options
        self.store = store
        self.records = records
        self.remote: RemoteCache | None = None
        if options.cache_from:
            from lamina.cache.remote import RemoteCache
            from lamina.engine.cachekey import layer_blob_key
            from lamina.engine.unpack import unpacked_layer

            self.remote = RemoteCache(
                options.cache_from, options.client_factory, warn, unpacked_layer, layer_blob_key
            )

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()

    # --- the local index ------------------------------------------------------------------

    def lookup(self, inputs: KeyInputs, state: StageState) -> CacheResult | None:
        if self.options.no_cache or state.no_cache:
            return None
        text = self.store.cache_get(inputs.key())
        if text is None:
            return None
        result = CacheResult.from_json(text)
        if result is None:
            return None
        if result.layer is not None and not self.store.has_unpacked(Digest("sha256", result.layer)):
            return None  # gc took the layer dir
        return result

    def fetch_remote(self, inputs: KeyInputs, state: StageState) -> CacheResult | None:
        """The step's result after importing it from a --cache-from ref, or None (run the step).

        Call it under the step's key lock, after a local miss.
        """
        if self.remote is None or self.options.no_cache or state.no_cache or self.options.dry_run:
            return None
        if self.remote.fetch(self.store, inputs.key()):
            return self.lookup(inputs, state)
        return None

    def fetch_defined(self, defined: KeyInputs, state: StageState) -> tuple[CacheResult, KeyInputs] | None:
        """A COPY --from's result by its definition key, from --cache-from: (the result, the
        inputs it was made with, whose key the stage goes on from).

        BuildKit reaches a step through its inputs' definitions without their results, so the
        final COPY of a mode=min cache hits even though the stage it copies from (not exported)
        ran again here and made other files. Not when something is rebuilt on purpose
        (--no-cache, --no-cache-filter): then the files copied decide, as for a local hit.
        """
        from lamina.engine.cachekey import KeyInputs

        if (
            self.remote is None
            or self.options.no_cache
            or self.options.no_cache_filter
            or self.options.dry_run
        ):
            return None
        key = defined.key()
        if not self.remote.fetch(self.store, key):
            return None
        result = self.lookup(defined, state)
        if result is None:
            return None
        try:
            made = KeyInputs.from_json(result.inputs)
        except (ValueError, KeyError, TypeError):
            return None
        if dataclasses.replace(made, content=defined.content) != defined:
            return None  # another step's result: only the files it copied may differ
        refs = [Digest("sha256", result.layer)] if result.layer else []
        self.store.cache_put(made.key(), result.to_json(), refs=refs)
        self.define(defined, made)
        return result, made

    def define(self, defined: KeyInputs, inputs: KeyInputs) -> None:
        """Remember that the step keyed `inputs` has the definition key of `defined` (exported
        beside it, stepcache.cache_entries)."""
        from lamina.engine.cachekey import defines_key

        if self.options.dry_run or self.options.no_cache or self.options.no_cache_filter:
            return
        if self.store.cache_get(defines_key(inputs.key())) != defined.key():
            self.store.cache_put(defines_key(inputs.key()), defined.key())

    def commit_layer(self, inputs: KeyInputs, state: StageState, upper: Path) -> CacheResult:
        """Publish a step's upper dir as its layer (or drop it when empty) and record the result."""
        key = inputs.key()
        layer: str | None = None
        if any(upper.iterdir()):
            layer = key.split(":", 1)[1]
            if self.options.no_cache or state.no_cache:
                # Uncached runs must not collide with the cached dir of the same key.
                salt = f"{key}:{time.time_ns()}:{os.getpid()}:{threading.get_ident()}"
                layer = hashlib.sha256(salt.encode()).hexdigest()
            self.store.publish_unpacked(upper, Digest("sha256", layer))
        else:
            from lamina.engine.sandbox import runner  # rootless: removed inside the user namespace

            runner.remove_tree(upper)
        result = CacheResult(layer, _now(), inputs.to_json())
        # Two builds racing on one key: the first result stored wins, so both
        # end with the same layer and timestamps (and the same image digest).
        existing = self.store.cache_get(key) if not (self.options.no_cache or state.no_cache) else None
        if existing is not None:
            found = CacheResult.from_json(existing)
            if found is not None and (
                found.layer is None or self.store.has_unpacked(Digest("sha256", found.layer))
            ):
                return found
        refs = [Digest("sha256", layer)] if layer else []
        self.store.cache_put(key, result.to_json(), refs=refs)
        return result

    def apply_result(self, state: StageState, inputs: KeyInputs, result: CacheResult, step: str = "") -> bool:
        """Move the stage past a step; True when the step added a layer (`step` names it in errors)."""
        state.key = inputs.key()
        state.created = result.created
        if result.layer is None:
            return False
        digest = Digest("sha256", result.layer)
        from lamina.engine.output import ImageLayer

        ran = inputs.instruction.startswith("RUN ")  # steps/run.py's inputs
        layer = ImageLayer(self.store.unpacked_path(digest), dir_id=result.layer, step=step, ran=ran)
        state.layers.append(layer)
        return True

    @contextlib.contextmanager
    def step_lock(self, key: str) -> Iterator[None]:
        """Exclusive use of one cache key across threads and lamina processes (flock).

        Uncached runs (--no-cache) do not wait: their layers never collide.
        """
        if self.options.no_cache:
            yield
            return
        import fcntl

        locks = Path(self.store.root) / "locks"
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / key.split(":", 1)[1], os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def new_upper(self) -> Path:
        upper = self.store.new_unpack_dir()
        # The upper dir's own mode becomes the merged root's: mkdtemp's 0700
        # would lock every other user out of `/`.
        os.chmod(upper, 0o755)
        return upper

    # --- explaining misses ------------------------------------------------------------------

    def step_position(self, state: StageState, instruction: Any, same_text: str = "") -> str:
        """Names one step of one Dockerfile across builds, for explaining its next miss.

        By its place in the stage; with `same_text` (the expanded instruction), by
        that text in the stage instead, which a line inserted above does not move.
        """
        from lamina.engine.cachekey import step_position_key

        dockerfile = os.path.abspath(self.options.dockerfile or self.options.context / "Dockerfile")
        text = f"{dockerfile}\0{state.name}\0{state.index}\0{instruction.name}"
        if same_text:
            text = f"{dockerfile}\0{state.name}\0text\0{same_text}"
        return step_position_key(text)

    def remember_position(self, where: str, inputs: KeyInputs) -> None:
        record = inputs.record_json()
        stored = self.store.cache_get(where)
        if stored == record:
            return
        if stored is not None and not inputs.files:
            from lamina.engine.cachekey import KeyInputs

            try:
                before = KeyInputs.from_json(stored)
            except (ValueError, KeyError, TypeError):
                before = None
            if before is not None and before.files and before.key() == inputs.key():
                return  # a hit that listed no files (COPY --from): keep the list of the run that made it
        self.store.cache_put(where, record)

    def explain(
        self, where: str, inputs: KeyInputs, state: StageState, line: str = "", same_text: str = ""
    ) -> str:
        """Why `inputs` missed: compared with what this step position had last time (cachekey.miss_causes)."""
        from lamina.engine.cachekey import KeyInputs, explain_miss
        from lamina.engine.steps.missfacts import upstream_change

        if self.options.no_cache:
            return "--no-cache"
        if state.no_cache:
            return f"--no-cache-filter {state.name}"
        # The same instruction's last inputs, else those of the step that stood in its place.
        text = (self.store.cache_get(same_text) if same_text else None) or self.store.cache_get(where)
        try:
            previous = KeyInputs.from_json(text) if text is not None else None
        except (ValueError, KeyError, TypeError):
            previous = None  # written by another version of lamina
        upstream = upstream_change(self, previous.base, inputs.base) if previous is not None else ""
        reason = explain_miss(previous, inputs, state.ran, line, upstream)
        if reason == "identical inputs":
            return "the cached result is gone (pruned)"
        return reason


# --- export (--cache-to) ---------------------------------------------------------------------


def stage_chain(host: StepHost) -> set[str]:
    """Names of the target stage and the stages it is built FROM (mode=min's steps)."""
    plan = host.plan
    names: set[str] = set()
    index: int | None = plan.target
    needed = plan.needed
    while index is not None and index in needed:
        names.add(needed[index].display_name)
        index = needed[index].base_stage
    return names


def _stage_name(shown: str) -> str:
    """A step record's stage without the platform a multi-platform build shows before it
    (`linux/arm64 build`: model.StageState.shown; a stage name has no space)."""
    return shown.rsplit(" ", 1)[-1]


def cache_entries(host: StepHost, result: BuildResult, mode: str) -> list[CacheEntry]:
    """The entries to export: each step's result and (compressed on demand) layer blob."""
    import json

    from lamina.cache.remote import CacheEntry, unwrap_result, wrap_result
    from lamina.engine.cachekey import defines_key
    from lamina.engine.output import layer_blobs

    store = host.store
    options = host.options
    layers = _layers_by_dir(host)
    chain = stage_chain(host) if mode == "min" else None
    entries: list[CacheEntry] = []
    jobs: list[tuple[int, ImageLayer, list[Any]]] = []  # entries whose layer blob is still to be found
    seen: set[str] = set()
    for step in result.steps:
        if not step.key or step.key in seen or (chain is not None and _stage_name(step.stage) not in chain):
            continue
        seen.add(step.key)
        text = store.cache_get(step.key)
        if text is None:
            continue
        wrapped = wrap_result(text, options.compression, host.epoch)
        unwrapped = unwrap_result(wrapped)
        if unwrapped is None:
            continue  # not a result of this lamina's format
        # A COPY --from goes by its definition key too (BuildKit's match through the inputs' keys).
        defined = store.cache_get(defines_key(step.key))
        keys = [step.key] + ([defined] if defined and defined not in seen else [])
        seen.update(keys)
        if unwrapped.layer is None:
            entries.extend(CacheEntry(key, wrapped) for key in keys)
            continue
        found = layers.get(unwrapped.layer)
        if found is None:
            continue  # a result another build wrote for this key, with a layer this one never used
        layer, lowers = found
        # Its layer named by the step's key, as an importer names it anyway: a build from this
        # cache (which reached the step by another key) exports the same entries, so the same
        # inline cache and image digest (BuildKit's testCacheMultiPlatformImportExport).
        named = json.loads(unwrapped.step)
        named["layer"] = step.key.split(":", 1)[1]
        wrapped = wrap_result(json.dumps(named), options.compression, host.epoch)
        for key in keys:
            jobs.append((len(entries), layer, lowers))
            entries.append(CacheEntry(key, wrapped))

    # Together (threads as root, one helper rootless); a blob made once (e.g. for the image) is found.
    made = layer_blobs(store, [(layer, lowers) for _, layer, lowers in jobs], options.compression, host.epoch)
    for (index, _, _), (blob, diff_id) in zip(jobs, made, strict=True):
        entries[index] = dataclasses.replace(entries[index], layer=blob, diff_id=diff_id)
    return entries


def _layers_by_dir(host: StepHost) -> dict[str, tuple[ImageLayer, list[Any]]]:
    """Every built layer of every stage of this build, with the layer dirs below it (top-most first)."""
    out: dict[str, tuple[ImageLayer, list[Any]]] = {}
    # A multi-platform build's executors (executor.Executor.family): every target platform's stages.
    hosts = getattr(host, "family", None) or [host]
    for member, index in ((m, i) for m in hosts for i in m.plan.needed):
        try:
            outcome = member.outcome(index)
        except LaminaError:
            continue
        for i, layer in enumerate(outcome.layers):
            if layer.dir_id and layer.dir_id not in out:
                out[layer.dir_id] = (layer, [below.path for below in reversed(outcome.layers[:i])])
    return out


def inline_field(host: StepHost, records: Iterable[Any], diff_ids: Iterable[Any]) -> tuple[str, str]:
    """`--cache-to type=inline`: the image config's field holding the target chain's entries
    (mode=min, as BuildKit's inline cache), the layers by their index in the image."""
    import types

    from lamina.cache.remote import INLINE_FIELD, inline_value

    entries = cache_entries(host, types.SimpleNamespace(steps=tuple(records)), "min")  # type: ignore[arg-type]
    return INLINE_FIELD, inline_value(entries, diff_ids)


def export_cache(host: StepHost, result: BuildResult) -> int:
    """Push this build's cache to every --cache-to ref; return the entries written."""
    from lamina.cache.remote import push_entries

    factory = host.options.client_factory
    written = 0
    for spec in host.options.cache_to:
        if spec.inline:
            continue  # in the image config already (inline_field)
        try:
            if factory is None:
                raise RegistryError("--cache-to needs a registry client")
            entries = cache_entries(host, result, spec.mode)
            written += push_entries(factory, host.store, spec.ref, entries, spec.path)
        except (LaminaError, OSError) as err:  # OSError: writing a type=local cache
            where = f"type=local,dest={spec.path}" if spec.path else str(spec.ref)
            why = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.strerror else str(err)
            if not spec.ignore_error:
                if isinstance(err, OSError):
                    raise BuildError(f"--cache-to {where}: {why}") from err
                raise
            host.sink.warn(f"--cache-to {where}: {why} (ignored: ignore-error=true)")
    return written
