"""The executor: run a plan's stages, cache every step, export the target.

This is the one module where the front end (the plan), the sandbox, the
content store and the OCI writers meet.

How a stage runs. A stage starts from its base: an image in the store (its
layers unpacked in overlay form), an earlier stage's outcome, or scratch.
Its steps then run in order on a `StageState`: the image config so far,
the stack of layer directories, and the chain key. Metadata steps (ENV,
LABEL, USER, ...) only change the config and are recomputed every build;
they are pure and cheap. Filesystem steps (RUN, COPY, ADD, WORKDIR) are
cached: each has a key (cachekey.KeyInputs: the chain key, the expanded
instruction, the ARG/ENV values it can see, the platform, and the digest
of its input files) and a result (the layer directory it made, or none when
the step changed nothing, and when it was made). A RUN's upper directory
*is* the step's layer directory; nothing is compressed until an output
needs a blob (output.layer_blob), and a blob once made is reused.

Why metadata steps do not enter the chain key: a changed ARG must re-run
only the steps that can see it (BuildKit's behaviour). RUN sees the whole
environment (ENV and declared ARGs), the user, the working directory and
the shell, so its key includes them; COPY sees only what its expanded
instruction and its files say.

Stages run in the plan's waves: the stages of a wave are independent and
run concurrently on a thread pool bounded by `--jobs`; each RUN is its own
sandbox helper process, so threads only wait.

Timestamps: a history entry's `created` is the time its step's result was
made (kept in the cache result, so a no-op rebuild gives the same config and
the same digest); metadata steps take the time of the step before them.
SOURCE_DATE_EPOCH replaces all of them and clamps new layers' mtimes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.model import (
    BuildOptions,
    BuildResult,
    StageOutcome,
    StageState,
    StepRecord,
)
from lamina.engine.progress import BuildSummary, ContextSink, ProgressSink
from lamina.engine.stepcache import BuildStepCache
from lamina.errors import BuildError, DiskFull, LaminaError, is_disk_full

# A no-op rebuild imports this module and replays its memo: what only a real
# build needs (thread pools, outputs, step metadata) is imported where used.
if TYPE_CHECKING:
    from lamina.cache.statcache import StatCache
    from lamina.cache.store import Store
    from lamina.engine.context import SourceTree
    from lamina.engine.plan import Plan
    from lamina.oci.image import ImageConfig


def _now() -> str:
    from lamina.oci.image import format_time

    return format_time(int(time.time()))


# --- the build ----------------------------------------------------------------------------


class Executor:
    """One build: the plan, the store, the progress sink, the records of every step."""

    def __init__(self, options: BuildOptions, sink: ProgressSink, store: Store, plan: Plan) -> None:
        self.options = options
        self.sink = sink
        self.store = store
        self.plan = plan
        self.records: list[StepRecord] = []
        self._lock = threading.Lock()
        self._outcomes: dict[object, StageOutcome] = {}  # by plan.identity: shared across platforms
        self._rootfs: dict[tuple[str, tuple[str, ...]], Path] = {}  # (stage key, paths) -> tree
        self._rootfs_lock = threading.Lock()
        self._opened = contextlib.ExitStack()  # rootless: the trees' shut dirs, opened until cleanup
        # Rootless: stage-view root -> {path: host owner} the view copy could not keep.
        self.lost_owners: dict[Path, dict[str, tuple[int, int]]] = {}
        self._context: SourceTree | None = None
        self._stat_cache: StatCache | None = None
        self._scratch = Path(store.root) / "tmp"
        self._scratch.mkdir(exist_ok=True)
        self._warned: set[str] = set()
        self.epoch = options.source_date_epoch
        if self.epoch is None:
            self.epoch = _dockerfile_epoch(plan)
        self.images: dict[tuple[str, str], StageOutcome] = {}  # base images loaded, by (ref, platform)
        self.totals: dict[str, int] = {}  # stage (as shown) -> its filesystem steps, for replays
        self.froms: dict[str, str] = {}  # stage (as shown) -> `FROM image` (its step 1), for replays
        self.pruned_cache_ids: dict[str, object] = {}  # cache mounts emptied by this build (--no-cache)
        self.temp_files: list[Path] = []  # e.g. secrets given by environment variable
        self.fetched: dict[str, Any] = {}  # ADD <url>: fetched once per build (steps.copyadd.fetch)
        self.dirty: set[str] = set()  # --dry-run: stages with a step that would run
        self._image_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._stage_locks: dict[object, threading.Lock] = collections.defaultdict(threading.Lock)
        self._building = threading.local()  # the stages this thread is building, innermost last
        # Set on Ctrl-C, which only the main thread sees: long steps in the workers poll it.
        self.stop = threading.Event()
        self.cache = BuildStepCache(options, store, self.records, self.warn_once)
        self._root = self  # the first target's executor: siblings share its state
        self.family: list[Executor] = [self]  # every target platform's executor (shared)

    def sibling(self, plan: Plan) -> Executor:
        """An executor of the same build for another target platform's plan: every piece of
        state is shared (outcomes by stage identity, so a stage the same in both plans, e.g.
        `FROM --platform=$BUILDPLATFORM`, is built once; records, images, the step cache)."""
        import copy

        other = copy.copy(self)
        other.plan = plan
        self.family.append(other)
        return other

    def image_lock(self, ref: str) -> threading.Lock:
        with self._lock:
            return self._image_locks[ref]

    # --- helpers used by steps ------------------------------------------------------------

    def warn_once(self, message: str) -> None:
        with self._lock:
            if message in self._warned:
                return
            self._warned.add(message)
        self.sink.warn(message)

    def created(self, state: StageState) -> str | None:
        if self.epoch is not None:
            from lamina.oci.image import format_time

            return format_time(self.epoch)
        return state.created

    def context(self) -> SourceTree:
        """The build context, opened on first use (a build with no COPY never walks it)."""
        if self._root is not self:
            return self._root.context()
        with self._lock:
            if self._context is None:
                from lamina.cache.statcache import StatCache
                from lamina.engine.context import open_build_context

                self._stat_cache = StatCache(Path(self.store.root))
                self._stat_cache.stop = self.stop  # keying a big context ends at Ctrl-C
                if isinstance(self.sink, ContextSink):  # "load build context: N/M files hashed"
                    self._stat_cache.progress = self.sink.context_progress
                dockerfile = self.options.dockerfile
                self._context = open_build_context(
                    self.options.context, self._stat_cache, dockerfile, ignore=not self.options.remote_context
                )
            return self._context

    def stat_cache(self) -> StatCache:
        if self._root is not self:
            return self._root.stat_cache()
        self.context()
        assert self._stat_cache is not None
        return self._stat_cache

    def stage_rootfs(self, outcome: StageOutcome, paths: Sequence[str] = ("/",)) -> Path:
        """A read-only-use tree of a stage's files under `paths` (COPY --from, mounts).

        Only the subtrees asked for are copied out of the layer dirs, so
        taking one directory from a big builder stage costs little. Made
        once per (stage, paths) per build.
        """
        wanted = tuple(sorted(set(paths)))
        with self._rootfs_lock:
            found = self._rootfs.get((outcome.key, wanted))
            if found is not None:
                return found
            from lamina.engine.steps.layerview import LayerView, materialize

            dest = Path(self._tmpdir("rootfs-")) / "root"
            lost = materialize(LayerView(outcome.layer_dirs), list(wanted), dest)
            from lamina.oci.opened import opened

            self._opened.enter_context(opened([dest]))  # COPY --from reads it (true modes: true_stat)
            self._rootfs[(outcome.key, wanted)] = dest
            self.lost_owners[dest] = lost
            return dest

    def _tmpdir(self, prefix: str) -> str:
        import tempfile

        return tempfile.mkdtemp(prefix=prefix, dir=self._scratch)

    def record(self, record: StepRecord) -> None:
        with self._lock:
            self.records.append(record)

    def cleanup(self) -> None:
        import shutil

        for path in self._rootfs.values():
            shutil.rmtree(path.parent, ignore_errors=True)
        self._opened.close()
        for path in self.temp_files:
            path.unlink(missing_ok=True)
        if self._stat_cache is not None:
            self._stat_cache.save()
        self.cache.close()

    # --- running --------------------------------------------------------------------------

    def run(self) -> BuildResult:
        import concurrent.futures

        start = time.monotonic()
        for warning in self.plan.warnings:
            self.sink.warn(warning)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.options.jobs))
        from lamina.engine.multiplatform import stopping_on_interrupt

        with stopping_on_interrupt(self, pool):
            target = self.build_target(pool)
        pool.shutdown(wait=True)
        return self._finish(target, start)

    def build_target(self, pool: Any) -> StageOutcome:
        """Run the plan's waves on `pool` (shared by every target platform, so --jobs bounds
        them all) and return the target stage's outcome."""
        for wave in self.plan.waves:
            futures = {pool.submit(self.outcome, i): i for i in wave}
            failure: BaseException | None = None
            for future in _completed(futures):
                try:
                    future.result()
                except BaseException as err:
                    # Keep the first failure; stages not started yet are dropped.
                    failure = failure or err
                    for pending in futures:
                        pending.cancel()
            if failure is not None:
                raise failure
        return self.outcome(self.plan.target)

    def outcome(self, index: int) -> StageOutcome:
        """Stage `index` built (once, whoever asks first; others wait for it).

        The plan's waves build every stage the target needs as the Dockerfile
        shows it; a base image's ONBUILD trigger may still name another stage
        (`COPY --from=builder`), which is then built here, when first needed,
        as BuildKit re-plans after reading the triggers.
        """
        from lamina.engine.steps.dispatch import run_stage

        identity = self._identity(index)
        with self._lock:
            lock = self._stage_locks[identity]
        building: list[object] = self._building.__dict__.setdefault("stack", [])
        if identity in building:
            raise BuildError(f"stage {self._stage_name(index)} needs itself (a circular dependency)")
        with lock:
            found = self._outcomes.get(identity)
            if found is not None:
                return found
            if not 0 <= index < len(self.plan.stages):
                raise BuildError(f"stage {index} does not exist")
            stage = self.plan.stages[index]
            building.append(identity)
            try:
                outcome = run_stage(self, stage)
            finally:
                building.pop()
            self._outcomes[identity] = outcome
            return outcome

    def _identity(self, index: int) -> object:
        """plan.identity, and in a build of several platforms the target's values of the ARGs
        a base image's ONBUILD triggers declare (multiplatform.onbuild_args), here and in
        what the stage needs."""
        if not 0 <= index < len(self.plan.stages):
            return index
        if len(self.family) == 1:
            return self.plan.identity(index)
        from lamina.engine.multiplatform import onbuild_args

        deps = tuple(self._identity(dep) for dep in self.plan.stages[index].deps)
        return (self.plan.identity(index), onbuild_args(self, self.plan.stages[index]), deps)

    def _stage_name(self, index: int) -> str:
        if 0 <= index < len(self.plan.stages):
            return self.plan.stages[index].display_name
        return str(index)

    def _finish(self, target: StageOutcome, start: float) -> BuildResult:
        from lamina.engine.output import make_image, write_output
        from lamina.engine.outputspec import OutputType
        from lamina.engine.steps import metadata as md

        if self.options.dry_run:
            seconds = time.monotonic() - start
            return BuildResult("", "", target.config, (), tuple(self.records), seconds, target.name)

        config = md.merge_labels(target.config, self.options.labels)
        created = self.created_for_image(target)
        config = dataclasses.replace(config, created=created)
        if self.options.platforms:  # a target platform asked for names the image's platform
            from lamina.engine.multiplatform import target_config

            config = target_config(config, self.plan.target_platform)
        lazy = self._lazy_image()
        image = make_image(self.store, config, target.layers, self.options.compression, self.epoch, lazy)
        if any(spec.inline for spec in self.options.cache_to):  # --cache-to type=inline
            from lamina.engine.stepcache import inline_field

            config = dataclasses.replace(config, extra=(inline_field(self, self.records, image.diff_ids),))
            image = make_image(self.store, config, target.layers, self.options.compression, self.epoch)
        # Each output's image as its exporter attributes make it (engine.imageexport); the
        # tags name the first type=image output's, as buildx fills its name= with them.
        from lamina.engine.imageexport import attestation_files, export_all, remember_index

        outputs = self.options.outputs
        statements = self.statements(image, config, target)
        args = (self.options.compression, self.epoch, config.platform, statements)
        exported = export_all(self.store, image, target.layers, outputs, *args, self.options.tags)
        images = [e for o, e in zip(outputs, exported, strict=True) if o.type is OutputType.IMAGE and e]
        tagged = images[0] if images else image
        names = self._tag(tagged, config)
        remember_index(self.store, names, tagged)
        for output, made in zip(outputs, exported, strict=True):
            if output.type is OutputType.IMAGE:
                remember_index(self.store, self._tag(made, config, output.names), made)
                continue
            # type=local/tar get the attestations as files (provenance.json), as BuildKit's.
            files = (
                attestation_files(statements, self.epoch, output.attestation_prefix)
                if statements and not made
                else None
            )
            for warning in write_output(
                output, self.store, made or image, target.layer_dirs, names, self.epoch, files
            ):
                self.warn_once(warning)  # what a rootless type=local could not keep
        seconds = time.monotonic() - start
        records = tuple(self.records)
        result = BuildResult(
            # with attestations, the index's digest, as BuildKit reports containerimage.digest
            "" if image.pending else str(getattr(tagged, "top", tagged.manifest).digest),
            str(image.config.digest),
            dataclasses.replace(config, diff_ids=image.diff_ids),
            names,
            records,
            seconds,
            target.name,
            pending=str(image.manifest.digest) if image.pending else "",
        )
        self.sink.finish(
            BuildSummary(
                result.image_digest,
                result.config_digest,
                result.steps_cached,
                result.steps_run,
                seconds,
                pending=image.pending,
            )
        )
        return result

    def _lazy_image(self) -> bool:
        """Whether the image may stay pending (cache.store): asked for, and nothing in this build
        needs its manifest or blobs (only the store takes it, as the image exporter's defaults
        make it; no attestation, cache export or push names it). A multi-platform build's
        images are compressed at once (multiplatform: its index names their manifests)."""
        from lamina.engine.imageexport import default_export
        from lamina.engine.outputspec import OutputType

        options = self.options
        return (
            options.lazy_image
            and not options.cache_to
            and options.provenance is None
            and options.sbom is None
            and all(
                o.type is OutputType.IMAGE
                and not o.push
                and default_export(o, options.compression)
                and o.epoch(self.epoch) == self.epoch
                for o in options.outputs
            )
        )

    def statements(
        self, image: Any, config: ImageConfig, target: StageOutcome | None = None
    ) -> tuple[Any, ...]:
        """The attestations to attach (--provenance, --sbom), as in-toto statements without subjects."""
        found: list[Any] = []
        if self.options.provenance is not None:
            from lamina.engine.provenance import provenance_statement

            found.append(provenance_statement(self, config))
        if self.options.sbom is not None:
            if target is None:
                raise BuildError("--sbom of a build for several platforms is not supported")
            from lamina.engine import sbom

            more = sbom.extras(self, self.plan.target)  # BUILDKIT_SBOM_SCAN_CONTEXT / _STAGE
            found += sbom.statements(self, self.options.sbom, self.stage_rootfs(target), more)
        return tuple(found)

    def created_for_image(self, target: StageOutcome) -> str:
        if self.epoch is not None:
            from lamina.oci.image import format_time

            return format_time(self.epoch)
        return target.created or _now()

    def _tag(self, image: Any, config: ImageConfig, names: Sequence[str] | None = None) -> tuple[str, ...]:
        from lamina.oci.reference import store_name

        wanted = tuple(self.options.tags if names is None else names)
        size = image.config.size + sum(layer.size for layer in image.layers)
        done = []
        for name in wanted:
            full = store_name(name)
            self.store.tag(full, image.manifest.digest, size=size, created=config.created or "")
            done.append(full)
        return tuple(done)


def execute(options: BuildOptions, sink: ProgressSink) -> BuildResult:
    """Plan the Dockerfile, run the stages the target needs, write the outputs.

    An unchanged build that went to the store is replayed from its memo
    (steps.replay) without planning it again.
    """
    from lamina.cache.store import Store
    from lamina.engine import statpass
    from lamina.engine.steps.replay import memo_key, record, replay
    from lamina.oci.reference import store_name

    statpass.forget()  # a listing an earlier build of this process left (it failed) is stale
    start = time.monotonic()
    for name in options.tags:
        store_name(name)  # a bad -t fails before the build, not after it
    from lamina.engine.dockerfile.source import read_source

    dockerfile = options.dockerfile or options.context / "Dockerfile"
    try:
        data: bytes | None = read_source(dockerfile)  # capped: parse refuses a larger one
    except OSError:
        data = None  # make_plan says why
    from lamina.engine.sourceepoch import resolved

    options = resolved(options, data)  # SOURCE_DATE_EPOCH=context, =<stage>, =<named context>
    with Store(options.cache_root) as store:
        from lamina.engine.buildchecks import for_build

        checks = for_build(options, data, store, sink)  # BuildKit's build checks; error=true raises
        # A --cache-to build runs for real: a replay has no step results to export.
        replayable = data is not None and not options.cache_to
        key = memo_key(options, dockerfile, data) if replayable else None
        if key is not None:
            replayed = replay(store, key, options, sink, start)
            if replayed is not None:
                return dataclasses.replace(replayed, checks=checks)
        from lamina.engine.multiplatform import check_options, check_runnable, makes_index
        from lamina.engine.steps.dispatch import make_plans

        check_options(options)  # and whether it makes an index (multiplatform.makes_index)
        plans = make_plans(options, data)  # the bytes read once, above; one plan per --platform
        check_runnable(plans, options.isolation)
        plan = plans[0]
        executor = Executor(options, sink, store, plan)
        siblings = [executor.sibling(other) for other in plans[1:]]
        result = _run(executor, options, sink, siblings, index=makes_index(options))
        statpass.forget()  # what the memo's stat pass saw, kept for this build's walks
        if key is not None:
            images = [  # each base image per platform (every target's executor shares the dict)
                [store_name(ref, pinned=True), platform, outcome.key.split(":", 1)[1]]
                for (ref, platform), outcome in executor.images.items()
            ]
            record(
                store,
                key,
                result,
                images,
                dict(executor.totals),
                plan.warnings,
                executor.froms,
                len(plan.stages) == 1,
            )
        from lamina.engine.buildchecks import after_build

        return dataclasses.replace(result, checks=after_build(options, data, store, sink, checks))


def _run(
    executor: Executor,
    options: BuildOptions,
    sink: ProgressSink,
    siblings: Sequence[Executor] = (),
    index: bool = False,
) -> BuildResult:
    """Run the build (with `siblings`: the other target platforms') and export --cache-to; any
    failure is one line, the sink told it ended."""
    try:
        if siblings or index:
            from lamina.engine import multiplatform

            start = time.monotonic()
            executors = (executor, *siblings)
            result = multiplatform.finish(executors, multiplatform.run_platforms(executors), start)
        else:
            result = executor.run()
        if options.cache_to and not options.dry_run:
            from lamina.engine.stepcache import export_cache

            export_cache(executor, result)
        return result
    except LaminaError:
        sink.finish(None)
        raise
    except OSError as err:  # writing the image or an output: still one line
        sink.finish(None)
        if is_disk_full(err):
            raise BuildError(f"build: {DiskFull.writing(None, err)}") from err
        what = f"{err.filename}: " if err.filename else ""
        raise BuildError(f"build: {what}{err.strerror or err}") from err
    finally:
        executor.cleanup()
        from lamina.oci import fresh

        fresh.clear()  # what a COPY kept for the layer writer is this build's only


def _dockerfile_epoch(plan: Any) -> int | None:
    """BuildKit's Dockerfile default: a global `ARG SOURCE_DATE_EPOCH=...` when no value is given."""
    from lamina.errors import PlanError

    text = plan.global_args.get("SOURCE_DATE_EPOCH") if plan is not None else None
    if not text:
        return None
    if text.isdigit():
        return int(text)
    raise PlanError(f"invalid SOURCE_DATE_EPOCH: {text}")  # a source is a number by now (sourceepoch)


def _completed(futures: Iterable[Any]) -> Iterator[Any]:
    """concurrent.futures.as_completed, also yielding a future that another platform's failure
    dropped (pool.shutdown(cancel_futures=True)): CPython tells no waiter of those, so
    as_completed would wait for them forever."""
    import concurrent.futures

    pending = set(futures)
    while pending:
        done, pending = concurrent.futures.wait(pending, 0.5, concurrent.futures.FIRST_COMPLETED)
        dropped = {future for future in pending if future.cancelled()}
        pending -= dropped
        yield from (*done, *dropped)
