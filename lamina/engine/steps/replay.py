"""Replay a build whose inputs did not change at all, without planning it again.

A no-op rebuild is judged against BuildKit's ~0.1 s, and most of lamina's
time there goes to importing and running the front end and walking the
context through .dockerignore. So a finished build that went to the store
(no `-o` other than `type=image` and a plain `type=oci`) records a *build
memo*:

    key   = sha256(lamina version, Dockerfile bytes, every option that can
            change the result, and a stat fingerprint of the whole context:
            path, type, mode, owner, size, mtime, ctime, inode of each entry)
    value = the image made, the base images it used (name -> manifest
            digest), its steps and the plan's warnings

The next build with the same key checks that each base image name still
resolves to the same manifest and that the image's blobs are still in the
store, then re-tags, writes the `type=oci` outputs from that image (as
the build would: the same bytes) and reports every step as cached.
Anything else (a
changed file, even an ignored one; a re-tagged base; `--no-cache`; `--pull`;
an `ADD` of a URL, whose remote content may change; any other output)
goes the normal way, which is always correct: the memo can only say "same
as last time".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamina.cache.store import Store
    from lamina.engine.model import BuildOptions, BuildResult
    from lamina.engine.outputspec import OutputSpec
    from lamina.engine.progress import ProgressSink

MEMO_VERSION = "lamina-build-memo-v1"
_URL_ADD = re.compile(rb"(?im)^[ \t]*(?:onbuild[ \t]+)?add\b[^\n]*\bhttps?://")


def memo_key(options: BuildOptions, dockerfile: Path, data: bytes) -> str | None:
    """The memo key of this build, or None when it must not be replayed."""
    from lamina.engine.buildfiles import dockerfile_ignore_file

    if options.no_cache or options.no_cache_filter or options.pull or options.dry_run:
        return None
    # type=oci writes the committed image as it is (imageexport.default_export); docker's
    # media types, local and tar trees are made by the build.
    oci = _outputs_of(options, "oci")
    images = _outputs_of(options, "image")
    if len(oci) + len(images) != len(options.outputs):
        return None
    # An image output with exporter attributes, or attestations, makes its own image (imageexport).
    if options.provenance is not None or options.sbom is not None:
        return None
    if any(o.has_image_attributes for o in options.outputs):
        return None
    if _URL_ADD.search(data):
        return None
    if options.source_policy is not None:  # its sources are judged again on every build
        return None
    h = hashlib.sha256()
    settings = {
        "v": MEMO_VERSION,
        "dockerfile": str(dockerfile.resolve()),
        "target": options.target,
        "build_args": sorted(options.build_args),
        "labels": sorted(options.labels),
        "secrets": sorted((s.id, str(s.source)) for s in options.secrets),
        "network": options.network,
        "allow": sorted(options.allow),  # a build replayed without its --allow must fail as it would
        "compression": options.compression,
        "epoch": options.source_date_epoch,
        # a type=oci output writes the image as it is: a plain build's memo serves it
        "outputs": [(o.type.value, list(o.names)) for o in images],
        # what a RUN sees beyond its key (a required ssh mount fails without --ssh), and the
        # images a --build-context stands in for
        "ssh": sorted(agent.id for agent in options.ssh),
        "run": [options.add_hosts, [(u.name, u.soft, u.hard) for u in options.ulimits], options.shm_size],
        "contexts": sorted((c.name, c.ref, c.digest) for c in options.build_contexts),
        "platforms": [p.to_json() for p in options.platforms],  # each target's image (an index of several)
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(b"\0dockerfile\0" + data)
    ignore = dockerfile_ignore_file(options.context, dockerfile)
    if ignore.is_file():
        h.update(b"\0ignore\0" + ignore.read_bytes())
    try:
        _fingerprint(options.context, h)
    except OSError:
        return None  # an unreadable context: let the normal path report it
    from lamina.engine.cachekey import build_memo_key

    return build_memo_key(h.hexdigest())


def _fingerprint(root: Path, h: Any) -> None:
    """Feed the stat identity of every entry under `root` into `h` (no file is read); the
    build's COPY walk reuses what this pass saw (engine.statpass)."""
    from lamina.engine.statpass import fingerprint

    fingerprint(root, h)


def record(store: Store, key: str, result: BuildResult, images: list[list[str]], totals: dict[str, int],
           warnings: tuple[str, ...], froms: dict[str, str], one_stage: bool = False) -> None:  # fmt: skip
    """Remember a finished build under its memo key; `images`: [name, platform, manifest digest]
    of each base image (a name for an index: the platform's manifest in it)."""
    value = {
        "image": result.image_digest or result.pending,
        "pending": bool(result.pending),  # "image" is a pending one (cache.store), made on first use
        "config": result.config_digest,
        "target": result.target,
        "bases": images,
        "warnings": list(warnings),
        "totals": totals,
        "froms": froms,
        "one_stage": one_stage,  # progress names no stage (model.StageState.in_progress)
        "steps": [[s.stage, s.index, s.instruction, s.key] for s in result.steps],
    }
    store.cache_put(key, json.dumps(value))


def replay(
    store: Store, key: str, options: BuildOptions, sink: ProgressSink, start: float
) -> BuildResult | None:
    """The recorded result of an unchanged build (tags renewed), or None to build normally."""
    import time

    from lamina.engine.model import BuildResult, StepRecord
    from lamina.engine.progress import BuildSummary, StepEvent, StepStatus
    from lamina.errors import LaminaError
    from lamina.oci.digest import Digest
    from lamina.oci.image import MAX_DOCUMENT, ImageConfig
    from lamina.oci.reference import store_name

    text = store.cache_get(key)
    if text is None:
        return None
    try:
        value = json.loads(text)
        if not all(_same_base(store, name, platform, digest) for name, platform, digest in value["bases"]):
            return None
        digest, pending = Digest.parse(value["image"]), bool(value.get("pending"))
        if pending and (store.made_from(digest) or _wants_manifest(options)):  # else it stays pending
            made = store.make_pending(digest)  # cache.store: compressed now (unless made already)
            digest, pending = (made[0], False) if made is not None else (digest, pending)
        stored = _stored_image(store, digest)
        if stored is None:
            return None
        config = ImageConfig.from_bytes(store.read_blob(stored.manifest.config.digest, MAX_DOCUMENT))
    except (LaminaError, ValueError, KeyError, TypeError):
        return None
    for warning in value["warnings"]:
        sink.warn(warning)
    steps = []
    one_stage = value.get("one_stage")  # the label: the platform a shown `linux/arm64 NAME` has, or none
    froms = dict(value.get("froms", {}))  # each stage's FROM (its step 1) comes before its other steps
    for stage, index, instruction, step_key in value["steps"] + [[s, 0, "", ""] for s in list(froms)]:
        total = value["totals"].get(stage, index)
        label = stage.rpartition(" ")[0] if one_stage else None  # model.StageState.in_progress
        if stage in froms:
            sink.step(StepEvent(stage, 1, total, froms.pop(stage), StepStatus.CACHED, label=label))
        if not instruction:
            continue
        sink.step(StepEvent(stage, index, total, instruction, StepStatus.CACHED, label=label))
        steps.append(StepRecord(stage, index, instruction, True, 0.0, step_key))
    manifest = stored.manifest
    size = manifest.config.size + sum(layer.size for layer in manifest.layers)
    if stored.index is not None:  # as multiplatform._tag: every document and blob
        size += sum(d.size for d in (stored.main, *stored.extra))
    created = stored.created or config.created or ""
    wanted = [*options.tags, *(n for o in _outputs_of(options, "image") for n in o.names)]
    names = []
    for name in wanted:
        full = store_name(name)
        store.tag(full, stored.top.digest, size=size, created=created)
        if name in options.tags:
            names.append(full)
    _write_outputs(store, options, stored, tuple(names), sink)
    seconds = time.monotonic() - start
    result = BuildResult(
        "" if pending else str(digest), value["config"], config, tuple(names), tuple(steps), seconds,
        value["target"], index=stored.index is not None, pending=str(digest) if pending else "",
    )  # fmt: skip
    summary = BuildSummary(
        result.image_digest, result.config_digest, len(steps), 0, seconds, result.index, bool(pending)
    )
    sink.finish(summary)
    return result


def _wants_manifest(options: BuildOptions) -> bool:
    """Whether this build needs its image's manifest now (not left pending: cache.store)."""
    return not options.lazy_image or bool(_outputs_of(options, "oci"))


def _outputs_of(options: BuildOptions, kind: str) -> list[OutputSpec]:
    """The build's outputs of type `kind` (an OutputType value). A plain `lamina build` has
    none: its no-op rebuild then never loads the -o parser (engine.outputspec)."""
    if not options.outputs:
        return []
    from lamina.engine.outputspec import OutputType

    return [output for output in options.outputs if output.type is OutputType(kind)]


def _same_base(store: Store, name: str, platform: str, digest: str) -> bool:
    """Whether base image `name` still means manifest `digest` for `platform`."""
    top = store.resolve(name).manifest
    if str(top) == digest:
        return True
    from lamina.cache.platforms import platform_manifest  # the name is an index (or changed)
    from lamina.oci.image import Platform

    return str(platform_manifest(store, top, Platform.parse(platform), name, strict=False)) == digest


@dataclasses.dataclass(frozen=True, slots=True)
class _Stored:
    """The build's image as the store holds it: its manifest (for an index, the main platform's:
    the host's or the first, as multiplatform._main_platform), and for an index the index and
    every other blob (the other platforms' manifests, configs and layers)."""

    main: Any  # the manifest's descriptor
    manifest: Any
    index: Any = None
    extra: tuple[Any, ...] = ()
    created: str = ""  # an index's: its newest platform image's

    @property
    def top(self) -> Any:
        return self.index if self.index is not None else self.main


def _stored_image(store: Store, digest: Any) -> _Stored | None:
    """The build's image when all of it is still in the store, else None."""
    from lamina.oci.image import (
        INDEX_TYPES,
        MAX_DOCUMENT,
        OCI_MANIFEST,
        Descriptor,
        ImageConfig,
        Index,
        Manifest,
        descriptor_of,
        host_platform,
        parse_document,
    )

    data = store.read_blob(digest, MAX_DOCUMENT)
    media_type = parse_document(data, "build memo image").get("mediaType")
    if media_type not in INDEX_TYPES:
        manifest = Manifest.from_bytes(data)
        if not all(store.has_blob(layer.digest) for layer in manifest.layers):
            return None
        return _Stored(Descriptor(OCI_MANIFEST, digest, len(data)), manifest)
    entries = Index.from_bytes(data).manifests
    host = str(host_platform())
    main = next((e for e in entries if str(e.platform) == host), entries[0])
    extra: list[Descriptor] = []
    created = ""
    for entry in entries:
        one = Manifest.from_bytes(store.read_blob(entry.digest, MAX_DOCUMENT))
        blobs = (one.config, *one.layers)
        if not all(store.has_blob(blob.digest) for blob in blobs):
            return None
        config = ImageConfig.from_bytes(store.read_blob(one.config.digest, MAX_DOCUMENT))
        created = max(created, config.created or "")
        if entry is not main:
            extra += [dataclasses.replace(entry, platform=None), *blobs]
    chosen = Manifest.from_bytes(store.read_blob(main.digest, MAX_DOCUMENT))
    top = descriptor_of(data, media_type)
    return _Stored(dataclasses.replace(main, platform=None), chosen, top, tuple(extra), created)


def _write_outputs(
    store: Store, options: BuildOptions, stored: _Stored, names: tuple[str, ...], sink: ProgressSink
) -> None:
    """The replayed build's `type=oci` outputs, written as executor._finish writes them."""
    wanted = _outputs_of(options, "oci")
    if not wanted:
        return
    from lamina.engine.imageexport import ExportedImage
    from lamina.engine.output import write_output
    from lamina.errors import LaminaError

    # an index: over every platform's image, as multiplatform._write_outputs writes it
    manifest = stored.manifest
    image = ExportedImage(stored.main, manifest.config, manifest.layers, stored.index, stored.extra)
    try:
        for output in wanted:
            for warning in write_output(output, store, image, (), names, options.source_date_epoch):
                sink.warn(warning)
    except LaminaError:
        sink.finish(None)
        raise
