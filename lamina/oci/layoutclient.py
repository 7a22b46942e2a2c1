"""An OCI image layout directory that answers like a registry: `--cache-to/--cache-from type=local`.

The build cache's registry format (lamina.cache.remote) talks to a
`RegistryClient` through five calls: head_manifest, get_manifest,
fetch_blob, push_blob and put_manifest. `LayoutClient` answers the same
calls from a layout directory, as BuildKit's local cache exporter writes
one (`oci-layout`, `index.json`, `blobs/sha256/...`): a tag is the
`org.opencontainers.image.ref.name` annotation of an index.json entry, the
registry and repository of a reference are ignored (the directory is the
repository).

Writes are atomic: a blob goes in under a temporary name and is renamed
when its digest checks; index.json is rewritten under a lock file and
renamed over the old one, so two builds exporting to one directory at once
both land. Reads verify what they hand out (size and digest), so a damaged
directory is a miss with a warning upstream, never a wrong layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from lamina.errors import DigestMismatch, RegistryError
from lamina.oci.digest import Digest
from lamina.oci.image import OCI_INDEX, OCI_LAYOUT_VERSION, REF_NAME, Descriptor, Index, canonical_json
from lamina.oci.layout import renamed
from lamina.oci.reference import Reference
from lamina.oci.registry import RemoteManifest

CHUNK = 1 << 20
MAX_INDEX = 64 * 1024 * 1024


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class LayoutClient:
    """A layout directory with RegistryClient's manifest and blob calls (see the module docstring)."""

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self.root = root
        if create:
            (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            layout = root / "oci-layout"
            if not layout.exists():
                _atomic_write(layout, canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
        elif not (root / "oci-layout").is_file():
            raise RegistryError(f"{root}: no oci-layout file: not a cache directory written by --cache-to")

    def __enter__(self) -> LayoutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    # --- manifests ---------------------------------------------------------------------

    def _index(self) -> Index:
        path = self.root / "index.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return Index(())
        if len(data) > MAX_INDEX:
            raise RegistryError(f"{path}: {len(data)} bytes, more than {MAX_INDEX} allowed")
        return Index.from_bytes(data, str(path))

    def _entry(self, ref: Reference) -> Descriptor | None:
        for entry in self._index().manifests:
            if ref.digest is not None and entry.digest == ref.digest:
                return entry
            if ref.digest is None and entry.annotation(REF_NAME) == ref.tag:
                return entry
        return None

    def head_manifest(self, ref: Reference, *, what: str | None = None) -> Digest | None:
        entry = self._entry(ref)
        return entry.digest if entry is not None else None

    def get_manifest(self, ref: Reference, *, what: str | None = None) -> RemoteManifest:
        entry = self._entry(ref)
        if entry is None:
            raise RegistryError(f"{what or ref}: {ref.identifier} is not in {self.root}")
        data = self._read(entry, what or str(ref))
        return RemoteManifest(entry.media_type, entry.digest, data)

    def put_manifest(self, ref: Reference, manifest: RemoteManifest) -> Digest:
        self._put_bytes(manifest.data, manifest.digest)
        entry = Descriptor(manifest.media_type, manifest.digest, len(manifest.data))
        if ref.tag is not None:
            entry = entry.replace_annotations({REF_NAME: ref.tag})
        with self._locked():
            kept = [
                m
                for m in self._index().manifests
                if not (ref.tag is not None and m.annotation(REF_NAME) == ref.tag)
                and not (ref.tag is None and m.digest == manifest.digest)
            ]
            index = Index((*kept, entry), OCI_INDEX)
            _atomic_write(self.root / "index.json", index.to_bytes())
        return manifest.digest

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lamina-index.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # --- blobs -----------------------------------------------------------------------------

    def _blob_path(self, digest: Digest) -> Path:
        if digest.algorithm != "sha256":
            raise RegistryError(f"{self.root}: unsupported digest {digest}")
        return self.root / "blobs" / "sha256" / digest.hex

    def _read(self, blob: Descriptor, what: str) -> bytes:
        path = self._blob_path(blob.digest)
        try:
            size = path.stat().st_size
            if size != blob.size or size > MAX_INDEX:
                raise DigestMismatch(f"{what}: {path}: {size} bytes, descriptor says {blob.size}")
            data = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{what}: blob {blob.digest} is missing from {self.root}") from None
        if Digest.of_bytes(data) != blob.digest:
            raise DigestMismatch(f"{what}: {path}: content has a different digest")
        return data

    def fetch_blob(
        self, ref: Reference, blob: Descriptor, out: Sink, progress: Callable[[int], None] | None = None
    ) -> None:
        """Copy `blob` into `out`, counting and hashing as it goes; a mismatch raises."""
        path = self._blob_path(blob.digest)
        digest = hashlib.sha256()
        count = 0
        try:
            with open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    count += len(chunk)
                    if count > blob.size:
                        break
                    digest.update(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            raise RegistryError(f"fetch {blob.digest}: missing from {self.root}") from None
        if count != blob.size or digest.hexdigest() != blob.digest.hex:
            raise DigestMismatch(f"fetch {blob.digest} from {self.root}: the stored bytes do not match")

    def push_blob(
        self,
        ref: Reference,
        blob: Descriptor,
        opener: Callable[[], BinaryIO],
        *,
        mount_from: object = (),
        chunk_size: int | None = None,
    ) -> str:
        path = self._blob_path(blob.digest)
        if path.is_file() and path.stat().st_size == blob.size:
            return "exists"
        # Per thread: entries pushed side by side may share a blob (a step and its alias key).
        tmp = path.with_name(f".tmp-{blob.digest.hex}-{os.getpid()}-{threading.get_ident()}")
        digest = hashlib.sha256()
        try:
            with opener() as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != blob.digest.hex:
                raise DigestMismatch(f"push {blob.digest} to {self.root}: the source has another digest")
            os.replace(tmp, path)
        except OSError as err:
            shown = renamed(err, tmp, path)  # the blob, not a temporary name the user never gave
            if shown is None:
                raise
            raise shown from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return "uploaded"

    def _put_bytes(self, data: bytes, digest: Digest) -> None:
        import io

        self.push_blob(
            Reference("local", "cache"), Descriptor("", digest, len(data)), lambda: io.BytesIO(data)
        )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        shown = renamed(err, tmp, path)
        if shown is None:
            raise
        raise shown from err
