"""Overlay form: how a directory used as an overlayfs layer marks what it hides.

A whiteout is a character device 0/0 (the kernel hard-links all of an upper
dir's whiteouts to one inode); an opaque directory carries
`user.overlay.opaque` (rootless, mounted with `userxattr`) or
`trusted.overlay.opaque` (root) = "y". In a layer tar (OCI form) the same
facts are the empty files `.wh.NAME` and `.wh..wh..opq`.

Imported by the sandbox helper, whose start-up is every RUN step's: os and
stat only.
"""

from __future__ import annotations

import os
import stat

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str | os.PathLike[str]) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False
