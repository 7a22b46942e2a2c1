"""`lamina build --push`: after a successful build, push the image to each -t reference.

The build has already named the image in the store under every tag, so a
push is lamina.cache.transfer.push of each name to itself: blobs the
registry lacks go up (after an existence check or a cross-repository
mount), then the manifest exactly as stored, so the digest the registry
confirms is the build's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lamina.errors import PlanError

if TYPE_CHECKING:
    from lamina.engine.model import BuildOptions, BuildResult

Log = Callable[[str], None]


def check_push(tags: Sequence[str]) -> None:
    """Fail before building when --push has nothing to push to."""
    if not tags:
        raise PlanError("--push needs at least one -t/--tag reference to push to")


def push_result(options: BuildOptions, result: BuildResult, log: Log | None = None) -> BuildResult:
    """Push the built image to every name it was given; the result records what the registry confirmed."""
    from lamina.cache.store import Store
    from lamina.cache.transfer import push
    from lamina.oci.reference import parse_reference

    factory = options.client_factory
    if factory is None:
        raise PlanError("--push needs a registry client")
    pushed: list[tuple[str, str]] = []
    with Store(options.cache_root) as store, factory() as client:
        for name in result.names:
            ref = parse_reference(name)
            done = push(client, store, name, ref)
            pushed.append((str(ref), str(done.digest)))
            if log is not None:
                log(f"pushed {ref.name}@{done.digest}")
    return dataclasses.replace(result, pushed=tuple(pushed))
