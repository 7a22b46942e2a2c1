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
    if (executor.options.pull and not local) or not _in_store(store, name, platform):
        record = _pull(executor, ref, location, platform)
    try:
        record = record or store.resolve(name)
    except ImageNotFound:
        raise BuildError(
            f"{_source(location, ref)}: image {name} is not in the store "
            "(lamina load or lamina pull it first)"
        ) from None
    from lamina.cache.platforms import platform_manifest

    # From an index, the stage platform's image; a single image of another platform is built
    # on as it is, as BuildKit does (its InvalidBaseImagePlatform check warns: buildchecks).
    try:
        digest = platform_manifest(store, record.manifest, platform, _source(location, ref), strict=False)
    except ImageNotFound as err:
        raise BuildError(str(err)) from None
    manifest = Manifest.from_bytes(store.read_blob(digest, MAX_DOCUMENT), f"manifest of {ref}")
    config_bytes = store.read_blob(manifest.config.digest, MAX_DOCUMENT)
    config = ImageConfig.from_bytes(config_bytes, f"config of {ref}")
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


def _in_store(store: Any, name: str, platform: Platform) -> bool:
    """Whether the store holds `name`'s image for `platform` (an index pulled for one platform
    lacks the others: another platform's stage must pull again)."""
    from lamina.cache.platforms import platform_manifest

    try:
        platform_manifest(store, store.resolve(name).manifest, platform, name, strict=False)
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
