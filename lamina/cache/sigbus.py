"""A SIGBUS in the store index's shared memory, said in lamina's one line instead of a silent death.

SQLite in WAL mode writes the index's `-shm` file through a shared mapping, so a page of it
that the file system cannot find room for is not an error SQLite sees: the kernel sends
SIGBUS to the writing thread and the process dies with exit 135, printing nothing. SQLite
writes a byte to each new page when it grows the file, which is enough on ext4, xfs and
tmpfs; btrfs reserves room again each time a written-back page is dirtied (copy on write).
Making the files no-copy-on-write (see `_open_index` in lamina.cache.store) lets btrfs
overwrite in place on a full disk, but a qgroup limit refuses even that (the page's
metadata reservation counts against the limit), so a quota hit still raises SIGBUS.

Python cannot turn that into an exception: its own handler returns to the faulting
instruction, which faults again. The handler here (installed while a Store is open, chaining
to whatever handled SIGBUS before) looks at the faulting address: in the mapping of an open
store's `index.db-shm`, it prints one line ("write …/index.db-shm: Disk quota exceeded;
cache intact" when a 1 MiB write beside it fails too) and exits 1; anywhere else it puts the
previous handler back and lets the fault happen again. Exiting there is a crash as far as
the store is concerned, and the store survives crashes: the transaction was not committed,
SQLite's WAL ignores it, and temporary files are what gc and `cache verify` already remove
after a SIGKILL (tests/test_crash_safety.py).

On the file systems where SQLite's byte per new page settles the page's room for good
(ext2/3/4, xfs, tmpfs) nothing is installed: ctypes and the handler cost a no-op rebuild
about 2.5 ms, reading /proc/self/mountinfo 0.03 ms.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

__all__ = ["forget_store", "guard_store"]

_PAGES_STAY = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs"})  # a written page keeps its room
_SA_SIGINFO = 0x4
_SA_ONSTACK = 0x08000000
_SI_ADDR_OFFSET = 16  # siginfo_t: three ints, then (aligned) the union whose first member is si_addr

_lock = threading.Lock()
_stores: dict[str, int] = {}  # real path of an open store's index.db-shm -> how many Stores have it open
_previous: Any = None  # the sigaction that handled SIGBUS before ours; None: ours not installed
_handler: Any = None  # the C callable of _on_sigbus, kept alive while installed
_kinds: dict[tuple[str, int], str] = {}  # (a store's real path, its st_dev) -> its file system's type


def guard_store(root: Path) -> bool:
    """Say a SIGBUS in the index of the store at `root` in one line (see above), until
    `forget_store`; whether it is watched (not on ext2/3/4, xfs or tmpfs, where no page faults so)."""
    real = os.path.realpath(root)
    try:
        where = (real, os.stat(real).st_dev)
    except OSError:
        where = (real, -1)
    if where not in _kinds:  # once per store and device in a process: a build opens several
        _kinds[where] = _file_system(real)
    if _kinds[where] in _PAGES_STAY:
        return False
    shm = os.path.join(real, "index.db-shm")
    with _lock:
        _stores[shm] = _stores.get(shm, 0) + 1
        with contextlib.suppress(OSError, AttributeError):  # no libc sigaction: left as it was
            _install()
    return True


def forget_store(root: Path) -> None:
    """The store at `root` closed (once for each `guard_store` that returned True)."""
    shm = os.path.join(os.path.realpath(root), "index.db-shm")
    with _lock:
        left = _stores.get(shm, 0) - 1
        if left > 0:
            _stores[shm] = left
        else:
            _stores.pop(shm, None)


def _file_system(path: str) -> str:
    """The type of the file system `path` (a real path) is on, from /proc/self/mountinfo;
    "" when that cannot be read."""
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mounts:
            for line in mounts:
                fields = line.split()
                point = _unescape(fields[4])
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):  # the deepest mount; the last one made on it
                    best, kind = point, fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        return ""
    return kind


def _unescape(field: str) -> str:
    """A mountinfo path with its octal escapes (\\040 for a space) undone."""
    if "\\" not in field:
        return field
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _install() -> None:
    global _previous, _handler
    if _previous is not None:
        return
    import ctypes

    class SigAction(ctypes.Structure):
        """glibc's struct sigaction (the same on x86-64 and aarch64)."""

        _fields_ = [
            ("sa_sigaction", ctypes.c_void_p),
            ("sa_mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
            ("sa_flags", ctypes.c_int),
            ("sa_restorer", ctypes.c_void_p),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    handler = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(_on_sigbus)
    action, previous = SigAction(), SigAction()
    action.sa_sigaction = ctypes.cast(handler, ctypes.c_void_p).value
    action.sa_flags = _SA_SIGINFO | _SA_ONSTACK  # faulthandler's alternate stack, when it set one
    if libc.sigaction(signal.SIGBUS, ctypes.byref(action), ctypes.byref(previous)) != 0:
        raise OSError(ctypes.get_errno(), "sigaction")
    _previous, _handler = previous, handler


def _on_sigbus(signum: int, info: int | None, context: int | None) -> None:
    """Runs on the faulting thread (which holds no lock of lamina's or of malloc's: SQLite
    was storing to the mapping). Returns only to let the previous handler take the fault."""
    import ctypes

    address = ctypes.c_void_p.from_address(info + _SI_ADDR_OFFSET).value if info else None
    shm = _mapped_at(address) if address is not None else None
    if shm is None or shm not in _stores:
        if _previous is not None:  # not ours: the fault happens again, for the previous handler
            ctypes.CDLL(None).sigaction(signal.SIGBUS, ctypes.byref(_previous), None)
        return
    os.write(2, (_message(Path(shm)) + "\n").encode(errors="replace"))
    os._exit(1)


def _mapped_at(address: int) -> str | None:
    """The file mapped at `address` in this process, from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, _, end = fields[0].partition("-")
                if int(start, 16) <= address < int(end, 16):
                    return fields[5].rstrip("\n") if len(fields) == 6 else None
    except (OSError, ValueError):
        pass
    return None


def _message(shm: Path) -> str:
    """lamina's error line for a SIGBUS writing `shm`: a quota or a full disk when 1 MiB
    cannot be written beside it either, else the kernel's refusal as it is."""
    from lamina.cache.room import room_refused

    refused = room_refused(shm.parent / "unpacked")
    if refused is not None:
        return f"error: write {shm}: {refused.strerror} (the store index's shared memory); cache intact"
    return (
        f"error: write {shm}: the kernel refused a page of the store index's shared memory (SIGBUS);"
        " the store is as a killed build leaves it: `lamina cache verify` checks it"
    )
