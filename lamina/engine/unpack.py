"""A layer blob unpacked into the store, once: the one way a base layer becomes a lower dir.

FROM (steps.base), an imported --cache-from result (cache.remote) and
`lamina run` (api) all come here. The store names the directory: a base
layer by its diff_id, an imported step result by the step's layer id.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamina.cache.store import Store
    from lamina.oci.digest import Digest


def unpacked_layer(store: Store, blob: Digest, name: Digest, ids: Any = None) -> Path:
    """The store's unpacked dir `name` (overlay form), unpacking the blob `blob` into it the first time.

    A dir another build published first is kept (and touched for gc). `ids`
    is the sandbox's id map (`sandbox.detect_ids()` when None).
    """
    ids = _check_owner_form(store, ids)
    if store.has_unpacked(name):
        store.touch_unpacked(name)
        return store.unpacked_path(name)
    # Imported here, not at the top: the sandbox package is not needed when the
    # layer is unpacked already (a cached build, a second `lamina run`). It
    # unpacks inside the user namespace when rootless, so files owned by
    # subordinate ids stay manageable.
    from lamina.cache.topdir import mark_top_dir
    from lamina.engine.sandbox import extract_layer, remove_tree

    tmp = store.new_unpack_dir()
    # A layer's root is `/`: mkdtemp's 0700 would lock every user but root out
    # (the sandbox copies the top lower's root metadata onto the upper dir).
    os.chmod(tmp, 0o755)
    # Its usr/, var/, etc/ each in a block group of their own choosing (lamina.cache.topdir):
    # on an ext4 without a journal, unpacking the bookworm minbase took 2.1 CPU-s of system
    # time without the flag, 1.2 with it (medians of 6 alternations at load 13).
    mark_top_dir(tmp)
    try:
        if not _unpacked_as_caller(store.blob_path(blob), tmp, ids, blob):
            extract_layer(store.blob_path(blob), tmp, ids, digest=blob)
    except BaseException:
        remove_tree(tmp, ids)
        raise
    return store.publish_unpacked(tmp, name)


def _unpacked_as_caller(path: Path, tmp: Path, ids: Any, blob: Digest) -> bool:
    """Rootless with subordinate ids, a layer whose every entry is root's (busybox, most
    distroless bases) unpacked in this process as the user namespace's root would (the
    caller's id is that root), without a helper process (~0.09 s of a cold rootless build).
    Whether it was; if not, `tmp` is left empty for the helper, which makes what only the
    namespace's root can (other owners, security xattrs, overlay whiteouts)."""
    from lamina.engine.sandbox import remove_tree
    from lamina.engine.sandbox.idmap import IdMode, detect_ids
    from lamina.oci.extract import NeedsNamespace, Whiteouts
    from lamina.oci.extract import extract_layer as unpack

    if (ids or detect_ids()).mode is not IdMode.SUBORDINATE:
        return False
    try:
        with open(path, "rb") as stream:
            # As the helper unpacks (sandbox/_extract.py): device nodes as placeholders.
            unpack(
                stream,
                tmp,
                whiteouts=Whiteouts.OVERLAY,
                userxattr=True,
                digest=blob,
                record_devices=True,
                as_namespace_root=True,
            )
    except NeedsNamespace:
        remove_tree(tmp, ids, keep_root=True)
        return False
    return True


OWNER_FORM = "owner-form"  # in the store root: how its layer dirs keep owners


def _check_owner_form(store: Store, ids: Any) -> Any:
    """The id map, once this store's layer dirs are known to keep owners the way it does.

    Layer dirs unpacked with a user namespace (or as root) hold owners on disk;
    without one (proot isolation) they are the caller's and hold them in
    xattrs (lamina.oci.recorded). A store is one or the other: read the other
    way, its owners would silently be wrong, so mixing is one line.
    """
    from lamina.engine.sandbox import detect_ids
    from lamina.engine.sandbox.idmap import IdMode
    from lamina.errors import SandboxError

    ids = ids or detect_ids()
    form = "xattrs" if ids.mode is IdMode.RECORDED else "disk"
    marker = store.root / OWNER_FORM
    try:
        found = marker.read_text().strip()
    except FileNotFoundError:
        found = ""
    if not found:
        # The first base layer this store unpacks says how it keeps owners (step
        # results made before, FROM scratch, were made by a process of the same form).
        tmp = store.root / f".{OWNER_FORM}.{os.getpid()}.{threading.get_ident()}"  # stages unpack at once
        tmp.write_text(form + "\n")
        os.replace(tmp, marker)
        return ids
    if found != form:
        where = "in xattrs (no user namespace: proot isolation)" if found == "xattrs" else "on disk"
        raise SandboxError(
            f"the cache at {store.root} keeps layer owners {where}, which this process "
            f"({'proot isolation' if form == 'xattrs' else 'with user namespaces or as root'}) cannot read "
            "right: use another cache (LAMINA_CACHE or --cache-dir) for it"
        )
    return ids
