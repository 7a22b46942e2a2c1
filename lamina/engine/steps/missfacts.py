"""What a step's inputs were, file by file, so that its next miss can name the files.

None of this is in a cache key (the key has the selection's digest): it is
stored under the step's position only, beside the `KeyInputs` it explains.
"""

from __future__ import annotations

from typing import Any

# Past this many files a step's list is not kept (its JSON is read and written with each
# build of the step): a miss then says "input files changed", without the paths.
MAX_FILES = 10_000


def selection_files(tree: Any, selection: Any) -> tuple[tuple[str, str, str], ...]:
    """(source path, content digest, "type mode uid:gid link") per item a COPY/ADD selection writes."""
    if len(selection.items) > MAX_FILES:
        return ()
    digests = tree.file_digests([item.entry for item in selection.items])
    facts: dict[str, tuple[str, str, str]] = {}
    for item in selection.items:
        entry = item.entry
        path = entry.path.lstrip("/") or "."
        content = digests.get(entry.path, b"")
        meta = f"{entry.type.value} {item.mode:o} {item.uid}:{item.gid} {entry.linkname}"
        facts[path] = (path, content.hex()[:16] if isinstance(content, bytes) else str(content), meta)
    return tuple(facts[path] for path in sorted(facts))


def tree_files(tree: Any, rel: str, label: str = "") -> tuple[tuple[str, str, str], ...]:
    """(path, content digest, "type mode uid:gid link") per entry of `tree` below `rel` (a RUN
    bind mount's source): `label` prefixes each path ("build:" for a stage's files)."""
    from lamina.engine.context import EntryType

    resolved = tree.resolve(rel.strip("/"))
    top = tree.entry(resolved) if resolved else None
    entries = list(tree.walk(resolved)) if top is None or top.type is EntryType.DIR else [top]
    if len(entries) > MAX_FILES:
        return ()
    digests = tree.file_digests(entries)
    facts = []
    for entry in entries:
        content = digests.get(entry.path, b"")
        meta = f"{entry.type.value} {entry.mode:o} {entry.uid}:{entry.gid} {entry.linkname}"
        facts.append((label + entry.path, content.hex()[:16], meta))
    return tuple(sorted(facts))


def bind_files(host: Any, instruction: Any) -> tuple[tuple[str, str, str], ...]:
    """The files a RUN's bind mounts show, path by path (context paths as written, a stage's
    as `STAGE:/path`): listed on a miss only, so that it names the mounted files that changed."""
    from lamina.engine.context import open_rootfs
    from lamina.engine.dockerfile.instructions import MountType
    from lamina.engine.steps.base import source_stage

    facts: list[tuple[str, str, str]] = []
    for mount in instruction.mounts:
        if mount.type is not MountType.BIND:
            continue
        if not mount.from_:
            facts.extend(tree_files(host.context(), mount.source))
            continue
        outcome = source_stage(host, mount.from_, None)
        source = "/" + mount.source.strip("/")
        tree = open_rootfs(host.stage_rootfs(outcome, [source]), host.stat_cache())
        listed = tree_files(tree, source, f"{outcome.name}:/")
        if not listed:
            return ()  # too many to list: the miss says "mounted files changed"
        facts.extend(listed)
    return tuple(sorted(set(facts))) if len(facts) <= MAX_FILES else ()


def pending_mount(host: Any, instruction: Any) -> str:
    """--dry-run: why a RUN cannot be keyed yet, when it bind-mounts a stage that will run first."""
    from lamina.engine.dockerfile.instructions import MountType
    from lamina.engine.steps.base import source_stage

    if not host.options.dry_run:
        return ""
    for mount in instruction.mounts:
        if mount.type is MountType.BIND and mount.from_:
            outcome = source_stage(host, mount.from_, None)
            if outcome.name in host.dirty:
                return f"stage {outcome.name} will run first; the files it mounts decide"
    return ""


# --- a stage this one is built FROM ------------------------------------------------------------


def upstream_change(host: Any, previous_base: str, current_base: str) -> str:
    """What changed in the stage a step's stage is built FROM, between two builds of it.

    `*_base` are "stage NAME@KEY" (KeyInputs.base). Names the upstream steps that ran this
    build and the files its filesystem hands over that differ (from the layers that differ
    between the two chains of cache results), a few then a count; "" when unknown.
    """
    name = current_base.removeprefix("stage ").rpartition("@")[0]
    if previous_base == current_base or not current_base.startswith("stage "):
        return ""  # the base did not change (or is no stage): nothing to walk
    if previous_base.rpartition("@")[0] != f"stage {name}":
        return ""
    ran = [r for r in getattr(host, "records", ()) if r.stage == name and not r.cached]
    said = []
    dry_run = host.options.dry_run
    if ran:
        first = f"step {ran[0].index} ({ran[0].instruction}) {'will run' if dry_run else 'ran'}"
        said.append(first + (f" and {len(ran) - 1} more" if len(ran) > 1 else ""))
    if dry_run:
        return "; ".join(said)  # its files are not made yet
    old = _chain(host.store, previous_base.rpartition("@")[2])
    new = _chain(host.store, current_base.rpartition("@")[2])
    if old is not None and new is not None:
        from lamina.engine.cachekey import file_causes

        shared = set(old) & set(new)
        touched = _touched([p for p in old if p not in shared] + [p for p in new if p not in shared])
        if touched is not None:
            said.extend(file_causes(_view_files(old, touched), _view_files(new, touched)))
    return "; ".join(said)


def _chain(store: Any, key: str) -> list[Any] | None:
    """The layer dirs of a stage (bottom first) from its last step's cache key, walking each
    result's parent; None when a result or a layer dir is gone."""
    from lamina.engine.cachekey import KeyInputs
    from lamina.engine.model import CacheResult
    from lamina.oci.digest import Digest

    layers = []
    seen = 0
    while key.startswith("sha256:") and seen < 1000:
        text = store.cache_get(key)
        if text is None:
            break  # the base image's manifest digest (or a pruned result): the chain's bottom
        result = CacheResult.from_json(text)
        if result is None:
            return None
        if result.layer is not None:
            path = store.unpacked_path(Digest("sha256", result.layer))
            if not path.is_dir():
                return None
            layers.append(path)
        try:
            key = KeyInputs.from_json(result.inputs).parent
        except (ValueError, KeyError, TypeError):
            return None
        seen += 1
    return layers[::-1]


def _touched(layers: list[Any]) -> list[str] | None:
    """Every path below the layer dirs `layers` (relative, no leading /); None past MAX_FILES."""
    import os

    paths: set[str] = set()
    for layer in layers:
        for top, dirs, files in os.walk(layer):
            rel = os.path.relpath(top, layer)
            for name in dirs + files:
                paths.add(name if rel == "." else f"{rel}/{name}")
            if len(paths) > MAX_FILES:
                return None
    return sorted(paths)


def _view_files(layers: list[Any], paths: list[str]) -> tuple[tuple[str, str, str], ...]:
    """(path, content digest, meta) of `paths` in the merged view of `layers` (bottom first)."""
    import hashlib
    import os
    import stat

    from lamina.oci.overlay import is_whiteout

    facts = []
    for rel in paths:
        found = None
        for layer in reversed(layers):
            try:
                st = os.lstat(layer / rel)
            except OSError:
                continue
            found = None if is_whiteout(st) else (layer / rel, st)
            break
        if found is None:
            continue
        path, st = found
        digest = ""
        link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        if stat.S_ISREG(st.st_mode):
            try:
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
            except OSError:
                digest = f"unreadable:{st.st_size}:{st.st_mtime_ns}"
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        if kind == "dir":
            continue  # a directory's own change is its files'
        facts.append((rel, digest, f"{kind} {stat.S_IMODE(st.st_mode):o} {st.st_uid}:{st.st_gid} {link}"))
    return tuple(facts)
