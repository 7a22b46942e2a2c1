"""Mark a directory as the top of unrelated hierarchies (`chattr +T`, FS_TOPDIR_FL).

Each layer directory in the store is a tree of its own. The flag tells
ext2/3/4's Orlov allocator to place each new subdirectory (and so the inodes
of the files made in it) in a block group with free room and few
directories, instead of next to the parent's. That matters on an ext4
without a journal: there, creating a file skips every inode of its group
freed in the last minute or more (`recently_deleted` in fs/ext4/ialloc.c),
one by one, so after a big tree was deleted nearby (an emptied cache, a test
suite's temporary files) each create scans thousands of them. Measured
here: 10,000 small files made in 5.3-6.0 CPU-s under a busy `/tmp`, 0.2 CPU-s
under a directory carrying the flag. A hint only: file systems without it
(tmpfs, xfs, btrfs) are left alone.

The same ioctl marks the store index's files no-copy-on-write (`chattr +C`,
FS_NOCOW_FL; see lamina.cache.store's `_open_index`).
"""

from __future__ import annotations

import fcntl
import os
import struct

__all__ = ["mark_no_cow", "mark_top_dir"]

_FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long); the kernel reads and writes an int
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000
_FS_NOCOW_FL = 0x00800000


def mark_top_dir(path: str | os.PathLike[str]) -> bool:
    """Give the directory `path` the top-dir flag if its file system has it; whether it has it now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _set_flag(fd, _FS_TOPDIR_FL)
    finally:
        os.close(fd)


def mark_no_cow(fd: int) -> bool:
    """Make the open file `fd` no-copy-on-write if its file system has the flag (btrfs); whether
    it is now. Only an empty file takes it: btrfs refuses it, or ignores it, on one with data."""
    return _set_flag(fd, _FS_NOCOW_FL)


def _set_flag(fd: int, flag: int) -> bool:
    """Add the inode flag `flag` to the file open as `fd` (FS_IOC_SETFLAGS); whether it has it now."""
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        (flags,) = struct.unpack_from("I", buf)
        if not flags & flag:
            struct.pack_into("I", buf, 0, flags | flag)
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, buf)
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)  # a flag the file system ignores is not set
            (flags,) = struct.unpack_from("I", buf)
        return bool(flags & flag)
    except OSError:  # ENOTTY, EOPNOTSUPP, EPERM, EINVAL: no such flag here, or not ours to set
        return False
