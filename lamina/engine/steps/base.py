"""A stage's base image: found in the store (pulled first when allowed), its layers unpacked.

`base_image(executor, ref, location)` is what FROM, `COPY --from=image` and
`RUN --mount=from=image` use; each image is loaded once per build.
`source_stage` reads a `--from` reference: an earlier stage, else an image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamina.engine.model import StageOutcome
from lamina.engine.output import ImageLayer
from lamina.engine.unpack import unpacked_layer
from lamina.errors import BuildError, ImageNotFound, LaminaError

if TYPE_CHECKING:
    from lamina.engine.model import StepHost
    from lamina.oci.image import Platform


def base_image(executor: StepHost, ref: str, location: Any, platform: Platform | None = None) -> StageOutcome:
    """An image from the store (pulled first when allowed and needed), unpacked; once per build
    and platform (None: the host's). From an index, the manifest of `platform` is taken.

    A `--build-context` of the image's name stands in for it (engine.namedcontext).
    """
    from lamina.engine.namedcontext import lookup
    from lamina.oci.image import default_config, host_platform

    platform = platform or host_platform()
    named = lookup(executor.options.build_contexts, ref)
    ref = named.ref if named is not None else ref
    if named is None and executor.options.source_policy is not None:  # a named one is judged as made
        ref = _policy_ref(executor.options.source_policy, ref, location)
    if named is not None and ref.lower() == "scratch":
        # dockerui: docker-image://scratch is the empty image, never pulled.
        return StageOutcome(named.name, default_config(platform), (), "scratch", None, ())
    with executor.image_lock(ref):
        found = executor.images.get((ref, str(platform)))
        if found is None:
            local = named is not None and named.local
            found = load_image(executor, ref, location, local=local, platform=platform)
            executor.images[(ref, str(platform))] = found
        return found


def load_image(
    executor: StepHost, ref: str, location: Any, local: bool = False, platform: Platform | None = None
) -> StageOutcome:
    from lamina.oci.image import MAX_DOCUMENT, ImageConfig, Manifest, host_platform

    platform = platform or host_platform()

    store = executor.store
    from lamina.oci.reference import store_name

    name = store_name(ref, pinned=True)
    record = None
    if (executor.options.pull and not local) or not _in_store(store, name):
        record = _pull(executor, ref, location, platform)
    try:
        record = record or store.resolve(name)
    except ImageNotFound:
        raise BuildError(
            f"{_source(location, ref)}: image {name} is not in the store "
            "(lamina load or lamina pull it first)"
        ) from None
    top = store.read_blob(record.manifest, MAX_DOCUMENT)
    digest = _platform_manifest(top, record.manifest, platform, f"{_source(location, ref)}")
    data = top if digest == record.manifest else store.read_blob(digest, MAX_DOCUMENT)
    manifest = Manifest.from_bytes(data, f"manifest of {ref}")
    config_bytes = store.read_blob(manifest.config.digest, MAX_DOCUMENT)
    config = ImageConfig.from_bytes(config_bytes, f"config of {ref}")
    _check_platform(config, platform, _source(location, ref))
    if len(config.diff_ids) != len(manifest.layers):
        raise BuildError(f"{_source(location, ref)}: the config and the manifest disagree on the layers")
    layers = []
    for blob, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        try:
            path = unpacked_layer(executor.store, blob.digest, diff_id)
        except BuildError:
            raise
        except LaminaError as err:  # a full disk, a broken layer: name the FROM (or mount) needing it
            raise BuildError(f"{_source(location, ref)}: {err}") from err
        layers.append(ImageLayer(path, diff_id=diff_id, blob=blob))
    key = f"image:{digest}"
    return StageOutcome(ref, config, tuple(layers), key, config.created, ())


def _platform_manifest(data: bytes, digest: Any, platform: Platform, what: str) -> Any:
    """The manifest of `platform` when `data` (the blob named `digest`) is an image index,
    else `digest` itself (BuildKit's platform matcher: same os and architecture, the exact
    variant preferred; arm64 without a variant matches v8)."""
    import json

    from lamina.oci.image import INDEX_TYPES, Index

    try:
        media_type = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        return digest
    if media_type not in INDEX_TYPES:
        return digest
    from lamina.engine.plan import normalize_platform

    entries = [
        entry
        for entry in Index.from_bytes(data, what).manifests
        if entry.platform is not None
        and normalize_platform(entry.platform).os == platform.os
        and normalize_platform(entry.platform).architecture == platform.architecture
    ]
    exact = [e for e in entries if e.platform and normalize_platform(e.platform).variant == platform.variant]
    chosen = (exact or entries)[:1]
    if not chosen:
        listed = Index.from_bytes(data, what).manifests
        have = ", ".join(sorted({str(e.platform) for e in listed if e.platform is not None})) or "nothing"
        raise BuildError(f"{what}: no image for {platform} in its index (it has {have})")
    return chosen[0].digest


def _check_platform(config: Any, platform: Platform, what: str) -> None:
    """An image of another platform is refused: its binaries would end up in this one's image."""
    from lamina.engine.plan import normalize_platform

    have = config.platform
    if not have.architecture:
        return  # no platform recorded: taken as it is
    have = normalize_platform(have)
    if (have.os, have.architecture) != (platform.os, platform.architecture) or (
        have.variant and platform.variant and have.variant != platform.variant
    ):
        raise BuildError(
            f"{what}: the image is {have}, the stage builds for {platform}"
            " (load or pull an image index that has it)"
        )


def _policy_ref(policy: Any, ref: str, location: Any) -> str:
    """The image `ref` becomes under the source policy (denied: an error)."""
    from lamina.engine.sourcepolicy import image_ref, image_source

    try:
        source = image_source(ref)
    except LaminaError:  # not a reference: load_image says so
        return ref
    try:
        return image_ref(policy.evaluate(source), _source(location, ref))
    except BuildError as err:
        raise BuildError(f"{_source(location, ref)}: {err}") from None


def _source(location: Any, ref: str) -> str:
    """How an image error starts: `Dockerfile:3: FROM ref`, or `from=ref` for a mount."""
    return f"{location}: FROM {ref}" if location is not None else f"from={ref}"


def _in_store(store: Any, name: str) -> bool:
    try:
        store.resolve(name)
    except LaminaError:
        return False
    return True


def _pull(executor: StepHost, ref: str, location: Any, platform: Platform) -> Any:
    factory = executor.options.client_factory
    if factory is None:
        if executor.options.pull:
            raise BuildError(f"{_source(location, ref)}: --pull needs a registry client")
        return None
    from lamina.cache.transfer import ensure_image
    from lamina.oci.reference import parse_reference

    policy = "always" if executor.options.pull else "missing"
    try:
        return ensure_image(factory, executor.store, parse_reference(ref), policy, platform=platform)
    except LaminaError as err:
        raise BuildError(f"{_source(location, ref)}: {err}") from err


def source_stage(executor: StepHost, ref: str, location: Any) -> StageOutcome:
    """What `--from=ref` names: an earlier stage (by index or name), else an image."""
    plan = executor.plan
    index = stage_index(ref)
    if index is None:
        index = plan.names.get(ref.lower())
    if index is not None:
        return executor.outcome(index)
    # An image named by --from is an implicit stage of the target platform (BuildKit).
    return base_image(executor, ref, location, executor.plan.target_platform)


def stage_index(ref: str) -> int | None:
    """`ref` as a stage index: ASCII digits only (str.isdigit also takes `²`, which
    int() refuses), as the planner reads it; it has checked the index is a stage."""
    if not (ref.isascii() and ref.isdigit()):
        return None
    digits = ref.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else None
