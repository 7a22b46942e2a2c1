"""Where a RUN --mount=type=cache lives: a directory of the store, keyed as BuildKit keys its refs.

BuildKit names a cache mount's directory by its id, and, when the mount starts
from a ref, by that ref too (`ID:REF`, solver/llbsolver/mounts): the stage of
`from=`, or the directory it makes for `uid=`/`gid=`/`mode=`
(dockerfile2llb setCacheUIDGID). A changed `from=` stage or another mode is
another directory.

A RUN that ignores the cache (`--no-cache`, or `--no-cache-filter` naming its
stage) prunes its cache mounts' ids before the build (llbsolver
detectPrunedCacheID, worker PruneCacheMounts): the RUN starts with an empty
cache, and the later RUNs of that build and later builds share the new one.
BuildKit prunes when it loads the build; lamina prunes at the first such RUN,
so a RUN of another stage that ran before it in the same build saw the old
content (FIXME if it matters: collect the ids from the plan first).

`--build-arg BUILDKIT_CACHE_MOUNT_NS=NS` puts every cache mount's id under NS
(dockerfile2llb: `NS/ID`), so builds of another namespace share no cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamina.engine.model import StageState, StepHost


def cache_dir(executor: StepHost, state: StageState, mount: Any, start_ref: str) -> Path:
    """The directory of `mount` starting from `start_ref` ("" for none), pruned first when the RUN
    ignores the cache; its parent exists, the directory itself may not yet."""
    root = executor.store.root / "cachemounts"
    root.mkdir(exist_ok=True)
    ns = namespace(executor.plan.build_args)
    # NUL: no id holds one, so NS+ID is never another mount's plain id (BuildKit: "/ID" vs "NS/ID")
    ident = f"{ns}\0{mount.id}" if ns else mount.id
    name = _hex(ident)
    ignores = executor.options.no_cache or state.no_cache
    token = object()  # dict.setdefault is atomic: one RUN of the build prunes, whatever runs beside it
    if (
        ignores
        and not executor.options.dry_run
        and executor.pruned_cache_ids.setdefault(ident, token) is token
    ):
        prune(root, name)
    # Without a ref, the name is the id's alone: the layout stores made before refs counted.
    return root / (f"{name}-{_hex(start_ref)[:16]}" if start_ref else name)


def namespace(build_args: Mapping[str, str]) -> str:
    """BUILDKIT_CACHE_MOUNT_NS (dockerui's CacheIDNamespace), "" for none."""
    return build_args.get("BUILDKIT_CACHE_MOUNT_NS", "")


def prune(root: Path, name: str) -> None:
    """Drop the cache directories of one id (every ref's): renamed away first, so a new one of
    the same name can be made at once. Their lock files stay: a build sharing the cache may hold one."""
    for path in [root / name, *root.glob(f"{name}-*")]:
        if path.name.endswith(".lock") or not path.exists():
            continue
        gone = root / f".pruned-{uuid.uuid4().hex}"
        try:
            os.rename(path, gone)
        except FileNotFoundError:
            continue  # another build pruned it first
        shutil.rmtree(gone, ignore_errors=True)


def mode_ref(mount: Any) -> str:
    """The ref of the directory BuildKit makes for uid=/gid=/mode= (its defaults 0, 0, 0755), or ""."""
    if mount.uid is None and mount.gid is None and mount.mode is None:
        return ""
    mode = mount.mode if mount.mode is not None else 0o755
    return f"mkdir /cache {mount.uid or 0}:{mount.gid or 0} {mode:o}"


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
