"""Inside the namespaces (helper side): the rootfs, PID 1, the command's mounts and user.

Process tree, all in the new user namespace:

    helper (unshared user/mount/pid/uts/ipc[/net]): hostname, loopback, the
    │   rootfs (overlay mount, or the copy and its baseline); once PID 1 is
    │   gone, the copy snapshotter's compare (it keeps the host view)
    └── init, PID 1 of the new PID namespace: its own mount namespace with
        │   /proc, /dev, /etc/resolv.conf, the spec's mounts, then pivot_root;
        │   reaps, forwards signals, kills what is left when the command exits
        └── command: user and groups, cwd, then exec

The spec is the plain dict made by `runner._wire()`. Failures before exec
are reported to the caller as one line on the report pipe (`E` + text).
"""

# Helper start-up is sandbox start-up: try/except/pass here instead of importing contextlib.
# ruff: noqa: SIM105

from __future__ import annotations

import _signal
import os
import stat

from lamina.engine.sandbox import _confine, _libc, _rootfs

TYPE_CHECKING = False  # typing is not imported helper-side; mypy reads the name as true
if TYPE_CHECKING:
    from types import ModuleType

    from lamina.engine.sandbox._notify import DeviceRecorder

SETUP_FAILED = 125
EXEC_FAILED = 127
_FORWARDED = (
    _signal.SIGINT,
    _signal.SIGTERM,
    _signal.SIGHUP,
    _signal.SIGQUIT,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
)
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APT_SNIPPET = "etc/apt/apt.conf.d/zz-lamina-sandbox-user"


class SetupError(Exception):
    """Setting up the sandbox failed; the message is for the user."""


def report(fd: int, message: str) -> None:
    try:
        os.write(fd, b"E" + message.encode(errors="replace") + b"\n")
    except OSError:
        pass


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def forward_signals(pid: int) -> None:
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in _FORWARDED:
        _signal.signal(signum, forward)


# --- the helper and PID 1 --------------------------------------------------------


def prepare(spec: dict) -> object | None:
    """In the helper: hostname, loopback, the rootfs; the copy baseline or None. Raises SetupError."""
    try:
        _libc.sethostname(spec["hostname"])
        if spec["network"] != "host":
            _loopback_up()
        return _prepare_root(spec)
    except OSError as err:
        raise SetupError(f"prepare the sandbox root: {_describe(err)}") from err


def finish(spec: dict, baseline: object | None, made: bytes | None = None) -> None:
    """In the helper, once PID 1 is gone: the copy snapshotter's compare; then no record in the
    upper dir that lamina did not make (`made`: PID 1's placeholders, as `_forged.load` reads; None:
    the step failed, its layer is thrown away)."""
    if baseline is not None:
        try:
            from lamina.engine import snapshot

            snapshot.write_diff(baseline, spec["rootfs"], spec["upper"])  # type: ignore[arg-type]
        except Exception as err:  # reported, not a traceback: the caller raises SandboxError
            raise SetupError(f"compare the copied rootfs: {_describe(err)}") from err
    if made is None or spec["single_id"]:
        return  # only root is mapped: every process of the step may make what a record stands for
    from lamina.engine.sandbox import _forged

    ran_on = spec["rootfs"] if baseline is not None else None
    try:
        forged = _forged.first_forged(spec["upper"], spec["lowers"], _forged.load(made), ran_on)
    except OSError as err:
        raise SetupError(f"check the step's records: {_describe(err)}") from err
    if forged is not None:
        raise SetupError(forged)


def init(spec: dict, report_fd: int) -> int:
    """PID 1 of the new PID namespace: enter the rootfs, start the command, reap, return its code.

    PID 1 pivots into the rootfs too (in a mount namespace of its own, so the
    helper keeps the host view): a command may read /proc/1/root.
    """
    _libc.set_parent_death_signal(_signal.SIGKILL)
    devices = None
    try:
        _confine.hide_process("init")
        # Built while the host's libseccomp is still reachable; loaded by the command before exec.
        seccomp = None if spec["insecure"] else _confine.Filter()
        if spec.get("ulimits"):
            import resource  # noqa: F401  (for _command: the host's stdlib is gone after pivot_root)
        record = _records_devices(spec)
        if record:
            import select  # noqa: F401  (for _serve: imported while the host's stdlib is reachable)

            from lamina.engine.sandbox import _notify
        _enter_root(spec)
        if record:
            devices = _device_recorder(_notify, spec)
    except (OSError, SetupError) as err:
        report(report_fd, f"set up the sandbox: {_describe(err)}")
        return SETUP_FAILED
    child = os.fork()
    if child == 0:
        try:
            if devices is not None:
                os.close(devices.listener.fd)
            _command(spec, report_fd, seccomp)
        finally:
            os._exit(EXEC_FAILED)
    os.close(report_fd)  # the command has its own copy until exec; PID 1 holds nothing of the caller's
    forward_signals(child)
    status = _wait(child) if devices is None else _serve(child, devices)
    _kill_all()
    return exit_code(status)


def _records_devices(spec: dict) -> bool:
    """Whether PID 1 answers the step's device mknod: in a user namespace, which refuses it even
    to root (BuildKit's root makes the node); rootns's real root makes it itself. Not with
    --security=insecure, which has no seccomp filter at all (/proc/self/status says 0), as
    BuildKit's: there mknod stays refused."""
    from lamina.engine.sandbox import _notify

    return spec.get("isolation", "userns") == "userns" and not spec["insecure"] and _notify.supported()


def _device_recorder(notify: ModuleType, spec: dict) -> DeviceRecorder:
    """After pivot_root: the filter handing this process's descendants' mknod to it (only
    mknod: every other call never leaves the kernel), and the mounts a node may be made on."""
    mounts = []
    for path in ("/", "/dev"):
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mounts.append(notify.mount_id(fd))
        finally:
            os.close(fd)
    # PID 1 holds CAP_SYS_ADMIN in the namespace: no no_new_privs, so setuid programs still work.
    listener = notify.install_filter(notify.MKNOD_CALLS, foreign_notified=False, no_new_privs=False)
    return notify.DeviceRecorder(notify.Listener(listener), tuple(mounts), spec.get("made_fd", -1))


def _wait(child: int) -> int:
    """Reap every process until `child` exits; its wait status."""
    while True:
        pid, st = os.waitpid(-1, 0)
        if pid == child:
            return st


def _serve(child: int, devices: DeviceRecorder) -> int:
    """_wait, answering the step's device mknod meanwhile; SIGCHLD wakes the poll to reap."""
    import select

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    _signal.signal(_signal.SIGCHLD, lambda _signum, _frame: None)
    poll = select.poll()
    poll.register(wake_r, select.POLLIN)
    poll.register(devices.listener.fd, select.POLLIN)
    try:
        while True:
            while True:  # reap first: the child may be gone before the handler was set
                pid, st = os.waitpid(-1, os.WNOHANG)
                if pid == child:
                    return st
                if pid == 0:
                    break
            for fd, events in poll.poll():
                if fd == wake_r:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif events & select.POLLIN:
                    devices.serve_one()
                else:
                    poll.unregister(fd)  # every filtered process is gone
    finally:
        _signal.set_wakeup_fd(-1)
        for fd in (wake_r, wake_w, devices.listener.fd):
            os.close(fd)


def _kill_all() -> None:
    # PID 1 signalling -1 reaches every other process of its namespace.
    try:
        os.kill(-1, _signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = f" {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    return str(err)


def _loopback_up() -> None:
    import _socket
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        raw = fcntl.ioctl(sock.fileno(), siocgifflags, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", raw)[1]
        fcntl.ioctl(sock.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))
    finally:
        sock.close()


def _mount_targets(spec: dict) -> list[tuple[str, bool]]:
    """Every mount point the command's mounts need, as (root-relative path, is_dir)."""
    targets = [("proc", True), ("dev", True), ("sys", True)]
    for rel, _source in spec["host_binds"]:
        targets.append((rel, False))
    for m in spec["mounts"]:
        targets.append((m["target"], m["is_dir"]))
    return targets


def _prepare_root(spec: dict) -> object | None:
    """Mount (overlay) or build (copy) the rootfs at spec["rootfs"]; the copy baseline or None."""
    lowers = spec["lowers"]
    if spec["snapshotter"] == "overlay":
        stack = _rootfs.LayerStack(lowers)
        if spec["apt_snippet"]:
            hit = stack.find(os.path.dirname(APT_SNIPPET))
            if hit is not None and stat.S_ISDIR(hit[1].st_mode):
                spec["host_binds"].append((APT_SNIPPET, spec["apt_snippet"]))
        _rootfs.add_mountpoints(stack, spec["mountpoints"], _mount_targets(spec))
        for root in (spec["upper"], spec["mountpoints"]):
            _rootfs.set_root_meta(root)
        _rootfs.mount_overlay([spec["mountpoints"], *lowers], spec["upper"], spec["work"], spec["rootfs"])
        return None
    from lamina.engine import snapshot

    _rootfs.merge_copy(lowers, spec["rootfs"])
    if spec["apt_snippet"] and os.path.isdir(os.path.join(spec["rootfs"], os.path.dirname(APT_SNIPPET))):
        spec["host_binds"].append((APT_SNIPPET, spec["apt_snippet"]))
    stack = _rootfs.LayerStack([spec["rootfs"]])
    _rootfs.add_mountpoints(stack, spec["rootfs"], _mount_targets(spec))
    return snapshot.record(spec["rootfs"], lowers)


# --- PID 1's mounts, then the command ---------------------------------------------


def _enter_root(spec: dict) -> None:
    """Mounts and pivot_root, in a mount namespace of PID 1's own. Nothing can be imported after this."""
    _libc.unshare(_libc.CLONE_NEWNS)
    root = spec["rootfs"]
    if spec["snapshotter"] == "copy":
        _libc.mount(root, root, None, _libc.MS_BIND | _libc.MS_REC)
    _system_mounts(spec, root)
    for m in spec["mounts"]:
        _user_mount(m, root, spec["single_id"])
    os.chdir(root)
    _libc.pivot_root(".", ".")
    _libc.umount(".", _libc.MNT_DETACH)
    os.chdir("/")


def set_ulimits(spec: dict) -> None:
    """--ulimit, as runc's rlimits before exec (here and under chroot isolation)."""
    for number, soft, hard in spec.get("ulimits", ()):
        import resource

        try:
            resource.setrlimit(number, (soft, hard))
        except ValueError as err:  # Python's word for EPERM/EINVAL here
            raise SetupError(f"ulimit {number}={soft}:{hard}: {err}") from None


def _command(spec: dict, report_fd: int, seccomp: _confine.Filter | None) -> None:
    """Runs in PID 1's child: signals, user, cwd, confinement, exec. Returns only on failure."""
    try:
        _default_signals()
        os.umask(0o022)  # runc's
        set_ulimits(spec)
        uid, gid, groups, home = resolve_user(spec["user"])
        cwd = spec["cwd"] or "/"
        os.makedirs(cwd, exist_ok=True)
        if seccomp is not None:
            # Root keeps, after exec, exactly the bounding set; the filter
            # needs CAP_SYS_ADMIN to load, so it goes before the user switch.
            _confine.drop_bounding_set(_confine.DEFAULT_CAP_MASK)
            seccomp.load()
        _become(spec, uid, gid, groups)
        os.chdir(cwd)
    except (OSError, SetupError) as err:
        report(report_fd, f"set up the sandbox: {_describe(err)}")
        os._exit(SETUP_FAILED)
    env = dict(kv.split("=", 1) for kv in spec["env"])
    env.setdefault("PATH", _DEFAULT_PATH)
    env.setdefault("HOME", home)
    env.setdefault("HOSTNAME", spec["hostname"])
    argv = spec["argv"]
    try:
        _exec(argv, env)
    except OSError as err:
        if isinstance(err, FileNotFoundError) and "/" not in argv[0]:
            why = "executable file not found in $PATH"
        else:
            why = err.strerror or str(err)
        report(report_fd, f'exec "{argv[0]}": {why}')
        os._exit(EXEC_FAILED if isinstance(err, FileNotFoundError) else 126)


def _default_signals() -> None:
    """Every disposition default and nothing blocked, as runc starts a process.

    Python ignores SIGPIPE and SIGXFSZ; inherited, `yes | head -1` would never end.
    """
    for signum in range(1, _signal.NSIG):
        if signum in (_signal.SIGKILL, _signal.SIGSTOP):
            continue
        try:
            _signal.signal(signum, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # the C library's own real-time signals
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])


def _exec(argv: list[str], env: dict[str, str]) -> None:
    """execvpe without os.execvpe, which imports `warnings`: the host's stdlib is gone after pivot_root."""
    name = argv[0]
    if "/" in name:
        os.execve(name, argv, env)
    denied: OSError | None = None
    for directory in env["PATH"].split(":"):
        try:
            os.execve(os.path.join(directory or ".", name), argv, env)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as err:
            denied = err
    raise denied or FileNotFoundError(2, "No such file or directory", name)


def _at(root: str, target: str, is_dir: bool) -> str:
    """The host path for `target` inside `root`, symlinks resolved inside root, created if missing."""
    path = os.path.join(root, _rootfs.resolve_in_dir(root, target))
    if not os.path.lexists(path):
        if is_dir:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    return path


def _system_mounts(spec: dict, root: str) -> None:
    m = _libc
    m.mount("proc", _at(root, "proc", True), "proc", m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC)
    if spec.get("binfmt"):
        _private_binfmt(root + "/proc/sys/fs/binfmt_misc", spec["binfmt"])
    if not spec["insecure"]:
        _hide_kernel_paths(root, _confine.READONLY_PATHS, _confine.MASKED_PATHS, "/proc/")
    dev = _at(root, "dev", True)
    m.mount("tmpfs", dev, "tmpfs", m.MS_NOSUID | m.MS_STRICTATIME, "mode=755,size=65536k")
    for name in _DEV_NODES:
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY, 0o666))
        # Read-only binds: the host's own nodes, which a step's root could otherwise chmod,
        # chown or touch for the host (identity-mapped, as root); reads and writes still work.
        _bind("/dev/" + name, node, readonly=True)
    for name, target in _DEV_LINKS:
        os.symlink(target, os.path.join(dev, name))
    if spec["insecure"]:
        _host_devices(dev)
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    os.chmod(os.path.join(dev, "shm"), 0o1777)
    pts = os.path.join(dev, "pts")
    try:
        m.mount(
            "devpts", pts, "devpts", m.MS_NOSUID | m.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620,gid=5"
        )
    except OSError:
        # gid 5 (tty) is not mapped with a single-id map.
        m.mount("devpts", pts, "devpts", m.MS_NOSUID | m.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    shm = f"size={spec['shm_size'] // 1024}k" if spec.get("shm_size") else "size=65536k"  # --shm-size
    m.mount("shm", os.path.join(dev, "shm"), "tmpfs", m.MS_NOSUID | m.MS_NODEV, "mode=1777," + shm)
    _mount_sys(_at(root, "sys", True))
    if spec.get("cgroups"):
        _mount_cgroups(_at(root, "sys/fs/cgroup", True), spec["cgroups"])
    if not spec["insecure"]:
        _hide_kernel_paths(root, (), _confine.MASKED_PATHS, "/sys/")
    for rel, source in spec["host_binds"]:
        _bind(source, _at(root, rel, False), readonly=True)


def _host_devices(dev: str) -> None:
    """--security=insecure: every device node of the host's /dev bound at the same place, as
    BuildKit's privileged spec adds the host's devices (/dev/fuse, /dev/loop*, ...). Using one
    still takes what the host allows the step's user; a node that cannot be bound is left out."""
    for top, dirs, files in os.walk("/dev"):
        rel = os.path.relpath(top, "/dev")
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in ("pts", "shm", "mqueue")]
        for name in files:
            path = os.path.join(top, name)
            target = os.path.normpath(os.path.join(dev, rel, name))
            try:
                mode = os.lstat(path).st_mode
                if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
                    continue
                if os.path.lexists(target):
                    continue  # made already (null, zero, ...)
                os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
                _bind(path, target, readonly=True)  # the host's node: its mode and owner stay the host's
            except OSError:
                continue


def _private_binfmt(target: str, rules: list[str]) -> None:
    """This user namespace's own binfmt_misc (Linux 6.7) at `target`, holding `rules` (an
    emulator registered with F while the host's paths are in view), then read-only. Once
    mounted it, not the host's, answers for every exec in the sandbox (sandbox.emulation)."""
    m = _libc
    try:
        m.mount("binfmt_misc", target, "binfmt_misc", m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC)
    except OSError as err:
        raise SetupError(
            f"mount a binfmt_misc of the sandbox's own for emulation: {_describe(err)} "
            "(needs Linux 6.7; or as root register qemu-user-static's handlers on the host)"
        ) from err
    for rule in rules:
        fd = os.open(target + "/register", os.O_WRONLY)
        try:
            os.write(fd, rule.encode())
        except OSError as err:
            raise SetupError(
                f"register {rule.split(':')[1]} in the sandbox's binfmt_misc: {_describe(err)}"
            ) from err
        finally:
            os.close(fd)
    m.mount(
        None, target, None, m.MS_REMOUNT | m.MS_BIND | m.MS_RDONLY | m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC
    )


def _hide_kernel_paths(root: str, readonly: tuple[str, ...], masked: tuple[str, ...], under: str) -> None:
    """runc's read-only paths (bound onto themselves, read-only) and masked paths (an
    empty read-only tmpfs over a directory, /dev/null over a file), those `under` a prefix."""
    for path in readonly:
        if path.startswith(under) and os.path.lexists(host := root + path):
            _bind(host, host, readonly=True)
    for path in masked:
        if not path.startswith(under):
            continue
        host = root + path
        try:
            st = os.lstat(host)
        except OSError:
            continue  # not on this kernel
        if stat.S_ISDIR(st.st_mode):
            _libc.mount("tmpfs", host, "tmpfs", _libc.MS_RDONLY)
        else:
            _libc.mount("/dev/null", host, None, _libc.MS_BIND)


def _mount_sys(target: str) -> None:
    """A read-only /sys: a fresh sysfs when the network namespace is ours, else the host's, bound.

    Best effort, as /sys is not part of what a build may rely on; without
    either it stays an empty directory, never a writable one.
    """
    flags = _libc.MS_RDONLY | _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC
    try:
        _libc.mount("sysfs", target, "sysfs", flags)
        return
    except OSError:
        pass  # the host's network namespace: sysfs may not be mounted from here
    try:
        # Recursive (the host's submounts are locked to it), and every one of
        # them read-only: with an identity map, root inside owns the host's cgroup files.
        _libc.mount("/sys", target, None, _libc.MS_BIND | _libc.MS_REC)
    except OSError:
        return
    try:
        for point in _mount_points_under(target):
            remount = _libc.MS_BIND | _libc.MS_REMOUNT | _libc.MS_RDONLY
            _libc.mount(None, point, None, remount | _locked_flags(point))
    except OSError:
        _libc.umount(target, _libc.MNT_DETACH)


def _mount_cgroups(target: str, found: list[tuple[str, int, str]]) -> None:
    """The step's own cgroups, read-only at /sys/fs/cgroup as runc mounts them: cgroup v2 there,
    or v1's hierarchies each in its directory of a tmpfs. The cgroup namespace roots them at
    the step's cgroup, where its limits are."""
    flags = _libc.MS_RDONLY | _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC
    if any(mount == "/sys/fs/cgroup" and version == 2 for mount, version, _ in found):
        _libc.mount("cgroup2", target, "cgroup2", flags)
        return
    _libc.mount("tmpfs", target, "tmpfs", _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC, "mode=755")
    for mount, version, options in found:
        where = os.path.join(target, os.path.basename(mount))
        os.mkdir(where, 0o555)
        if version == 2:
            _libc.mount("cgroup2", where, "cgroup2", flags)
        else:
            _libc.mount("cgroup", where, "cgroup", flags, options)
    _libc.mount(None, target, None, _libc.MS_REMOUNT | _libc.MS_BIND | flags)


def _mount_points_under(top: str) -> list[str]:
    """Mount points at or below `top` in this mount namespace, parents first."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline and \\ octal-escaped.
            point = line.split(" ")[4]
            for raw, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(raw, char)
            if point == top or point.startswith(top + "/"):
                points.append(point)
    return points


def _locked_flags(source: str) -> int:
    """Flags a read-only remount must keep: a user namespace may not clear them."""
    f = os.statvfs(source).f_flag
    flags = f & (_libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC | _libc.MS_NOATIME | _libc.MS_NODIRATIME)
    if f & os.ST_RELATIME:
        flags |= _libc.MS_RELATIME
    return flags


def _bind(source: str, target: str, readonly: bool) -> None:
    _libc.mount(source, target, None, _libc.MS_BIND | _libc.MS_REC)
    if readonly:
        flags = _libc.MS_BIND | _libc.MS_REMOUNT | _libc.MS_RDONLY | _locked_flags(source)
        _libc.mount(None, target, None, flags)


def _chown(path: str, uid: int, gid: int, single_id: bool) -> None:
    try:
        os.chown(path, uid, gid)
    except OSError:
        if not single_id:
            raise
        # A single-id map has only root: the owner stays root (IdMap.warning said so).


def _user_mount(m: dict, root: str, single_id: bool) -> None:
    target = _at(root, m["target"], m["is_dir"])
    kind = m["kind"]
    # Said here, with the container's path: mount(2) would only say ENOTDIR, of ours.
    where = "/" + m["target"].lstrip("/")
    if m["is_dir"] and not os.path.isdir(target):
        raise SetupError(f"--mount target {where}: the image has a file there; a {kind} mount is a directory")
    if not m["is_dir"] and os.path.isdir(target):
        raise SetupError(f"--mount target {where}: the image has a directory there; the mount is a file")
    if kind == "tmpfs":
        opts = "mode=755" + (f",size={m['size']}" if m["size"] else "")
        flags = _libc.MS_NOSUID | _libc.MS_NODEV | (_libc.MS_RDONLY if m.get("readonly") else 0)
        _libc.mount("tmpfs", target, "tmpfs", flags, opts)
    elif kind == "bind":
        if m["discard"]:
            # Writes land in a scratch upper dir that the runner throws away.
            _libc.mount(
                "overlay",
                target,
                "overlay",
                0,
                f"lowerdir={m['source']},upperdir={m['upper']},workdir={m['work']},userxattr",
            )
        else:
            _bind(m["source"], target, m["readonly"])
    elif kind == "cache":
        if m["fresh"]:
            _chown(m["source"], m["uid"], m["gid"], single_id)
            os.chmod(m["source"], m["mode"])
        _bind(m["source"], target, readonly=m.get("readonly", False))
    elif kind == "secret":
        # A private tmpfs holds the copy with the asked owner and mode; it
        # lives only in this mount namespace, never in a layer.
        stage = m["stage"]
        _libc.mount("tmpfs", stage, "tmpfs", _libc.MS_NOSUID | _libc.MS_NODEV, "mode=700")
        copy = os.path.join(stage, "secret")
        with open(m["source"], "rb") as src, open(copy, "wb") as dst:
            dst.write(src.read())
        _chown(copy, m["uid"], m["gid"], single_id)
        os.chmod(copy, m["mode"])
        _bind(copy, target, readonly=True)
    else:
        raise SetupError(f"unknown mount type {kind!r}")


# --- user and groups -----------------------------------------------------------


def _table(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def _in_root(root: str, path: str) -> str:
    """`path` of the rootfs at `root` ("" when chrooted), symlinks resolved inside it."""
    return os.path.join(root, _rootfs.resolve_in_dir(root, path)) if root else path


def _is_id(text: str) -> bool:
    """A numeric uid or gid as runc reads one: ASCII digits, below 2**32 (`²` is a name)."""
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) < 1 << 32


def resolve_user(spec: str, root: str = "") -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary gids, home) for `user[:group]`, read from the rootfs like Docker.

    `root`: the rootfs's host path when this process is not chrooted into it (proot).
    """
    user, _, group = spec.partition(":")
    # Rows whose ids are not numbers are skipped, as a libc lookup would.
    rows = _table(_in_root(root, "/etc/passwd"))
    passwd = [row for row in rows if len(row) >= 7 and _is_id(row[2]) and _is_id(row[3])]
    entry = None
    if _is_id(user):
        uid = int(user)
        entry = next((row for row in passwd if row[2] == user), None)
    elif user:
        entry = next((row for row in passwd if row[0] == user), None)
        if entry is None:
            raise SetupError(f"unable to find user {user}: no matching entries in passwd file")
        uid = int(entry[2])
    else:
        uid = 0
        entry = next((row for row in passwd if row[2] == "0"), None)
    gid = int(entry[3]) if entry else 0
    home = entry[5] if entry and entry[5] else "/"
    groups_table = [row for row in _table(_in_root(root, "/etc/group")) if len(row) >= 3 and _is_id(row[2])]
    if group:
        if _is_id(group):
            gid = int(group)
        else:
            match = next((row for row in groups_table if row[0] == group), None)
            if match is None:
                raise SetupError(f"unable to find group {group}: no matching entries in group file")
            gid = int(match[2])
    # As BuildKit's GetUser: no USER is user "0", resolved like any other, so root
    # gets its /etc/group memberships too (`groups=0(root),10(wheel)`). As runc's
    # GetExecUser: those memberships, only when the spec names no group. And as
    # BuildKit's ensureAdditionalGids (containerd after CVE-2023-25173): the
    # primary group first among them. BuildKit 0.8 (docker 20.10) did neither.
    groups: list[int] = []
    if entry is not None and not group:
        for row in groups_table:
            members = row[3].split(",") if len(row) > 3 else []
            if entry[0] in members and int(row[2]) not in groups:
                groups.append(int(row[2]))
    if gid not in groups:
        groups.insert(0, gid)
    return uid, gid, groups, home


def _become(spec: dict, uid: int, gid: int, groups: list[int]) -> None:
    try:
        if not spec["single_id"]:
            os.setgroups(groups)
        if gid != 0:
            os.setgid(gid)
        if uid != 0:
            os.setuid(uid)
    except OSError as err:
        if spec["single_id"]:
            raise SetupError(
                f"user {spec['user']!r} (uid {uid}, gid {gid}) is not mapped: this sandbox maps only root "
                "(no subordinate ids for the caller in /etc/subuid and /etc/subgid)"
            ) from err
        raise
