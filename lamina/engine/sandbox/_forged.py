"""After a RUN (helper side): no `user.lamina.*` record in its upper dir that lamina did not make.

lamina's records (`lamina.oci.recorded`: an owner, a device placeholder, an
xattr the caller could not set) become a file's owner, type and xattrs when
the layer is written. Any process may set `user.*` xattrs on a file it may
write, so a step's unprivileged USER (an untrusted `npm install`) could give
its own file `user.lamina.owner=0:0` and mode 4755 and get a root setuid
binary, a block device or file capabilities into the image. BuildKit allows
none of that. A record in the upper dir is kept only when it is

- what the lower layers hold at the same path (overlay copy-up, the copy
  snapshotter's copy: a chmod of an inherited placeholder), or
- what lamina's own supervisor made on that inode during the step (the user
  namespace's PID 1 for a device mknod, proot's for chown and mknod), given
  here as `made`: inode -> {xattr name: value}, or
- for a root step under proot, which copies with `cp -a` or `tar --xattrs`
  what it may (the kernel lets it chown, mknod and set capabilities alike),
  a copy of a lower layer's file: the same content and the same record
  (`Copies`). A record on a file from a cache or bind mount is not one: a
  step as another USER may have left it there, for root's `cp -a` to carry
  into the layer as a root setuid binary.

Anything else fails the step with one line naming the path and the record,
never a silently different image. Checking setxattr's name in a seccomp
filter and letting the call go on would not do: another thread can rewrite
the name between the check and the call.

Helper-side: the stdlib only.
"""

from __future__ import annotations

import os
import stat

from lamina.engine.sandbox._rootfs import LayerStack
from lamina.oci import recorded

# inode (in the tree the step ran on) -> {record name: value lamina set}
Made = dict[int, dict[str, bytes]]


def records(path: str) -> dict[str, bytes]:
    """The `user.lamina.*` xattrs of `path` (not followed)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    found = {}
    for name in names:
        if name.startswith(recorded.PREFIX):
            try:
                found[name] = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
    return found


def first_forged(
    upper: str,
    lowers: list[str],
    made: Made,
    ran_on: str | None = None,
    before: dict[str, tuple[int, ...]] | None = None,
) -> str | None:
    """The first record in `upper` lamina did not make, as a message; None when there is none.

    `ran_on` is the tree the step's processes saw when that is not `upper`
    itself (the copy snapshotter's rootfs): `made`'s inodes are that tree's.
    With `before` (the copy snapshotter's baseline: path -> facts, mode first,
    size fifth), a record a lower layer's file of the same content holds is
    kept too: a root step's copy of it.
    """
    stack = LayerStack(lowers)
    copies = Copies(stack, before) if before is not None else None
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(os.path.join(upper, rel) if rel else upper) as it:
            entries = list(it)
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                todo.append(child)
            elif not stat.S_ISREG(st.st_mode):
                continue  # `user.` xattrs live on regular files and directories alone
            found = records(entry.path)
            if not found:
                continue
            below = stack.find(child)
            held = records(below[0]) if below is not None else {}
            ino = st.st_ino if ran_on is None else _inode(os.path.join(ran_on, child))
            ours = made.get(ino, {})
            for name, value in sorted(found.items()):
                if held.get(name) == value or ours.get(name) == value:
                    continue
                if copies is None or not copies.hold(entry.path, st, name, value):
                    return f"RUN left lamina's own xattr {name} on /{child}, which only lamina may set"
    return None


class Copies:
    """Which lower layer files a file in the upper dir may be a copy of, with their records."""

    def __init__(self, stack: LayerStack, before: dict[str, tuple[int, ...]]) -> None:
        self.stack = stack
        self.before = before
        self.alike: dict[int, list[str]] | None = None  # size (-1: a directory) -> paths
        self.held: dict[str, dict[str, bytes]] = {}  # path -> the records of its lower file
        self.digests: dict[str, bytes] = {}

    def hold(self, path: str, st: os.stat_result, name: str, value: bytes) -> bool:
        """Whether a lower file like `path` (a directory: any; a file: the same bytes) has
        record `name` = `value`."""
        if self.alike is None:
            self.alike = {}
            for rel, facts in self.before.items():
                if stat.S_ISDIR(facts[0]):
                    self.alike.setdefault(-1, []).append(rel)
                elif stat.S_ISREG(facts[0]):
                    self.alike.setdefault(facts[4], []).append(rel)
        key = -1 if stat.S_ISDIR(st.st_mode) else st.st_size
        mine = b""
        for rel in self.alike.get(key, ()):
            if rel not in self.held:  # a copied tree asks of the same few files again and again
                below = self.stack.find(rel)
                self.held[rel] = records(below[0]) if below is not None else {}
            if self.held[rel].get(name) != value:
                continue
            if key == -1:
                return True
            mine = mine or _digest(path)
            if rel not in self.digests:
                below = self.stack.find(rel)
                self.digests[rel] = _digest(below[0]) if below is not None else b""
            if self.digests[rel] == mine:
                return True
        return False


def _digest(path: str) -> bytes:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _inode(path: str) -> int:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return -1


def note(made: Made, ino: int, name: str, value: bytes | None) -> None:
    """Note in `made` that lamina just set record `name` of inode `ino` to `value` (None: removed)."""
    if value is None:
        made.get(ino, {}).pop(name, None)
    else:
        made.setdefault(ino, {})[name] = value


def note_path(made: Made, path: str, name: str) -> None:
    """`note` for the record `name` lamina just set (or removed) on `path` (not followed)."""
    try:
        ino = os.lstat(path).st_ino
    except OSError:
        return
    try:
        value: bytes | None = os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        value = None
    note(made, ino, name, value)


def load(data: bytes) -> Made:
    """`made` from lines of `INODE NAME HEX-VALUE` (another process's: PID 1's DeviceRecorder)."""
    made: Made = {}
    for line in data.decode(errors="replace").splitlines():
        try:
            ino, name, value = line.split(" ")
            made.setdefault(int(ino), {})[name] = bytes.fromhex(value)
        except ValueError:
            continue
    return made
