"""Owners and modes of the files a step writes into its upper dir.

As root a plain lchown; rootless, the sandbox package sets owners inside
the user namespace (subordinate ids), in an order that never locks the
build out of a directory it still has to write into.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def chown_all(owners: list[tuple[Path, int, int]]) -> None:
    """Give files the build wrote their container owners (call it last: it may lock us out).

    As root that is a plain lchown. Rootless, the sandbox package does it
    inside the user namespace (subordinate ids), or leaves the caller's id,
    which the sandbox shows as root, when there is no id range.
    """
    if os.geteuid() == 0:
        from lamina.oci.xattrs import lchown_keeping

        for path, uid, gid in owners:
            lchown_keeping(os.fspath(path), uid, gid)  # setuid bits and capabilities stay
        return
    wanted = [(Path(path), uid, gid) for path, uid, gid in owners if (uid, gid) != (0, 0)]
    if wanted:
        from lamina.engine.sandbox.runner import set_owners

        set_owners(wanted)


def chown(path: Path | str, uid: int, gid: int) -> None:
    chown_all([(Path(path), uid, gid)])


def set_owner_and_mode(path: Path, uid: int, gid: int, mode: int) -> None:
    """Owner, then mode (chown clears setuid); rootless the other way round, since
    the caller may not chmod a file it gave to a subordinate id."""
    if os.geteuid() == 0:
        os.lchown(path, uid, gid)
        os.chmod(path, mode)
    else:
        os.chmod(path, mode)
        chown(path, uid, gid)


def container_owner(st: os.stat_result, path: Path | str | None = None) -> tuple[int, int]:
    """The (uid, gid) a layer shows for a file of a layer dir (host ids, rootless).

    Given its `path`, an owner recorded in the file's xattr (no user
    namespace: `lamina.oci.recorded`) wins.
    """
    if os.geteuid() == 0:
        return st.st_uid, st.st_gid
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    ids = detect_ids()
    if ids.mode is IdMode.RECORDED and path is not None:
        from lamina.oci import recorded

        return recorded.owner_of(os.fspath(path), (ids.uid_inside(st.st_uid), ids.gid_inside(st.st_gid)))
    return ids.uid_inside(st.st_uid), ids.gid_inside(st.st_gid)


def keep_lower_dir_meta(
    view: Any, upper: Path, path: str, late_owners: list[tuple[Path, int, int]] | None = None
) -> None:
    """Directories of `path` (and its ancestors) that exist below keep their metadata.

    Writing `a/b/c` into an upper dir creates `a` and `a/b` there, which
    would shadow the lower dirs' mode, owner and times in the merged view;
    BuildKit leaves existing directories alone, so copy theirs over.
    """
    current = ""
    owners: list[tuple[Path, int, int]] = []
    for part in [p for p in path.split("/") if p]:
        current = f"{current}/{part}"
        target = upper / current.lstrip("/")
        if target.is_symlink() or not target.is_dir():
            break
        st = view.stat(current)
        if st is None:
            break
        os.chmod(target, st.st_mode & 0o7777)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        owners.append((target, *container_owner(st, view.real_path(current))))
    if late_owners is not None:
        # The caller writes into these first: unprivileged, a directory given
        # to another id would no longer be writable.
        late_owners.extend(owners)
    else:
        chown_all(owners)
