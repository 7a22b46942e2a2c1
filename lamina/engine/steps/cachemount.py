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

Builds sharing the store seed and prune these directories at the same time, so
both follow the store's rule for work in flight: it happens under the store's
scratch dir (`tmp/`) and is renamed into place, or out of it. A prune, which
renames `cachemounts/ID*` away, never sees another build's half-made seed, and
what a killed build leaves in `tmp/` goes with gc, which holds the store alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
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
        prune(root, name, executor.store.root / "tmp")
    # Without a ref, the name is the id's alone: the layout stores made before refs counted.
    return root / (f"{name}-{_hex(start_ref)[:16]}" if start_ref else name)


def namespace(build_args: Mapping[str, str]) -> str:
    """BUILDKIT_CACHE_MOUNT_NS (dockerui's CacheIDNamespace), "" for none."""
    return build_args.get("BUILDKIT_CACHE_MOUNT_NS", "")


def prune(root: Path, name: str, scratch: Path) -> None:
    """Drop the cache directories of one id (every ref's): renamed into `scratch` (the store's
    tmp/) first, so a new one of the same name can be made at once. Their lock files stay: a
    build sharing the cache may hold one."""
    for path in [root / name, *root.glob(f"{name}-*")]:
        if path.name.endswith(".lock") or not path.exists():
            continue
        gone = Path(tempfile.mkdtemp(prefix="cache-pruned-", dir=scratch))
        try:
            os.rename(path, gone / "d")
        except FileNotFoundError:
            os.rmdir(gone)
            continue  # another build pruned it first
        # What subordinate ids own may stay (rootless); gc's sweep of tmp/ removes it.
        shutil.rmtree(gone, ignore_errors=True)


def seed(
    cache_dir: Path, source: Path, scratch: Path, copy: Callable[[Path, Path], object] | None = None
) -> None:
    """Make the new `cache_dir` a copy of `source` (`from=`), unless another build seeds it first.

    Copied under `scratch` (the store's tmp/) and renamed into place: a prune of the same id
    in another build never renames the copy away half-made. `copy(src, dst)` defaults to
    shutil.copytree keeping symlinks."""
    work = Path(tempfile.mkdtemp(prefix="cache-seed-", dir=scratch))
    try:
        (copy or _copy_tree)(source, work / "d")
        with contextlib.suppress(OSError):  # another build seeded it first: its copy stays
            os.rename(work / "d", cache_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _copy_tree(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, symlinks=True)


def mode_ref(mount: Any) -> str:
    """The ref of the directory BuildKit makes for uid=/gid=/mode= (its defaults 0, 0, 0755), or ""."""
    if mount.uid is None and mount.gid is None and mount.mode is None:
        return ""
    mode = mount.mode if mount.mode is not None else 0o755
    return f"mkdir /cache {mount.uid or 0}:{mount.gid or 0} {mode:o}"


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
