"""A build for several target platforms (`--platform linux/amd64,linux/arm64`): one image each,
one image index over them.

BuildKit converts the Dockerfile once per target platform and solves the graphs together;
lamina plans it once per platform (steps.dispatch.make_plans) and runs one executor per plan,
siblings sharing every piece of state (executor.Executor.sibling). A stage is the same in two
plans when plan.Plan.identity says so: a `FROM --platform=$BUILDPLATFORM` stage that reads no
TARGET* ARG is built once for all targets. All stages run on one thread pool, so `--jobs`
bounds the whole build.

The outputs then get one OCI image index with a manifest per platform (each descriptor with
its platform, each config with its os/architecture/variant): the store's image under `-t`,
`type=image` and `type=oci`; `type=local` and `type=tar` get a directory per platform
(BuildKit's platform-split). What BuildKit refuses (a docker-type output of several platforms) is refused
here before anything runs, as is what lamina does not do yet, in one line each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lamina.errors import OutputError

if TYPE_CHECKING:
    import threading

    from lamina.cache.store import Store
    from lamina.engine.model import BuildOptions, BuildResult, StageOutcome, StepRecord
    from lamina.engine.plan import Plan
    from lamina.engine.progress import ProgressSink
    from lamina.oci.image import Platform


class Executor(Protocol):
    """What this module needs of one target platform's executor (engine.executor.Executor)."""

    options: BuildOptions
    plan: Plan
    store: Store
    sink: ProgressSink
    records: list[StepRecord]
    epoch: int | None
    stop: threading.Event

    def build_target(self, pool: Any) -> StageOutcome: ...
    def created_for_image(self, target: StageOutcome) -> str: ...
    def statements(self, image: Any, config: Any) -> tuple[Any, ...]: ...
    def warn_once(self, message: str) -> None: ...


@contextlib.contextmanager
def stopping_on_interrupt(executor: Executor, pool: Any) -> Iterator[None]:
    """On any failure, drop the stages not started; on Ctrl-C (which only the main thread
    sees) also stop the sandboxes the workers wait on and the copies they are making."""
    try:
        yield
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            from lamina.engine.sandbox.runner import stop_all

            executor.stop.set()
            stop_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise


_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})


def makes_index(options: BuildOptions) -> bool:
    """Whether the build exports an image index: several --platform values, or BuildKit's
    `--build-arg BUILDKIT_MULTI_PLATFORM=1` (an index even of one platform); the value is read
    as Go's strconv.ParseBool, as dockerui reads it."""
    if len(options.platforms) > 1:
        return True
    value = dict(options.build_args).get("BUILDKIT_MULTI_PLATFORM")
    if value is None or value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise OutputError(f"invalid boolean value for BUILDKIT_MULTI_PLATFORM: {value}")


def check_options(options: BuildOptions) -> None:
    """What a build of several platforms cannot give, refused before it starts."""
    from lamina.engine.outputspec import OutputType

    if not makes_index(options):
        return
    for output in options.outputs:
        if output.type is OutputType.DOCKER:  # buildx's own words
            raise OutputError("docker exporter does not currently support exporting manifest lists")
        split = output.type in (OutputType.LOCAL, OutputType.TAR) and output.platform_split is False
        if split and len(options.platforms) > 1:
            raise OutputError(
                f"--output type={output.type.value},platform-split=false: several platforms in one tree"
                " are not supported"
            )
    if options.provenance is not None and any(o.type is OutputType.TAR for o in options.outputs):
        # FIXME: BuildKit's tar exporter writes each platform's provenance.json in its tree
        raise OutputError("--output type=tar with --provenance of several platforms is not supported yet")


def check_runnable(plans: Sequence[Plan], isolation: Any = None) -> None:
    """A RUN for a platform this host cannot run (sandbox.emulation: no binfmt_misc/qemu handler
    the build's `isolation` can use) fails before the first step: one line naming the first such
    RUN and the remedy. (A base image's ONBUILD RUN is met when it runs.)"""
    from lamina.errors import PlanError

    first_run: dict[str, tuple[Platform, Any]] = {}
    for plan in plans:
        for index in plan.order:
            stage = plan.stages[index]
            run = next((i for i in stage.instructions if i.name == "RUN"), None)
            if run is not None:
                first_run.setdefault(str(stage.stage_platform), (stage.stage_platform, run.location))
    if not first_run:
        return
    from lamina.engine.sandbox.emulation import check_platforms
    from lamina.errors import SandboxError

    for platform, location in first_run.values():
        try:
            check_platforms([platform], isolation.value if isolation is not None else None)
        except SandboxError as err:
            raise PlanError(f"{location}: RUN for {platform}: {err}") from None


def onbuild_args(executor: Any, stage: Any) -> tuple[tuple[str, str | None, str | None], ...]:
    """What a stage FROM an image reads of the target through the image's ONBUILD triggers:
    (name, --build-arg, global value) of each ARG they declare. BuildKit runs the triggers as
    the stage's first instructions, so `ONBUILD ARG TARGETARCH` in the base of a `FROM
    --platform=$BUILDPLATFORM` stage makes that stage one per target; a part of its identity
    (plan.Plan.identity knows the Dockerfile only)."""
    from lamina.engine.dockerfile.instructions import ArgInstruction, parse_instruction
    from lamina.engine.dockerfile.parser import parse
    from lamina.engine.namedcontext import lookup
    from lamina.engine.steps.base import base_image
    from lamina.errors import DockerfileError

    if stage.base_stage is not None or stage.base_image is None:
        return ()
    if stage.name and lookup(executor.options.build_contexts, stage.name):  # replaced: no FROM
        return ()
    base = base_image(executor, stage.base_image, stage.location, stage.stage_platform)
    names: list[str] = []
    for text in base.config.config.on_build:
        try:
            instruction = parse_instruction(parse(text, stage.location.path).children[0], stage.location.path)
        except (DockerfileError, IndexError):
            continue  # steps.dispatch.run_stage refuses it on the stage's line
        if isinstance(instruction, ArgInstruction):
            names += [decl.name for decl in instruction.args]
    plan = executor.plan
    return tuple((name, plan.build_args.get(name), plan.global_args.get(name)) for name in names)


def run_platforms(executors: Sequence[Executor]) -> tuple[StageOutcome, ...]:
    """Every target platform's stages on one pool bounded by --jobs; the target stage of each."""
    import concurrent.futures

    first = executors[0]
    for warning in dict.fromkeys(w for e in executors for w in e.plan.warnings):
        first.sink.warn(warning)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, first.options.jobs))
    # One thread per platform only waits on its waves; the stages themselves run on `pool`.
    drivers = concurrent.futures.ThreadPoolExecutor(max_workers=len(executors))
    try:
        with stopping_on_interrupt(first, pool):
            futures = [drivers.submit(executor.build_target, pool) for executor in executors]
            for future in concurrent.futures.as_completed(futures):
                future.result()  # the first failure stops the build
            targets = tuple(future.result() for future in futures)
        pool.shutdown(wait=True)
    finally:
        drivers.shutdown(wait=True, cancel_futures=True)
    return targets


def finish(executors: Sequence[Executor], targets: Sequence[StageOutcome], start: float) -> BuildResult:
    """Each platform's image, the index over them, the outputs and the tags."""
    from lamina.engine.model import BuildResult
    from lamina.engine.progress import BuildSummary

    first = executors[0]
    options = first.options
    if options.dry_run:
        seconds = time.monotonic() - start
        return BuildResult("", "", targets[0].config, (), tuple(first.records), seconds, targets[0].name)
    committed = _commit_images(executors, targets)
    main = _main_platform([platform for platform, _, _, _ in committed])
    tagged, names = _write_outputs(executors, targets, committed, main)
    seconds = time.monotonic() - start
    _, config, image, _ = committed[main]
    result = BuildResult(
        str(tagged.top.digest),  # BuildKit's containerimage.digest of a multi-platform build: the index
        str(tagged.top.digest),  # and the image ID buildx gives (--iidfile, -q)
        dataclasses.replace(config, diff_ids=image.diff_ids),
        names,
        tuple(first.records),
        seconds,
        targets[main].name,
        index=True,
    )
    cached, ran = result.steps_cached, result.steps_run
    first.sink.finish(
        BuildSummary(result.image_digest, result.config_digest, cached, ran, seconds, index=True)
    )
    return result


def _commit_images(executors: Sequence[Executor], targets: Sequence[StageOutcome]) -> list[tuple[Any, ...]]:
    """(platform, config, committed image, attestation statements) of each target platform."""
    from lamina.engine.output import make_image
    from lamina.engine.plan import format_all
    from lamina.engine.steps import metadata as md

    first = executors[0]
    options, store = first.options, first.store
    committed = []
    inline = any(spec.inline for spec in options.cache_to)
    for executor, target in zip(executors, targets, strict=True):
        platform = executor.plan.target_platform
        config = md.merge_labels(target.config, options.labels)
        config = dataclasses.replace(config, created=first.created_for_image(target))
        config = target_config(config, platform)
        image = make_image(store, config, target.layers, options.compression, first.epoch)
        if inline:  # --cache-to type=inline: each platform's config holds its own chain's entries
            from lamina.engine.stepcache import inline_field

            mine = [r for r in first.records if r.stage.startswith(f"{format_all(platform)} ")]
            records = mine if len(executors) > 1 else list(first.records)
            config = dataclasses.replace(config, extra=(inline_field(executor, records, image.diff_ids),))
            image = make_image(store, config, target.layers, options.compression, first.epoch)
        committed.append((platform, config, image, executor.statements(image, config, target)))
    return committed


def _write_outputs(
    executors: Sequence[Executor],
    targets: Sequence[StageOutcome],
    committed: list[tuple[Any, ...]],
    main: int,
) -> tuple[Any, tuple[str, ...]]:
    """Every output of the build and the tags: (what the tags name, the names given)."""
    from lamina.engine.imageexport import ExportedImage, attestation_files, export_image, platform_index
    from lamina.engine.output import write_output
    from lamina.engine.outputspec import OutputType
    from lamina.engine.plan import format_all

    first = executors[0]
    options, store, epoch = first.options, first.store, first.epoch
    shown = tuple(str(platform) for platform, _, _, _ in committed)

    def exported(output: Any) -> Any:
        subjects = list(dict.fromkeys([*output.names, *options.tags]))  # attestation subjects
        images = []
        for (platform, _, image, said), target in zip(committed, targets, strict=True):
            made = export_image(
                store,
                image,
                target.layers,
                output,
                options.compression,
                epoch,
                platform,
                said,
                subjects,
                shown,
            )
            images.append((platform, made))
        return platform_index(store, images, output, main)

    plain = [(p, ExportedImage(i.manifest, i.config, i.layers)) for p, _, i, _ in committed]
    stored = platform_index(store, plain, None, main)
    images = {i: exported(o) for i, o in enumerate(options.outputs) if o.is_image}
    image_outputs = [i for i, o in enumerate(options.outputs) if o.type is OutputType.IMAGE]
    tagged = images[image_outputs[0]] if image_outputs else stored
    created = max((config.created or "" for _, config, _, _ in committed), default="")
    names = _tag(first, tagged, options.tags, created)
    for i, output in enumerate(options.outputs):
        if output.type is OutputType.IMAGE:
            _tag(first, images[i], output.names, created)
        elif output.type is OutputType.LOCAL:  # a tree per platform, each with its attestations
            for (platform, _, image, statements), target in zip(committed, targets, strict=True):
                # each platform's tree as its own type=local output (times, errors, warnings)
                root = Path(output.dest)
                if output.platform_split is not False:  # only one platform may leave it out
                    root /= format_all(platform).replace("/", "_")
                one = dataclasses.replace(output, dest=str(root), platform_split=False)
                prefix = output.attestation_prefix
                files = attestation_files(statements, epoch, prefix) if statements else None
                for warning in write_output(one, store, image, target.layer_dirs, names, epoch, files):
                    first.warn_once(warning)  # what a rootless type=local could not keep
        elif output.type is OutputType.TAR:  # one tar, a tree per platform (linux_amd64/...)
            trees = [(p, t.layer_dirs) for (p, _, _, _), t in zip(committed, targets, strict=True)]
            if output.platform_split is False:  # one platform, asked for as one tree
                trees = None
            write_output(output, store, stored, targets[main].layer_dirs, names, epoch, trees=trees)
        else:  # type=oci: the index, every platform's blobs
            write_output(output, store, images[i], targets[main].layer_dirs, names, epoch)
    return tagged, names


def target_config(config: Any, platform: Platform) -> Any:
    """The image config of a build for a target platform asked for (--platform), as BuildKit's
    convert.go sets it: os and architecture of the target (even for a last stage built FROM
    --platform=X); the variant and OS version too when the target has one or names another
    os/arch; then normalised (arm64/v8 is arm64)."""
    from lamina.engine.plan import normalize_platform

    same = (config.os, config.architecture) == (platform.os, platform.architecture)
    variant = platform.variant if platform.variant or not same else config.variant
    os_version = platform.os_version if platform.os_version or not same else config.os_version
    wanted = normalize_platform(dataclasses.replace(platform, variant=variant))
    return dataclasses.replace(
        config, os=wanted.os, architecture=wanted.architecture, variant=wanted.variant, os_version=os_version
    )


def _main_platform(platforms: Sequence[Platform]) -> int:
    """The image a single-image reader of the index takes (docker's manifest.json): the host's
    when it is built, else the first."""
    from lamina.oci.image import host_platform

    host = str(host_platform())
    return next((i for i, p in enumerate(platforms) if str(p) == host), 0)


def _tag(executor: Executor, image: Any, names: Sequence[str], created: str) -> tuple[str, ...]:
    """Point each name at the index (`lamina images` lists it; run/save/push read its platforms);
    `created`: the newest image's, as cache.images.commit_index records an index's."""
    from lamina.oci.reference import store_name

    size = sum(d.size for d in (image.manifest, image.config, *image.layers, *image.extra))
    done = []
    for name in names:
        full = store_name(name)
        executor.store.tag(full, image.top.digest, size=size, created=created)
        done.append(full)
    return tuple(done)


def plans_text(plans: Sequence[Plan]) -> str:
    """`lamina plan --platform a,b`: each platform's plan; a stage the same in an earlier
    platform's plan (built once) says so."""
    from lamina.engine.plan import to_text

    seen: dict[object, str] = {}
    parts = []
    for plan in plans:
        text = to_text(plan)
        shared = []
        for index in plan.order:
            identity = plan.identity(index)
            if identity in seen:
                shared.append(f"{plan.stages[index].display_name} (built once, with {seen[identity]})")
            else:
                seen[identity] = str(plan.target_platform)
        parts.append(f"== {plan.target_platform} ==\n{text}shared: {', '.join(shared) or '-'}\n")
    return "\n".join(parts)
