"""A stored name that stands for a multi-platform image: which image it means per platform.

A name in the store points at an image manifest, or at an OCI index of one manifest per
platform (a multi-platform build, a loaded multi-platform archive, a pulled index). A pulled
index holds only the platforms pulled: the others are listed, not stored.

- `platform_manifest(store, top, platform, what)`: the image manifest for a platform.
- `image_platforms(store, top)`: (platform, manifest) of each stored image of a name.
- `listed_platforms(store, top)`: the platforms a name is for, as `lamina images` lists them.
- `never_pulled(store, index)`: what of an index is not in the store.
- `index_facts(store, index)`: the size and newest `created` of the stored platform images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lamina.errors import ImageNotFound
from lamina.oci.image import (
    INDEX_TYPES,
    MAX_DOCUMENT,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    host_platform,
    match_platform,
    parse_document,
    platform_matches,
    platforms_of,
)
from lamina.oci.layout import is_attachment

if TYPE_CHECKING:
    from lamina.cache.store import Store
    from lamina.oci.digest import Digest


def is_index(data: bytes) -> bool:
    """Whether a stored document is an index (or docker manifest list), not an image manifest."""
    obj = parse_document(data, "manifest or index")
    media_type = obj.get("mediaType")
    return media_type in INDEX_TYPES or (media_type is None and "manifests" in obj)


def read_manifest(store: Store, digest: Digest) -> Manifest | None:
    """The image manifest at `digest`, None for an index."""
    data = store.read_blob(digest, MAX_DOCUMENT)
    if is_index(data):
        return None
    return Manifest.from_bytes(data, f"manifest {digest}")


def index_facts(store: Store, index: Index) -> tuple[int, str]:
    """(bytes of the stored platforms' configs and layers, the newest `created`) of an index."""
    blobs: dict[Digest, int] = {}
    created = ""
    for entry in index.manifests:
        if not store.has_blob(entry.digest):
            continue
        manifest = read_manifest(store, entry.digest)
        if manifest is None:
            continue
        for blob in (manifest.config, *manifest.layers):
            blobs[blob.digest] = blob.size
        config = ImageConfig.from_bytes(store.read_blob(manifest.config.digest, MAX_DOCUMENT))
        created = max(created, config.created or "")
    return sum(blobs.values()), created


def platform_manifest(
    store: Store, top: Digest, platform: Platform | None, what: str, *, strict: bool = True
) -> Digest:
    """The image manifest a stored name's digest `top` means for `platform` (None: this host).

    `top` is that manifest when it is one (checked against an explicit `platform` when
    `strict`), else an index whose entry for the platform is chosen (match_platform).
    ImageNotFound says which platforms there are, or that the chosen one was never pulled.
    """
    data = store.read_blob(top, MAX_DOCUMENT)
    if not is_index(data):
        if strict and platform is not None:
            manifest = Manifest.from_bytes(data, f"{what}: manifest {top.short}")
            have = ImageConfig.from_bytes(store.read_blob(manifest.config.digest, MAX_DOCUMENT)).platform
            if not platform_matches(have, platform):
                raise ImageNotFound(f"{what}: the image is {have}, not {platform}")
        return top
    entries = Index.from_bytes(data, f"{what}: index {top.short}").manifests
    want = platform or host_platform()
    chosen = match_platform(entries, want)
    if chosen is None:
        raise ImageNotFound(f"{what}: no image for {want} (it has {platforms_of(entries)})")
    if not store.has_blob(chosen.digest):
        raise ImageNotFound(f"{what}: its {want} image was not pulled (lamina pull --platform {want})")
    return chosen.digest


def never_pulled(store: Store, index: Index) -> str:
    """What of a stored index is not in the store, "" when it is whole: a pull fetches the
    platform asked for, not the others nor the attestations (`linux/amd64 image, attestations`)."""
    missing = [f"{e.platform or e.digest.short} image" for e in index.manifests
               if not store.has_blob(e.digest) and not is_attachment(e)]  # fmt: skip
    if any(not store.has_blob(e.digest) for e in index.manifests if is_attachment(e)):
        missing.append("attestations")
    return ", ".join(missing)


def image_platforms(store: Store, top: Digest) -> tuple[tuple[Platform, Digest], ...]:
    """(platform, manifest) of each stored platform image of a name's digest: one for a
    single manifest (its config's platform), each entry present in the store for an index."""
    data = store.read_blob(top, MAX_DOCUMENT)
    if not is_index(data):
        manifest = Manifest.from_bytes(data, f"manifest {top}")
        config = ImageConfig.from_bytes(store.read_blob(manifest.config.digest, MAX_DOCUMENT))
        return ((config.platform, top),)
    entries = Index.from_bytes(data, f"index {top}").manifests
    return tuple(
        (e.platform, e.digest) for e in entries if e.platform is not None and store.has_blob(e.digest)
    )


def listed_platforms(store: Store, top: Digest) -> tuple[str, ...]:
    """The platforms a name's digest `top` is for, as `lamina images` lists them: a manifest's
    (its config's); each image entry of an index (not its attestations), in parentheses when
    that platform's image was never pulled."""
    data = store.read_blob(top, MAX_DOCUMENT)
    if not is_index(data):
        return tuple(str(platform) for platform, _ in image_platforms(store, top))
    entries = Index.from_bytes(data, f"index {top}").manifests
    return tuple(
        str(e.platform) if store.has_blob(e.digest) else f"({e.platform})"
        for e in entries
        if e.platform is not None and not is_attachment(e)
    )
