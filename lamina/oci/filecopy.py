"""Copying a regular file without inflating its holes.

A sparse file (fewer blocks allocated than its size: a VM disk, a database
file, `truncate -s`) is copied range by range with SEEK_DATA/SEEK_HOLE, so
the copy takes the space of the original; other files are the caller's to
copy (copy_file_range, sendfile). Layer tars carry the zeros (as BuildKit's
do, with no GNU sparse headers); unpacking turns whole zero chunks back into
holes (`extract`).

Helper-side: the stdlib only.
"""

from __future__ import annotations

import errno
import os

_CHUNK = 1 << 20


def is_sparse(fd: int, size: int) -> bool:
    """Whether the file open at `fd` (of `size` bytes) has holes this file system can find.

    Leaves the file position at 0.
    """
    if os.fstat(fd).st_blocks * 512 >= size:
        return False
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as err:
        if err.errno != errno.ENXIO:  # ENXIO: all of it is a hole; EINVAL: no SEEK_DATA here
            return False
    os.lseek(fd, 0, os.SEEK_SET)
    return True


def copy_sparse(src: int, dst: int, size: int) -> int:
    """Copy the data ranges of `src` into `dst` (empty), then set its length to `size`.

    Returns the bytes `src` holds, up to `size` + 1 (one more: it grew meanwhile).
    """
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno != errno.ENXIO:  # ENXIO: only a hole is left
                raise
            break
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        while start < end:
            data = os.pread(src, min(_CHUNK, end - start), start)
            if not data:
                break
            view = memoryview(data)
            while view:
                written = os.pwrite(dst, view, start)
                view, start = view[written:], start + written
        offset = max(end, start)
    os.ftruncate(dst, size)
    os.lseek(src, size, os.SEEK_SET)
    return size + len(os.read(src, 1))


def copy_path(src: str, dst: str) -> None:
    """shutil.copyfile, holes kept: `dst` is created (0600, not followed) or truncated."""
    import shutil

    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd_in).st_size
        if not is_sparse(fd_in, size):
            os.close(fd_in)
            fd_in = -1
            shutil.copyfile(src, dst, follow_symlinks=False)
            return
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            copy_sparse(fd_in, fd_out, size)
        finally:
            os.close(fd_out)
    finally:
        if fd_in >= 0:
            os.close(fd_in)
