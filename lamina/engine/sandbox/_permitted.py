"""After a non-root RUN under proot (helper side): nothing changed that its USER may not change.

Under proot every file of the step's copied root filesystem is the caller's
on disk, so the kernel lets a step running as USER 1000 chmod, write and
remove root's files: `chmod 4755 /bin/busybox` would give the image a root
setuid shell, `echo >> /etc/passwd` a new account. In a user namespace the
kernel refuses each call, as it does under BuildKit. The supervisor cannot
refuse them as they happen without answering every open, rename and unlink
of the step (a round trip each), so the step's result, the upper dir the
compare wrote, is checked once it ran, against the owners (lamina's records
in the lower layers, else root's) and modes the step started from, by the
kernel's rules:

- a mode changed needs the file's owner;
- content, times or xattrs changed need the owner or write permission,
  and a non-owner's write to a setuid or setgid file (which the kernel
  answers by clearing the bits) is refused too;
- an entry made, removed or replaced needs write and search permission on
  its directory (the directory's owner may grant them itself), and in a
  sticky directory to own the entry; a directory removed or moved needs it
  for each entry it held.

The first change that breaks them fails the step in one line. Stricter than
the kernel in one case: moving another user's non-empty directory within a
directory the step may write (the kernel checks only the two parents).

Helper-side: the stdlib only.
"""

from __future__ import annotations

import os
import stat

from lamina.engine.sandbox._rootfs import LayerStack
from lamina.oci import recorded

_W, _X = 0o2, 0o1


def first_refused(
    upper: str,
    before: dict[str, tuple[int, ...]],
    root: str,
    lowers: list[str],
    user: tuple[int, int, list[int]],
    lamina_made: list[str] | None = None,
) -> str | None:
    """The first change in `upper` that `user` (uid, gid, supplementary gids) may not have made,
    as a message; None when there is none. `before` is the compare's baseline (path -> facts,
    mode and inode first), `root` the copied root filesystem the step changed, `lamina_made`
    the directories lamina made in it after the baseline (a missing WORKDIR): root's, as if
    they had been there."""
    if lamina_made:
        before = dict(before)
        for rel in lamina_made:
            st = os.lstat(os.path.join(root, rel))
            before[rel] = (st.st_mode, st.st_ino)
    return _Check(before, root, lowers, user).upper_dir(upper)


class _Check:
    def __init__(
        self,
        before: dict[str, tuple[int, ...]],
        root: str,
        lowers: list[str],
        user: tuple[int, int, list[int]],
    ) -> None:
        self.before = before
        self.root = root
        self.stack = LayerStack(lowers)
        self.uid = user[0]
        self.gids = {user[1], *user[2]}
        self.me = os.getuid()
        self.children: dict[str, list[str]] | None = None
        self.owners: dict[str, tuple[int, int]] = {}  # many files made in one directory: one lookup
        self.same: dict[str, bool] = {}  # directory -> still the inode it was

    def upper_dir(self, upper: str) -> str | None:
        mode = stat.S_IMODE(os.lstat(self.root).st_mode)
        if "" in self.before and mode != stat.S_IMODE(self.before[""][0]) and self.owner("")[0] != self.uid:
            return self.refused("changed the mode of /", "")
        todo = [""]
        while todo:
            rel = todo.pop()
            with os.scandir(os.path.join(upper, rel) if rel else upper) as it:
                entries = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
            for name, st in entries:
                child = f"{rel}/{name}" if rel else name
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # a whiteout: removed
                    why = self.removed(child)
                elif child not in self.before:
                    why = self.edits(rel, child, "made")
                else:
                    why = self.changed(child, todo)
                if why is not None:
                    return why
        return None

    def changed(self, rel: str, todo: list[str]) -> str | None:
        """`rel`, which was there before, in the upper dir: replaced, or changed in place."""
        old = self.before[rel]
        try:
            now = os.lstat(os.path.join(self.root, rel))
        except FileNotFoundError:
            return self.removed(rel)
        if stat.S_IFMT(now.st_mode) != stat.S_IFMT(old[0]) or now.st_ino != old[1]:
            return self.removed(rel)  # and made again: the same directory's permission
        owner = self.owner(rel)
        if stat.S_IMODE(now.st_mode) != stat.S_IMODE(old[0]) and owner[0] != self.uid:
            return self.refused(f"changed the mode of /{rel}", rel)
        if stat.S_ISDIR(now.st_mode):
            todo.append(rel)  # what changed below it
            return None
        if owner[0] == self.uid:
            return None
        if not self.may(owner, old[0], _W):
            return self.refused(f"wrote /{rel}", rel)
        if old[0] & stat.S_ISUID or (old[0] & stat.S_ISGID and old[0] & stat.S_IXGRP):
            return self.refused(f"wrote the setuid or setgid file /{rel}", rel)
        return None

    def removed(self, rel: str) -> str | None:
        """`rel` and, a directory, all it held are gone (removed, moved or replaced)."""
        todo = [rel]
        while todo:
            path = todo.pop()
            why = self.edits(os.path.dirname(path), path, "removed")
            if why is not None:
                return why
            if stat.S_ISDIR(self.before[path][0]):
                todo.extend(self.held(path))
        return None

    def edits(self, parent: str, rel: str, verb: str) -> str | None:
        """`verb` (made, removed) `rel` in directory `parent`: needs its write and search permission."""
        old = self.before.get(parent)
        if old is None:
            return None  # made by the step
        if parent not in self.same:
            try:
                self.same[parent] = os.lstat(os.path.join(self.root, parent)).st_ino == old[1]
            except FileNotFoundError:
                self.same[parent] = True  # removed as well: checked there, and this entry with it
        if not self.same[parent]:
            return None  # replaced by the step: checked where it was removed
        owner = self.owner(parent)
        if owner[0] == self.uid:
            return None
        if not self.may(owner, old[0], _W | _X):
            return self.refused(f"{verb} /{rel}", parent)
        if old[0] & stat.S_ISVTX and verb == "removed" and self.owner(rel)[0] != self.uid:
            return self.refused(f"removed /{rel} from sticky /{parent}", rel)
        return None

    def held(self, rel: str) -> list[str]:
        if self.children is None:
            self.children = {}
            for path in self.before:
                if path:
                    self.children.setdefault(os.path.dirname(path), []).append(path)
        return self.children.get(rel, [])

    def owner(self, rel: str) -> tuple[int, int]:
        """Who owned `rel` when the step began: lamina's record in the layers, else root
        (the caller's own files; another id's as they are, as the supervisor shows them)."""
        if rel not in self.owners:
            found = self.stack.find(rel) if rel else None
            if found is None:
                self.owners[rel] = (0, 0)
            else:
                path, st = found
                default = (0, 0) if st.st_uid == self.me else (st.st_uid, st.st_gid)
                self.owners[rel] = recorded.owner_of(path, default)
        return self.owners[rel]

    def may(self, owner: tuple[int, int], mode: int, want: int) -> bool:
        if owner[0] == self.uid:
            bits = mode >> 6
        elif owner[1] in self.gids:
            bits = mode >> 3
        else:
            bits = mode
        return bits & want == want

    def refused(self, what: str, rel: str) -> str:
        owner, mode = self.owner(rel), stat.S_IMODE(self.before[rel][0])
        return (
            f"RUN as user {self.uid} {what} (/{rel} is {owner[0]}:{owner[1]}, mode {mode:04o}), which that "
            "user may not: proot isolation cannot refuse it as the step runs"
        )
