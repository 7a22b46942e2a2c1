"""chroot isolation (helper side): a RUN step with no namespaces at all.

For container root under Docker's default seccomp profile and capabilities
(no CAP_SYS_ADMIN, unshare denied): nothing can be mounted, so

- the root filesystem is a copy of the lower dirs, and the layer is the
  copy snapshotter's compare (`snapshot.record` / `write_diff`);
- what a mount would show is *staged* into the copy after the baseline is
  recorded and taken out again before the compare: /dev (device nodes made
  with CAP_MKNOD), /etc/resolv.conf and /etc/hosts, and every --mount
  (bind: a copy, writes dropped; tmpfs: an empty dir; secret: a copy with
  its owner and mode; cache: the cache directory itself, renamed in and
  back; a writable bind of `lamina run --mount`: a copy, mirrored back onto
  the source when the command is done, without following any link).
  Whatever the image had at a staged path is renamed aside while
  the command runs and back afterwards, and the parent directories' times
  are restored, so none of it reaches the layer;
- there is no /proc or /sys, no PID, network, UTS or IPC namespace;
- the command is held by Docker's 14 capabilities less CAP_SYS_CHROOT
  (root holding it leaves a chroot in two system calls) and the seccomp
  filter (with no_new_privs when CAP_SYS_ADMIN is missing, as the kernel
  then requires); the helper is a child subreaper, so every process the
  command leaves behind is killed before the compare.

Staged paths are resolved inside the root before the command runs and
checked again (same resolved path, same inode) after every process of the
step is gone: a step that swaps a directory for a symlink to a host path
cannot make the undo touch the host.
"""

# ruff: noqa: SIM105

from __future__ import annotations

import _signal
import os
import stat
from typing import TYPE_CHECKING

from lamina.engine.sandbox import _confine, _forged, _inside, _libc, _rootfs

if TYPE_CHECKING:
    from lamina.engine.snapshot import Baseline

_PR_SET_CHILD_SUBREAPER = 36
_CAP_SYS_ADMIN = 21
_CAP_SYS_CHROOT = 18
_DEV_NODES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
_ASIDE = ".lamina-aside-"


class _Staged:
    """One path put into the root for the command's run and taken out after it."""

    def __init__(self, rel: str, path: str, aside: str | None, ino: tuple[int, int], move_back: str) -> None:
        self.rel, self.path, self.aside, self.ino, self.move_back = rel, path, aside, ino, move_back
        self.aside_ino = (0, 0)
        self.write_back = ""  # a writable bind's source: mirrored from the copy before it goes


class Stage:
    """Paths staged into a copied root, undone in reverse order."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.items: list[_Staged] = []
        self.made_dirs: list[str] = []  # parents created for a target, removed if left empty
        self.times: dict[str, tuple[int, int]] = {}  # dir -> (atime, mtime) before staging
        self.after: dict[str, int] = {}  # dir -> mtime once staged

    def place(self, target: str, make, move_back: str = "", write_back: str = "") -> str:  # type: ignore[no-untyped-def]
        """Put `make(path)`'s object at `target` (container path); what was there goes aside."""
        rel = _rootfs.resolve_in_dir(self.root, target)
        if not rel:
            raise _inside.SetupError(f"--mount target {target}: cannot be /")
        path = os.path.join(self.root, rel)
        parent = os.path.dirname(path)
        self._parents(parent)
        aside = None
        if os.path.lexists(path):
            aside = os.path.join(parent, _ASIDE + os.path.basename(path))
            os.rename(path, aside)
        make(path)
        st = os.lstat(path)
        item = _Staged(rel, path, aside, (st.st_dev, st.st_ino), move_back)
        item.write_back = write_back
        if aside is not None:
            ast = os.lstat(aside)
            item.aside_ino = (ast.st_dev, ast.st_ino)
        self.items.append(item)
        return path

    def _parents(self, parent: str) -> None:
        missing = []
        here = parent
        while not os.path.lexists(here):
            missing.append(here)
            here = os.path.dirname(here)
        self._note_times(here)
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            self.made_dirs.append(d)
        self._note_times(parent)

    def _note_times(self, d: str) -> None:
        if d not in self.times:
            st = os.lstat(d)
            self.times[d] = (st.st_atime_ns, st.st_mtime_ns)

    def settle(self) -> None:
        """Note the staged dirs' mtimes: one the command changes is left as the command left it."""
        self.after = {d: _mtime(d) for d in self.times}

    def undo(self) -> None:
        untouched = {d for d, mtime in self.after.items() if _mtime(d) == mtime}
        for item in reversed(self.items):
            if not self._still(item.rel, item.path, item.ino):
                continue  # the command removed or replaced it: leave what it made
            if item.move_back:
                os.rename(item.path, item.move_back)
            else:
                if item.write_back:
                    mirror(item.path, item.write_back)
                _rootfs.remove_tree(item.path)
            if item.aside is not None and self._still_aside(item):
                os.rename(item.aside, item.path)
        for d in reversed(self.made_dirs):
            try:
                os.rmdir(d)  # the command may have put files there: then it stays
            except OSError:
                pass
        for d, (atime, mtime) in self.times.items():
            if d in untouched:
                try:
                    os.utime(d, ns=(atime, mtime), follow_symlinks=False)
                except OSError:
                    pass

    def undo_reported(self, report_fd: int) -> bool:
        """`undo`; False, with the reason reported on `report_fd`, when it fails."""
        try:
            self.undo()
        except OSError as err:
            _inside.report(report_fd, f"take the mounts back out of the root: {_inside._describe(err)}")
            return False
        return True

    def _still(self, rel: str, path: str, ino: tuple[int, int]) -> bool:
        try:
            if _rootfs.resolve_in_dir(self.root, rel) != rel:
                return False
            st = os.lstat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == ino

    def _still_aside(self, item: _Staged) -> bool:
        assert item.aside is not None
        rel = os.path.relpath(item.aside, self.root)
        return self._still(rel, item.aside, item.aside_ino) and not os.path.lexists(item.path)


def _mtime(path: str) -> int:
    try:
        return os.lstat(path).st_mtime_ns
    except OSError:
        return -1


def _copy_tree(src: str, dest: str) -> None:
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dest, 0o700)
        with os.scandir(src) as it:
            names = sorted(e.name for e in it)
        for name in names:
            _copy_tree(os.path.join(src, name), os.path.join(dest, name))
    elif stat.S_ISSOCK(st.st_mode):
        # A listening socket (RUN --mount=type=ssh's relay): a copy would be a new, dead one;
        # a hard link is the same socket, with its owner and mode.
        os.link(src, dest)
        return
    else:
        _rootfs.copy_node(src, dest, st)
    _rootfs.copy_meta(src, dest, st)


def mirror(src: str, dest: str) -> None:
    """Make `dest` what `src` is now (a writable bind's copy back onto its source), following no link.

    Unchanged files (same type, size, mtime, mode and owner as the copy was
    made with) are left alone; the rest are replaced, and what the copy no
    longer has is removed.
    """
    st = os.lstat(src)
    try:
        dst: os.stat_result | None = os.lstat(dest)
    except FileNotFoundError:
        dst = None
    if dst is not None and stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(dst.st_mode):
        with os.scandir(src) as it:
            names = {e.name for e in it}
        with os.scandir(dest) as it:
            gone = [e.path for e in it if e.name not in names]
        for path in gone:
            _rootfs.remove_tree(path)
        for name in sorted(names):
            mirror(os.path.join(src, name), os.path.join(dest, name))
        _rootfs.copy_meta(src, dest, st)
        return
    same = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid)
    if (
        dst is not None
        and not stat.S_ISDIR(st.st_mode)
        and same
        == (stat.S_IFMT(dst.st_mode), dst.st_size, dst.st_mtime_ns, dst.st_mode, dst.st_uid, dst.st_gid)
    ):
        return
    if dst is not None:
        _rootfs.remove_tree(dest)
    _copy_tree(src, dest)


def _make_dev(path: str) -> None:
    os.mkdir(path, 0o755)
    for name, major, minor in _DEV_NODES:
        os.mknod(os.path.join(path, name), stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(os.path.join(path, name), 0o666)
    for name, target in _inside._DEV_LINKS:
        os.symlink(target, os.path.join(path, name))
    os.mkdir(os.path.join(path, "pts"), 0o755)
    os.mkdir(os.path.join(path, "shm"))
    os.chmod(os.path.join(path, "shm"), 0o1777)


def _stage_all(spec: dict, stage: Stage) -> None:
    stage.place("/dev", _make_dev)
    for rel, source in spec["host_binds"]:
        stage.place("/" + rel, lambda p, s=source: _copy_file(s, p, 0o644, 0, 0))
    for m in spec["mounts"]:
        target, kind = "/" + m["target"], m["kind"]
        if kind == "tmpfs":
            stage.place(target, lambda p: os.mkdir(p, 0o755))
        elif kind == "bind":
            writable = not m["readonly"] and not m["discard"]
            stage.place(
                target, lambda p, s=m["source"]: _copy_tree(s, p), write_back=m["source"] if writable else ""
            )
        elif kind == "secret":
            stage.place(target, lambda p, m=m: _copy_file(m["source"], p, m["mode"], m["uid"], m["gid"]))
        elif kind == "cache":
            source = m["source"]
            if m["fresh"]:
                os.chown(source, m["uid"], m["gid"])
                os.chmod(source, m["mode"])
            stage.place(target, lambda p, s=source: os.rename(s, p), move_back=source)
        else:
            raise _inside.SetupError(f"unknown mount type {kind!r}")


def _copy_file(source: str, dest: str, mode: int, uid: int, gid: int) -> None:
    with open(source, "rb") as src:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            while chunk := src.read(1 << 20):
                os.write(fd, chunk)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _has_cap(bit: int) -> bool:
    with open("/proc/self/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def run(spec: dict, report_fd: int) -> int:
    """The "run" mode without namespaces: copy, stage, chroot and run, kill leftovers, compare."""
    from lamina.engine import snapshot

    root = spec["rootfs"]
    stage = Stage(root)
    try:
        _rootfs.merge_copy(spec["lowers"], root)
        baseline = snapshot.record(root, spec["lowers"])
        seccomp = None if spec["insecure"] else _confine.Filter(no_new_privs=not _has_cap(_CAP_SYS_ADMIN))
    except OSError as err:
        _inside.report(report_fd, f"prepare the sandbox root: {_inside._describe(err)}")
        return _inside.SETUP_FAILED
    code = _inside.SETUP_FAILED
    try:
        try:
            _stage_all(spec, stage)
        except (OSError, _inside.SetupError) as err:
            _inside.report(report_fd, f"set up the sandbox: {_inside._describe(err)}")
            return _inside.SETUP_FAILED
        stage.settle()
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
        child = os.fork()
        if child == 0:
            try:
                _command(spec, report_fd, seccomp)
            finally:
                os._exit(_inside.EXEC_FAILED)
        _inside.forward_signals(child)
        _, status = os.waitpid(child, 0)
        code = _inside.exit_code(status)
        _kill_leftovers()
    finally:
        if not stage.undo_reported(report_fd):
            code = _inside.SETUP_FAILED
    return write_diff(baseline, root, spec["upper"], report_fd, code, {})  # real root makes no records


def write_diff(
    baseline: Baseline,
    root: str,
    upper: str,
    report_fd: int,
    code: int,
    made: _forged.Made | None = None,
    copies: bool = False,
) -> int:
    """What the step changed in the copied `root` written to `upper` (snapshot.write_diff):
    the step's `code`, or SETUP_FAILED (the reason reported) when that fails or a step that
    succeeded left a `user.lamina.*` record lamina did not make (`made`; None: every record
    is the step's own; with `copies`, a lower layer's file's record on a copy of it is kept,
    sandbox._forged)."""
    from lamina.engine import snapshot

    try:
        snapshot.write_diff(baseline, root, upper)
        forged = None
        if code == 0 and made is not None:
            before = baseline.facts if copies else None
            forged = _forged.first_forged(upper, list(baseline.lowers), made, root, before)
    except Exception as err:  # reported, not a traceback: the caller raises SandboxError
        _inside.report(report_fd, f"compare the copied rootfs: {_inside._describe(err)}")
        return _inside.SETUP_FAILED
    if forged is not None:
        _inside.report(report_fd, forged)
        return _inside.SETUP_FAILED
    return code


def _children() -> list[int]:
    me = str(os.getpid())
    kids = []
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children") as f:
                kids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return kids


def _kill_leftovers() -> None:
    """Kill and reap what the command left running: orphans come to us, the subreaper."""
    while True:
        kids = _children()
        for pid in kids:
            try:
                os.kill(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while True:
                os.waitpid(-1, 0)
        except ChildProcessError:
            pass
        if not kids and not _children():
            return


def _command(spec: dict, report_fd: int, seccomp: _confine.Filter | None) -> None:
    """In the forked child: chroot, user, confinement, exec. Returns only on failure."""
    try:
        _inside._default_signals()
        os.setsid()
        os.umask(0o022)  # runc's
        _inside.set_ulimits(spec)
        os.chroot(spec["rootfs"])
        os.chdir("/")
        uid, gid, groups, home = _inside.resolve_user(spec["user"])
        cwd = spec["cwd"] or "/"
        os.makedirs(cwd, exist_ok=True)
        if seccomp is not None:
            # CAP_SYS_CHROOT too: root holding it walks out of a chroot.
            _confine.drop_bounding_set(_confine.DEFAULT_CAP_MASK & ~(1 << _CAP_SYS_CHROOT))
            seccomp.load()
        _inside._become(spec, uid, gid, groups)
        os.chdir(cwd)
    except (OSError, _inside.SetupError) as err:
        _inside.report(report_fd, f"set up the sandbox: {_inside._describe(err)}")
        os._exit(_inside.SETUP_FAILED)
    env = dict(kv.split("=", 1) for kv in spec["env"])
    env.setdefault("PATH", _inside._DEFAULT_PATH)
    env.setdefault("HOME", home)
    env.setdefault("HOSTNAME", spec["hostname"])
    argv = spec["argv"]
    try:
        _inside._exec(argv, env)
    except OSError as err:
        if isinstance(err, FileNotFoundError) and "/" not in argv[0]:
            why = "executable file not found in $PATH"
        else:
            why = err.strerror or str(err)
        _inside.report(report_fd, f'exec "{argv[0]}": {why}')
        os._exit(_inside.EXEC_FAILED if isinstance(err, FileNotFoundError) else 126)
