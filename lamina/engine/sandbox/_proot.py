"""proot isolation (helper side): a RUN step for a plain uid where no namespace can be made.

For `docker run --user 1000` under Docker's default seccomp profile, or a
host with `user.max_user_namespaces=0`: nothing can be mounted, chrooted or
chowned. The step runs under Debian's proot (ptrace path translation) over
a copy of its root filesystem, and the layer is the copy snapshotter's
compare, as in chroot isolation (`_chroot.Stage` stages /dev, resolv.conf,
hosts, tmpfs and secrets into the copy and takes them out again before the
compare; bind and cache mounts are proot binds, so their writes reach the
source).

proot's own fake root (`-0`) is not used: it rewrites chown(0) into a chown
to the caller's uid, so a chown to that uid could not be told from one to
root. Instead the helper installs a seccomp filter that hands the step's
get*id, set*id, stat, chown, fchown, lchown, fchownat, mknod(at) and
exit_group calls to this process (SECCOMP_RET_USER_NOTIF; proot, in ptrace mode on
kernels since 4.8, has already translated the path):
- get*id answer the step's USER (root unless USER says otherwise), and
  stat, lstat, fstat, newfstatat and statx are run here and show the owner
  the layer will have (so `cp -a` and `tar` copy root's files as root's);
- a chown is recorded in the file's `user.lamina.owner` xattr
  (`lamina.oci.recorded`), a device node becomes a placeholder file, and a
  file the step made gets the step's USER as owner;
- exit_group of the command's process gives the step's exit code; what it
  leaves running is killed then (proot 5.1 would wait for it).
What cannot be recorded (the owner of a symlink, a process switching to
another uid, a 32-bit system call) fails the step with one line.

Helper-side: the stdlib only, plus `socket` and `select` here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import stat
import struct

from lamina.engine.sandbox import _chroot, _confine, _forged, _inside, _libc, _notify, _permitted, _rootfs
from lamina.oci import recorded

_PR_SET_CHILD_SUBREAPER = 36
_AT_FDCWD = _notify.AT_FDCWD
_AT_SYMLINK_NOFOLLOW = _notify.AT_SYMLINK_NOFOLLOW
_AT_EMPTY_PATH = _notify.AT_EMPTY_PATH
_UNCHANGED = 0xFFFFFFFF  # (uid_t)-1
_ARCHES = _notify.ARCHES
_DEV_HOST = ("null", "zero", "full", "random", "urandom", "tty")
# Where struct stat keeps st_ino, st_uid and st_gid (kernel layout), and its size; statx's are common.
_STAT_LAYOUT = {"x86_64": (8, 28, 32, 144), "aarch64": (8, 24, 28, 128)}
_STATX_LAYOUT = (32, 20, 24, 256)


class _Failed(Exception):
    pass


class _Answer(Exception):  # not an error: the value a call returns
    def __init__(self, value: int) -> None:
        self.value = value


def run(spec: dict, report_fd: int) -> int:
    """The "run" mode under proot: copy, stage, run with chown recorded, kill leftovers, compare."""
    from lamina.engine import snapshot

    root = spec["rootfs"]
    machine = os.uname().machine
    if machine not in _ARCHES:
        _inside.report(report_fd, f"proot isolation: not supported on {machine} (x86_64 and aarch64 only)")
        return _inside.SETUP_FAILED
    stage = _chroot.Stage(root)
    try:
        _rootfs.merge_copy(spec["lowers"], root)
        baseline = snapshot.record(root, spec["lowers"])
        uid, gid, groups, home = _inside.resolve_user(spec["user"], root)
        cwd = spec["cwd"] or "/"
        workdir = _rootfs.resolve_in_dir(root, cwd).strip("/")
        parts = workdir.split("/") if workdir else []
        # A WORKDIR a step removed is made again by lamina, as root's (as runc makes it).
        paths = ("/".join(parts[: i + 1]) for i in range(len(parts)))
        lamina_made = [p for p in paths if not os.path.lexists(os.path.join(root, p))]
        os.makedirs(os.path.join(root, workdir), exist_ok=True)
        seccomp = None if spec["insecure"] else _confine.Filter(no_new_privs=True)
    except (OSError, _inside.SetupError) as err:
        _inside.report(report_fd, f"prepare the sandbox root: {_inside._describe(err)}")
        return _inside.SETUP_FAILED
    # inode -> file type before the step; an inode number reused for another type is a new file
    known = {facts[1]: stat.S_IFMT(facts[0]) for facts in baseline.facts.values()}
    known.update((os.lstat(os.path.join(root, p)).st_ino, stat.S_IFDIR) for p in lamina_made)
    code = _inside.SETUP_FAILED
    failures: list[str] = []
    made: _forged.Made = {}  # the records the supervisor set, by inode
    try:
        try:
            binds = _stage_all(spec, stage)
        except (OSError, _inside.SetupError) as err:
            _inside.report(report_fd, f"set up the sandbox: {_inside._describe(err)}")
            return _inside.SETUP_FAILED
        stage.settle()
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
        argv = _proot_argv(spec, root, cwd, uid, gid, binds)
        env = _step_env(spec, home)
        steering = sorted(k for k in env if k.startswith("PROOT_"))
        if steering:
            # proot reads these itself (PROOT_ASSUME_NEW_SECCOMP would hand it chown untranslated)
            _inside.report(
                report_fd, f"proot isolation: the step's environment sets {steering[0]}, which proot reads"
            )
            return _inside.SETUP_FAILED
        child, ours = _start_command(argv, env, seccomp, report_fd)
        _inside.forward_signals(child)
        supervisor = _Supervisor(root, known, (uid, gid), failures, made)
        code = supervisor.serve(ours, child)
        _chroot._kill_leftovers()
    finally:
        if not stage.undo_reported(report_fd):
            code = _inside.SETUP_FAILED
    if (uid, gid) != (0, 0) and not failures:
        _own_new_files(root, known, (uid, gid), failures, made)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        _inside.report(report_fd, f"{failures[0]}{more}, which proot isolation cannot record in the layer")
        return _inside.SETUP_FAILED
    # A step's records must be the supervisor's (chown, mknod) or the lower layers'; a root
    # step's may also be copies of a lower layer's file (cp -a), not of a mount's (sandbox._forged).
    code = _chroot.write_diff(baseline, root, spec["upper"], report_fd, code, made, copies=uid == 0)
    if code != 0 or uid == 0:
        return code
    # Every file on disk is the caller's: what the kernel let USER change, root's files
    # included, is checked now against what that user may change (sandbox._permitted).
    try:
        refused = _permitted.first_refused(
            spec["upper"], baseline.facts, root, spec["lowers"], (uid, gid, groups), lamina_made
        )
    except OSError as err:
        _inside.report(report_fd, f"check what the step changed: {_inside._describe(err)}")
        return _inside.SETUP_FAILED
    if refused is not None:
        _inside.report(report_fd, refused)
        return _inside.SETUP_FAILED
    return code


def _step_env(spec: dict, home: str) -> dict[str, str]:
    """The step's environment, with PATH, HOME and HOSTNAME defaulted."""
    env = dict(kv.split("=", 1) for kv in spec["env"])
    env.setdefault("PATH", _inside._DEFAULT_PATH)
    env.setdefault("HOME", home)
    env.setdefault("HOSTNAME", spec["hostname"])
    return env


def _start_command(
    argv: list[str], env: dict[str, str], seccomp: _confine.Filter | None, report_fd: int
) -> tuple[int, socket.socket]:
    """Fork the child that execs proot; (its pid, our end of the socket it sends the filter's listener on)."""
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        ours.close()
        try:
            _command(argv, env, theirs, seccomp, report_fd)
        finally:
            os._exit(_inside.EXEC_FAILED)
    theirs.close()
    return child, ours


def _stage_all(spec: dict, stage: _chroot.Stage) -> list[tuple[str, str]]:
    """Stage what chroot isolation stages; return the proot binds (host path, guest path)."""
    binds: list[tuple[str, str]] = []

    def dev(path: str) -> None:
        os.mkdir(path, 0o755)
        for name in _DEV_HOST:
            fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            os.close(fd)
            if os.path.exists("/dev/" + name):
                binds.append(("/dev/" + name, "/dev/" + name))
        for name, target in _inside._DEV_LINKS:
            os.symlink(target, os.path.join(path, name))
        os.mkdir(os.path.join(path, "pts"), 0o755)
        os.mkdir(os.path.join(path, "shm"))
        os.chmod(os.path.join(path, "shm"), 0o1777)

    stage.place("/dev", dev)
    apt = os.path.join(stage.root, os.path.dirname(_inside.APT_SNIPPET))
    if spec["apt_snippet"] and os.path.isdir(apt) and not os.path.islink(apt):
        # apt drops to user _apt, which proot isolation cannot follow: APT::Sandbox::User "root"
        stage.place("/" + _inside.APT_SNIPPET, lambda p: _copy_secret(spec["apt_snippet"], p, 0o644))
    for rel, source in spec["host_binds"]:
        stage.place("/" + rel, lambda p, s=source: _copy_secret(s, p, 0o644))
    for m in spec["mounts"]:
        target, kind = "/" + m["target"], m["kind"]
        if kind == "tmpfs":
            stage.place(target, lambda p: os.mkdir(p, 0o755))
        elif kind == "bind" and (m["readonly"] or m["discard"]):
            stage.place(target, lambda p, s=m["source"]: _chroot._copy_tree(s, p))  # writes dropped
        elif kind in ("bind", "cache"):
            source = m["source"]
            if kind == "cache" and m["fresh"]:
                os.chmod(source, m["mode"])
            is_dir = os.path.isdir(source)
            path = stage.place(
                target,
                lambda p, d=is_dir: (
                    os.mkdir(p, 0o755)
                    if d
                    else os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                ),
            )
            binds.append((source, "/" + os.path.relpath(path, stage.root)))
        elif kind == "secret":
            stage.place(target, lambda p, m=m: _copy_secret(m["source"], p, m["mode"]))
        else:
            raise _inside.SetupError(f"unknown mount type {kind!r}")
    return binds


def _copy_secret(source: str, dest: str, mode: int) -> None:
    with open(source, "rb") as src:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            while chunk := src.read(1 << 20):
                os.write(fd, chunk)
            os.fchmod(fd, mode | 0o400)  # the step is this uid, shown as its USER: it must read it
        finally:
            os.close(fd)


def _proot_argv(
    spec: dict, root: str, cwd: str, uid: int, gid: int, binds: list[tuple[str, str]]
) -> list[str]:
    argv = [spec["proot"], "-v", "-1", "-r", root, "-w", cwd]
    if spec.get("proot_qemu"):  # another platform's programs, each through qemu (sandbox.emulation)
        argv += ["-q", spec["proot_qemu"]]
    if os.path.isdir("/proc"):
        argv += ["-b", "/proc"]
    for host, guest in binds:
        argv += ["-b", f"{host}:{guest}"]
    return argv + list(spec["argv"])


def _command(
    argv: list[str], env: dict[str, str], sock: socket.socket, seccomp: object, report_fd: int
) -> None:
    """In the forked child: the recording filter (its listener to the parent), confinement, exec proot."""
    try:
        _inside._default_signals()
        os.setsid()
        os.umask(0o022)  # runc's
        listener = _install_filter()
        socket.send_fds(sock, [b"L"], [listener])
        os.close(listener)
        sock.close()
        if seccomp is not None:
            seccomp.load()  # type: ignore[attr-defined]
    except OSError as err:
        _inside.report(report_fd, f"set up the sandbox: {_inside._describe(err)}")
        os._exit(_inside.SETUP_FAILED)
    try:
        os.execve(argv[0], argv, env)  # proot passes its environment on to the command
    except OSError as err:
        _inside.report(report_fd, f"exec {argv[0]}: {err.strerror}")
        os._exit(_inside.EXEC_FAILED)


def _install_filter() -> int:
    """Load the filter that hands chown, device mknod and set*id to our listener; return its fd."""
    names = tuple(_ARCHES[os.uname().machine][2])
    return _notify.install_filter(names, foreign_notified=True, no_new_privs=True)


class _Supervisor:
    """Answers the step's chown, mknod and set*id calls, recording owners in xattrs."""

    def __init__(
        self,
        root: str,
        known: dict[int, int],
        owner: tuple[int, int],
        failures: list[str],
        made: _forged.Made,
    ) -> None:
        self.root = root.rstrip("/")
        self.made = made
        self.known = known  # inodes of the root before the step: the rest default to its USER
        self.owner = owner
        self.failures = failures
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.real = (os.getuid(), os.getgid())
        self.proot = -1  # proot's pid: its own calls are let through untouched
        self.channel: _notify.Listener | None = None
        numbers = _ARCHES[os.uname().machine][2]
        self.nr_fstatat, self.nr_statx = numbers["newfstatat"], numbers["statx"]
        self.main = -1  # the command's process (proot's first child): its exit ends the step
        self.code = -1  # its exit code, once it called exit_group

    def serve(self, sock: socket.socket, child: int) -> int:
        """Answer notifications until proot exits; the step's code is its first process's.

        proot (5.1) waits for every traced process and exits with the last
        one's status; as in a PID namespace, what the command leaves running
        is killed once the command itself exits.
        """
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        sock.close()
        listener = fds[0] if fds else -1
        pidfd = os.pidfd_open(child)
        self.proot = child
        main_fd = -1
        try:
            poll = select.poll()
            poll.register(pidfd, select.POLLIN)
            if listener >= 0:
                poll.register(listener, select.POLLIN)
            while True:
                if self.main < 0:
                    self.main = _first_child(child)
                    if self.main > 0:
                        main_fd = os.pidfd_open(self.main)
                        poll.register(main_fd, select.POLLIN)
                ready = dict(poll.poll(10 if self.main < 0 else -1))
                if listener in ready:
                    if ready[listener] & select.POLLIN:
                        self._one(listener)
                    else:
                        poll.unregister(listener)  # every filtered process is gone
                if main_fd in ready:
                    poll.unregister(main_fd)
                    if self.code < 0:
                        self.code = _zombie_code(self.main)
                    _kill_tree(child, self.main)
                if pidfd in ready:
                    _, status = os.waitpid(child, 0)
                    return self.code if self.code >= 0 else _inside.exit_code(status)
        finally:
            for fd in (pidfd, main_fd, listener):
                if fd >= 0:
                    os.close(fd)

    def _one(self, listener: int) -> None:
        if self.channel is None:
            self.channel = _notify.Listener(listener)
        channel = self.channel
        call = channel.receive()
        if call is None:
            return  # the caller died (ENOENT) or an interrupt: nothing to answer
        if call.pid == self.proot:
            # proot's own calls (it stats every path it translates): the filter is
            # inherited by proot too; they run as they are, the cheapest answer there is.
            channel.answer(call.nid, cont=True)
            return
        error, cont, value = 0, False, 0
        try:
            if call.arch != channel.arch:
                self._fail("a 32-bit system call")
                cont = True
            else:
                error, cont = self._handle(call.name, call.pid, call.args, call.nid, listener)
        except _Answer as answer:
            value = answer.value
        except _Failed:
            error = errno.EPERM
        except OSError as err:
            error = err.errno or errno.EPERM
        channel.answer(call.nid, value, error, cont)

    def _fail(self, what: str) -> None:
        if what not in self.failures:
            self.failures.append(what)

    def _handle(
        self, name: str, pid: int, args: tuple[int, ...], nid: int, listener: int
    ) -> tuple[int, bool]:
        """(errno to answer, 0 for success; whether the kernel runs the call itself)."""
        if name == "exit_group":
            if pid == self.main:
                self.code = args[0] & 0xFF
            return 0, True
        if name in ("stat", "fstat", "lstat", "newfstatat", "statx"):
            return self._stat(name, pid, args, nid, listener)
        if name.startswith("get"):
            return self._get_ids(name, pid, args, nid, listener)
        if name == "setgroups":
            return 0, False  # as root's would; supplementary groups own no files
        if name.startswith("set"):
            self._identity(name, args)
            if name.startswith("setfs"):
                raise _Answer(self.owner[0] if name == "setfsuid" else self.owner[1])
            return 0, False
        if name in _notify.MKNOD_CALLS:
            dirfd, path_arg, mode, dev = _notify.mknod_args(_notify.Call(nid, pid, 0, 0, args, name))
            if stat.S_IFMT(mode) not in (stat.S_IFCHR, stat.S_IFBLK):
                return 0, True
            if self.owner[0] != 0:
                return errno.EPERM, False  # a USER other than root has no CAP_MKNOD
            path = self._path(pid, dirfd, path_arg, 0)
            self._valid(listener, nid)
            if not self._inside(path):
                return errno.EPERM, False
            if os.path.lexists(path):
                return errno.EEXIST, False
            _notify.record_device(path, mode, dev, _notify.umask(pid))
            _forged.note_path(self.made, path, recorded.RDEV_XATTR)
            return 0, False
        if name == "fchown":
            path, follow, uid, gid = f"/proc/{pid}/fd/{args[0]}", True, args[1], args[2]
            path = os.readlink(path)
        elif name in ("chown", "lchown"):
            follow = name == "chown"
            path, uid, gid = self._path(pid, _AT_FDCWD, args[0], 0), args[1], args[2]
        else:  # fchownat
            flags = args[4]
            follow = not flags & _AT_SYMLINK_NOFOLLOW
            path, uid, gid = self._path(pid, _notify.signed(args[0]), args[1], flags), args[2], args[3]
        self._valid(listener, nid)
        self._chown(path, follow, uid & 0xFFFFFFFF, gid & 0xFFFFFFFF)
        return 0, False

    def _stat(self, name: str, pid: int, args: tuple[int, ...], nid: int, listener: int) -> tuple[int, bool]:
        """Run the stat ourselves and show the owners the layer will have (recorded, else
        root's for what the image had, else the step USER's), as real root would see them."""
        follow = True
        if name == "fstat":
            target, buf = f"/proc/{pid}/fd/{_notify.signed(args[0])}", args[1]
        elif name in ("stat", "lstat"):
            target, buf, follow = self._path(pid, _AT_FDCWD, args[0], 0), args[1], name == "stat"
        else:
            flags = args[2] if name == "statx" else args[3]
            buf = args[4] if name == "statx" else args[2]
            follow = not flags & _AT_SYMLINK_NOFOLLOW
            text = _notify.read_string(pid, args[1])
            if not text and flags & _AT_EMPTY_PATH:
                target, follow = _notify.fd_path(pid, _notify.signed(args[0])), True
            else:
                target = self._path(pid, _notify.signed(args[0]), args[1], 0)
        self._valid(listener, nid)
        path = target.encode("utf-8", "surrogateescape")
        at = 0 if follow else _AT_SYMLINK_NOFOLLOW
        if name == "statx":
            ino_at, uid_at, gid_at, size = _STATX_LAYOUT
            out = ctypes.create_string_buffer(size)
            mask = args[3] & 0xFFFFFFFF
            done = self.libc.syscall(self.nr_statx, _AT_FDCWD, path, at | (args[2] & 0x6000), mask, out)
        else:
            ino_at, uid_at, gid_at, size = _STAT_LAYOUT[os.uname().machine]
            out = ctypes.create_string_buffer(size)
            done = self.libc.syscall(self.nr_fstatat, _AT_FDCWD, path, out, at)
        if done != 0:
            return ctypes.get_errno() or errno.EIO, False
        raw = bytearray(out.raw)
        ino = struct.unpack_from("=Q", raw, ino_at)[0]
        uid, gid = struct.unpack_from("=I", raw, uid_at)[0], struct.unpack_from("=I", raw, gid_at)[0]
        shown = self._shown(target, follow, ino, uid, gid)
        struct.pack_into("=I", raw, uid_at, shown[0])
        struct.pack_into("=I", raw, gid_at, shown[1])
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(fd, bytes(raw), buf)
        finally:
            os.close(fd)
        return 0, False

    def _shown(self, target: str, follow: bool, ino: int, uid: int, gid: int) -> tuple[int, int]:
        try:
            found = recorded.parse_owner(os.getxattr(target, recorded.OWNER_XATTR, follow_symlinks=follow))
            if found is not None:
                return found
        except OSError:
            pass
        if uid != self.real[0] and gid != self.real[1]:
            return uid, gid  # not this process's file: shown as it is
        default = (0, 0) if ino in self.known else self.owner
        return (default[0] if uid == self.real[0] else uid, default[1] if gid == self.real[1] else gid)

    def _get_ids(
        self, name: str, pid: int, args: tuple[int, ...], nid: int, listener: int
    ) -> tuple[int, bool]:
        """The step's USER as its real, effective and saved ids (proot's fake root, our way)."""
        value = self.owner[0] if "uid" in name else self.owner[1]
        if not name.startswith("getres"):
            raise _Answer(value)
        self._valid(listener, nid)
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            for address in args[:3]:
                os.pwrite(fd, struct.pack("=I", value), address)
        finally:
            os.close(fd)
        return 0, False

    def _identity(self, name: str, args: tuple[int, ...]) -> None:
        count = {"setreuid": 2, "setregid": 2, "setresuid": 3, "setresgid": 3}.get(name, 1)
        wanted = {a & 0xFFFFFFFF for a in args[:count]} - {_UNCHANGED}
        mine = self.owner[0] if "uid" in name else self.owner[1]
        for value in sorted(wanted - {mine}):
            what = "user" if "uid" in name else "group"
            self._fail(
                f"the step switches to {what} id {value} ({name}): files it makes would get the wrong owner"
            )

    def _path(self, pid: int, dirfd: int, address: int, flags: int) -> str:
        text = _notify.read_string(pid, address)
        if not text and flags & _AT_EMPTY_PATH:
            return os.readlink(_notify.fd_path(pid, dirfd))
        if text.startswith("/"):
            return text
        base = os.readlink(_notify.fd_path(pid, dirfd))
        return os.path.join(base, text)

    def _valid(self, listener: int, nid: int) -> None:
        if self.channel is None or not self.channel.valid(nid):
            raise _Failed  # the caller is gone: what was read may be another process's

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")

    def _chown(self, path: str, follow: bool, uid: int, gid: int) -> None:
        if not self._inside(path):
            if not os.path.lexists(path):
                raise FileNotFoundError(errno.ENOENT, "no such file")
            return  # a cache or bind mount: not in the layer
        if follow and os.path.islink(path):
            rel = os.path.relpath(path, self.root)
            path = os.path.join(self.root, _rootfs.resolve_in_dir(self.root, rel))
        st = os.lstat(path)  # FileNotFoundError: ENOENT, as chown would say
        default = (0, 0) if _was_there(self.known, st) else self.owner
        old = recorded.owner_of(path, default)
        new = (old[0] if uid == _UNCHANGED else uid, old[1] if gid == _UNCHANGED else gid)
        if (uid, gid) == (_UNCHANGED, _UNCHANGED):
            return
        if self.owner[0] != 0 and (
            old[0] != self.owner[0] or new[0] != old[0] or new[1] not in (old[1], self.owner[1])
        ):
            # as the kernel: without CAP_CHOWN only the owner changes a file's group, to its own
            raise OSError(errno.EPERM, "chown without CAP_CHOWN")
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode) and mode & (stat.S_ISUID | stat.S_ISGID):
            # chown clears setuid, and setgid of a group-executable file, as the kernel does
            kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
            os.chmod(path, mode & ~kill)
        try:
            recorded.set_owner(path, *new)
            _forged.note_path(self.made, path, recorded.OWNER_XATTR)
        except recorded.CannotRecord:
            if new != old:
                rel = os.path.relpath(path, self.root)
                self._fail(f"chown {new[0]}:{new[1]} of the symlink or special file /{rel}")


def _was_there(known: dict[int, int], st: os.stat_result) -> bool:
    return known.get(st.st_ino) == stat.S_IFMT(st.st_mode)


def _own_new_files(
    root: str, known: dict[int, int], owner: tuple[int, int], failures: list[str], made: _forged.Made
) -> None:
    """Files the step made as its (non-root) USER are that user's, unless it chowned them."""
    todo = [root]
    while todo:
        current = todo.pop()
        with os.scandir(current) as it:
            entries = list(it)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                todo.append(entry.path)
            if _was_there(known, st):
                continue
            try:
                os.getxattr(entry.path, recorded.OWNER_XATTR, follow_symlinks=False)
                continue  # chowned by the step
            except OSError:
                pass
            try:
                recorded.set_owner(entry.path, *owner)
                _forged.note_path(made, entry.path, recorded.OWNER_XATTR)
            except recorded.CannotRecord:
                rel = os.path.relpath(entry.path, root)
                failures.append(f"/{rel} is a symlink or special file made as user {owner[0]}:{owner[1]}")
                return


def _first_child(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return -1
    return int(kids[0]) if kids else -1


def _zombie_code(pid: int) -> int:
    """The exit code of `pid` (not our child) from /proc while it is a zombie, else -1."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return _inside.exit_code(int(fields[-1]))
    except (OSError, ValueError, IndexError):
        return -1


def _kill_tree(top: int, spare: int) -> None:
    """SIGKILL every descendant of `top` but `spare` (and `top`): what the command left running."""
    todo, found = [top], []
    while todo:
        pid = todo.pop()
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                todo += kids
                found += kids
        except OSError:
            continue
    for pid in found:
        if pid != spare:
            try:  # noqa: SIM105 (contextlib is not imported helper-side)
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
