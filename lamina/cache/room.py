"""Whether a directory has room: a quota (a btrfs qgroup, a user's) does not show in statvfs.

A failure that does not name its cause (a command's "I/O error", SQLite's "disk I/O error",
a SIGBUS in a mapped file) is told apart from one for want of room by writing 1 MiB beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PROBE_BYTES", "room_refused"]

PROBE_BYTES = 1 << 20  # nothing lamina writes in one go, an index page or a command's, fits in less


def room_refused(directory: Path) -> OSError | None:
    """The error a 1 MiB write in `directory` meets for want of room (ENOSPC, EDQUOT), if it does.

    Written in a `.tmp-` directory of its own: under the store's unpacked/ (where RUN steps
    and the index use it), gc and `cache verify` remove it if this process is killed meanwhile."""
    import shutil
    import tempfile

    from lamina.errors import is_disk_full

    try:
        probe = tempfile.mkdtemp(prefix=".tmp-room-", dir=directory)
    except OSError as err:
        return err if is_disk_full(err) else None
    try:
        fd = os.open(os.path.join(probe, "room"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            data = memoryview(bytes(PROBE_BYTES))
            while data:  # a short write, then the error
                data = data[os.write(fd, data) :]
            os.fsync(fd)  # where the file system allocates late (ext4's delayed allocation)
        finally:
            os.close(fd)
    except OSError as err:
        return err if is_disk_full(err) else None
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return None
