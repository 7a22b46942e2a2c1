"""`lamina build --push`, `-o type=image,push=true`, `-o type=registry`: push after the build.

The build has already named the image in the store under every tag (and
each type=image output under its name= and the tags, with that output's
attributes applied), so a push is lamina.cache.transfer.push of each name
to itself: blobs the registry lacks go up (after an existence check or a
cross-repository mount), then the manifest exactly as stored, so the
digest the registry confirms is the build's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lamina.errors import PlanError

if TYPE_CHECKING:
    from lamina.engine.model import BuildOptions, BuildResult
    from lamina.engine.outputspec import OutputSpec

Log = Callable[[str], None]


def check_push(tags: Sequence[str]) -> None:
    """Fail before building when --push has nothing to push to."""
    if not tags:
        raise PlanError("--push needs at least one -t/--tag reference to push to")


def push_names(options: BuildOptions, push: bool) -> tuple[str, ...]:
    """Every name to push after the build: the tags for --push, and each pushing
    type=image output's name= and tags (buildx fills an image output's names from -t)."""
    from lamina.engine.outputspec import OutputType
    from lamina.oci.reference import store_name

    names = list(options.tags) if push else []
    for output in options.outputs:
        if output.type is OutputType.IMAGE and output.push:
            wanted = [*output.names, *options.tags]
            if not wanted:
                raise PlanError("tag is needed when pushing to registry")
            names.extend(wanted)
    return tuple(dict.fromkeys(store_name(name) for name in names))


def insecure_hosts(outputs: Sequence[OutputSpec]) -> tuple[str, ...]:
    """Registries of outputs with `registry.insecure=true`: pushed to over plain HTTP."""
    from lamina.oci.reference import parse_reference

    return tuple(
        dict.fromkeys(
            parse_reference(name).registry for output in outputs if output.insecure for name in output.names
        )
    )


def push_result(
    options: BuildOptions, result: BuildResult, log: Log | None = None, names: Sequence[str] | None = None
) -> BuildResult:
    """Push the built image to every name in `names` (default: every name it was given);
    the result records what the registry confirmed."""
    from lamina.cache.store import Store
    from lamina.oci.reference import parse_reference

    factory = options.client_factory
    if factory is None:
        raise PlanError("--push needs a registry client")
    pushed: list[tuple[str, str]] = []
    by_digest = _by_digest(options)
    with Store(options.cache_root) as store, factory() as client:
        for name in result.names if names is None else names:
            ref = parse_reference(name)
            done = _push_one(client, store, name, ref, name in by_digest)
            shown = done.reference.name if done.reference.tag is None else str(done.reference)
            pushed.append((shown, str(done.digest)))
            if log is not None:
                log(f"pushed {ref.name}@{done.digest}")
    return dataclasses.replace(result, pushed=(*result.pushed, *pushed))


def _by_digest(options: BuildOptions) -> set[str]:
    """Names of `push-by-digest=true` outputs: pushed without a tag, by the manifest's digest."""
    from lamina.engine.outputspec import OutputType
    from lamina.oci.reference import store_name

    return {
        store_name(name)
        for output in options.outputs
        if output.type is OutputType.IMAGE and output.push and output.push_by_digest
        for name in [*output.names, *options.tags]
    }


def _push_one(client: Any, store: Any, name: str, ref: Any, by_digest: bool = False) -> Any:
    """Push `name`; an image built with attestations goes up as its index (image + attestation
    manifest), as buildx pushes it, through a store name made for the push and removed after.
    `by_digest` (push-by-digest=true): the repository gets the manifest under its digest, no tag."""
    import json

    from lamina.cache.transfer import push
    from lamina.engine.imageexport import attested_key
    from lamina.oci.digest import Digest
    from lamina.oci.reference import Reference

    found = store.cache_get(attested_key(name))
    record = store.resolve(name)
    top = record.manifest
    if found is not None and json.loads(found)["manifest"] == str(record.manifest):
        top = Digest.parse(json.loads(found)["index"])
    if by_digest:
        ref = Reference(ref.registry, ref.repository, None, top)
    if top == record.manifest:
        return push(client, store, name, ref)
    index = top
    temporary = f"lamina.invalid/attested/{index.hex}:push"
    store.tag(temporary, index, size=record.size, created=record.created)
    try:
        return push(client, store, temporary, ref)
    finally:
        store.untag(temporary)
