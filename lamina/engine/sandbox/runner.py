"""The caller's side of a sandbox: scratch dirs, the helper process, id maps, cleanup."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from lamina.engine.sandbox import _rootfs
from lamina.engine.sandbox.idmap import IdMap, IdMode, detect_ids, write_maps
from lamina.engine.sandbox.spec import (
    BindMount,
    CacheMount,
    Network,
    SandboxSpec,
    SecretMount,
    Sharing,
    Snapshotter,
    Started,
    TmpfsMount,
)
from lamina.errors import SandboxError

if TYPE_CHECKING:
    from lamina.engine.sandbox.emulation import Emulator
    from lamina.oci.digest import Digest
    from lamina.oci.extract import ExtractResult

_HELPER = str(Path(__file__).with_name("helper.py"))
_APT_SANDBOX_ROOT = 'APT::Sandbox::User "root";\n'
_KILL_GRACE_SECONDS = 2.0

# Helpers running now, so that an interrupt seen by the main thread can stop
# those that worker threads are waiting on (only the main thread gets SIGINT).
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def stop_all() -> None:
    """Interrupt, then kill, every sandbox this process is running (on Ctrl-C)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        _stop(proc)


def default_snapshotter() -> Snapshotter | None:
    """`$LAMINA_SNAPSHOTTER` if set, else None (overlay, falling back to copy)."""
    value = os.environ.get("LAMINA_SNAPSHOTTER", "").strip().lower()
    if not value:
        return None
    try:
        return Snapshotter(value)
    except ValueError:
        raise SandboxError(f"LAMINA_SNAPSHOTTER={value}: expected overlay or copy") from None


def run(
    spec: SandboxSpec,
    *,
    ids: IdMap | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_started: Callable[[Started], None] | None = None,
) -> int:
    """Run `spec.argv` in a fresh sandbox; return its exit code (128+N when killed by signal N).

    The changes land in `spec.upper_dir` in overlay form, whichever the
    snapshotter. `on_started` is told once the namespaces exist (and its
    ports are published), with a handle that can stop this sandbox alone.
    Raises SandboxError when the sandbox cannot be set up or the command
    cannot be executed.
    """
    if not spec.argv:
        raise SandboxError("run: no command given")
    if spec.publish and spec.network is not Network.DEFAULT:
        raise SandboxError(f"publishing a port needs the default network, not --network={spec.network.value}")
    ids = ids or detect_ids()
    if ids.warning and on_warning is not None:
        on_warning(ids.warning)
    from lamina.engine.sandbox import isolation

    choice = isolation.choose(spec.isolation if spec.isolation is not None else isolation.requested())
    isolation.check_ids(choice.isolation, ids.mode is IdMode.RECORDED)
    if choice.notice() and on_warning is not None:
        on_warning(choice.notice())
    emulator = None
    if spec.platform is not None:
        from lamina.engine.sandbox.emulation import emulator as find_emulator

        emulator = find_emulator(spec.platform, choice.isolation.value)
    if choice.isolation in (isolation.Isolation.CHROOT, isolation.Isolation.PROOT):
        spec = _without_namespaces(spec, choice)
    elif spec.network is Network.DEFAULT:
        from lamina.engine.sandbox import network

        why = network.unavailable()
        if why and spec.publish:
            raise SandboxError(why.replace("the default network", "publishing a port"))
        if why:
            # Isolated still: a step that needs the network fails, and this says why.
            if on_warning is not None:
                on_warning(network.fallback_warning(why))
            spec = dataclasses.replace(spec, network=Network.NONE)
    chosen = spec.snapshotter or default_snapshotter()
    if choice.isolation in (isolation.Isolation.CHROOT, isolation.Isolation.PROOT):
        chosen = Snapshotter.COPY  # nothing can be mounted
    order = [chosen] if chosen else [Snapshotter.OVERLAY, Snapshotter.COPY]
    for i, snapshotter in enumerate(order):
        try:
            return _run_once(spec, ids, snapshotter, on_started, choice.isolation.value, emulator)
        except _OverlayUnavailable as err:
            if i + 1 == len(order):
                raise SandboxError(str(err)) from None
            if on_warning is not None:
                on_warning(f"{err}: using the copy snapshotter (slower; LAMINA_SNAPSHOTTER=copy says so)")
    raise AssertionError("unreachable")


def _proot_path() -> str:
    from lamina.engine.sandbox import isolation

    found = isolation.probe().proot
    if not found:
        raise SandboxError("proot isolation: proot is not installed (apt-get install proot)")
    return found


class _OverlayUnavailable(SandboxError):
    pass


def _without_namespaces(spec: SandboxSpec, choice: Any) -> SandboxSpec:
    """The spec as chroot isolation can run it: the host's network, or a one-line refusal."""
    from lamina.engine.sandbox import isolation

    why = isolation.probe().userns or f"--isolation or ${isolation.ENV_VAR} asks for it"
    lacking = f"which {choice.isolation.value} isolation cannot make ({why})"
    if spec.network is Network.NONE:
        raise SandboxError(
            f"--network=none needs a network namespace, {lacking}; drop the flag, "
            "or build where `lamina info` shows user namespaces"
        )
    if spec.publish:
        raise SandboxError(f"publishing a port needs a network namespace, {lacking}")
    if spec.shm_size:  # /dev/shm is a directory of the copied root, of no size
        raise SandboxError(f"--shm-size needs a mount namespace for /dev/shm's tmpfs, {lacking}")
    if spec.cgroup_parent or spec.memory:  # the step's cgroup is seen through a cgroup namespace
        raise SandboxError(f"--cgroup-parent and memory= need a cgroup namespace, {lacking}")
    if spec.ulimits and choice.isolation is isolation.Isolation.PROOT:
        raise SandboxError("--ulimit is not supported under proot isolation (proot itself would run limited)")
    # Nothing can be mounted read-only, and the step's root (chroot) or uid (proot) may write
    # any file of the cache it is given: a read-only cache mount could only be pretended.
    for m in spec.mounts:
        if isinstance(m, CacheMount | TmpfsMount) and m.readonly:
            kind = "cache" if isinstance(m, CacheMount) else "tmpfs"
            raise SandboxError(f"--mount=type={kind},readonly needs a read-only mount, {lacking}")
    # DEFAULT asks for isolation from the host's loopback, which cannot be
    # had: the step shares the host's network, as the once-per-build notice said.
    return dataclasses.replace(spec, network=Network.HOST)


def _run_once(
    spec: SandboxSpec,
    ids: IdMap,
    snapshotter: Snapshotter,
    on_started: Callable[[Started], None] | None,
    isolation: str = "userns",
    emulator: Emulator | None = None,
) -> int:
    upper = spec.upper_dir
    if upper is not None:
        upper.mkdir(parents=True, exist_ok=True)
        if any(upper.iterdir()):  # checked first: on failure an upper dir is emptied
            raise SandboxError(f"upper dir {upper} is not empty")
    scratch_parent = spec.scratch_dir or (upper.parent if upper else None)
    if scratch_parent is not None:
        scratch_parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="lamina-sandbox-", dir=scratch_parent))
    work: Path | None = None
    try:
        with contextlib.ExitStack() as locks:
            if upper is None:
                upper = base / "upper"
                upper.mkdir()
            # overlayfs wants the work dir on the upper dir's file system.
            work = Path(tempfile.mkdtemp(prefix=".lamina-work-", dir=upper.parent))
            for name in ("rootfs", "mountpoints"):
                (base / name).mkdir()
            wire = _wire(spec, ids, snapshotter, base, upper, locks, isolation)
            wire["work"] = str(work)
            if emulator is not None and emulator.how == "private":
                wire["binfmt"] = [emulator.rule]  # registered in the sandbox's own binfmt_misc
            if emulator is not None and emulator.how == "proot":
                wire["proot_qemu"] = emulator.interpreter
            code, errors = _helper(wire, ids, spec, on_started=on_started)
            if errors:
                message = errors[0]
                if snapshotter is Snapshotter.OVERLAY and "mount overlay" in message:
                    raise _OverlayUnavailable(message)
                raise SandboxError(message)
            return code
    except BaseException:
        if spec.upper_dir is not None:
            remove_tree(spec.upper_dir, ids, keep_root=True)
        raise
    finally:
        try:
            if work is not None:
                remove_tree(work, ids)
        finally:
            remove_tree(base, ids)


def _wire(
    spec: SandboxSpec,
    ids: IdMap,
    snapshotter: Snapshotter,
    base: Path,
    upper: Path,
    locks: contextlib.ExitStack,
    isolation: str = "userns",
) -> dict[str, Any]:
    """The plain dict the helper reads (marshal: no imports on its side)."""
    host_binds = _network_files(spec, base)
    apt_snippet = ""
    if ids.mode in (IdMode.SINGLE, IdMode.RECORDED):
        # apt drops to user _apt, which a single-id map does not have. The
        # setting is bind-mounted, so it never reaches the upper dir.
        apt = base / "apt.conf"
        apt.write_text(_APT_SANDBOX_ROOT)
        apt_snippet = str(apt)
    return {
        "mode": "run",
        "isolation": isolation,
        "parent": os.getpid(),
        "snapshotter": snapshotter.value,
        "lowers": [str(Path(p).absolute()) for p in spec.lower_dirs] or [str(_empty_dir(base))],
        "upper": str(upper.absolute()),
        "rootfs": str(base / "rootfs"),
        "mountpoints": str(base / "mountpoints"),
        "argv": list(spec.argv),
        "env": [f"{k}={v}" for k, v in spec.env],
        "cwd": spec.cwd,
        "user": spec.user,
        "hostname": spec.hostname,
        "network": spec.network.value,
        "insecure": spec.insecure,
        "single_id": ids.mode is IdMode.SINGLE,
        "proot": _proot_path() if isolation == "proot" else "",
        "host_binds": host_binds,
        "apt_snippet": apt_snippet,
        "ulimits": [(_ulimit_number(u.name), u.soft, u.hard) for u in spec.ulimits],
        "shm_size": spec.shm_size,
        "cgroups": _cgroups(spec),
        # chroot isolation moves a cache directory in: no sharing it while it is away.
        "mounts": [_wire_mount(m, i, base, locks, isolation == "chroot") for i, m in enumerate(spec.mounts)],
    }


def _cgroups(spec: SandboxSpec) -> list[tuple[str, int, str]]:
    """The hierarchies the step gets a cgroup of its own in (--cgroup-parent, memory=), for its
    /sys/fs/cgroup; none without either. Refused in one line where it cannot (cgroups.why_not)."""
    if not (spec.cgroup_parent or spec.memory):
        return []
    from lamina.engine.sandbox import cgroups

    rootless = os.geteuid() != 0
    if why := cgroups.why_not(rootless):
        raise SandboxError(f"--cgroup-parent / memory=: {why}")
    return [
        (h.mount, h.version, h.options) for h in cgroups.hierarchies() if not (rootless and h.version == 1)
    ]


def _ulimit_number(name: str) -> int:
    from lamina.engine.sandbox.spec import RLIMITS

    if name not in RLIMITS:
        raise SandboxError(f"ulimit {name}: not a resource limit ({', '.join(RLIMITS)})")
    return RLIMITS[name]


def _network_files(spec: SandboxSpec, base: Path) -> list[tuple[str, str]]:
    """(root-relative path, host file) for /etc/resolv.conf and /etc/hosts, bound read-only."""
    from lamina.engine.sandbox import network

    binds: list[tuple[str, str]] = []
    # --add-host: BuildKit's GetHostsFile appends "IP\tNAME" lines to the hosts file it makes.
    extra = "".join(f"{ip}\t{name}\n" for name, ip in spec.extra_hosts)
    if spec.network is Network.NONE:  # BuildKit writes every RUN's hosts file (localhost, its name)
        binds.append(_write_net_file(base, "etc/hosts", network.hosts(spec.hostname) + extra))
        return binds
    resolv = os.path.realpath("/etc/resolv.conf")
    if spec.network is Network.HOST:
        for rel, host in (("etc/resolv.conf", resolv), ("etc/hosts", os.path.realpath("/etc/hosts"))):
            if extra and rel == "etc/hosts":
                text = Path(host).read_text(errors="replace") if os.path.isfile(host) else ""
                binds.append(
                    _write_net_file(
                        base, rel, text + ("" if text.endswith("\n") or not text else "\n") + extra
                    )
                )
            elif os.path.isfile(host):
                binds.append((rel, host))
        return binds
    try:
        host_text = Path(resolv).read_text(errors="replace")
    except OSError:
        host_text = ""
    made = (
        ("etc/resolv.conf", network.resolv_conf(host_text)),
        ("etc/hosts", network.hosts(spec.hostname) + extra),
    )
    for rel, text in made:
        binds.append(_write_net_file(base, rel, text))
    return binds


def _write_net_file(base: Path, rel: str, text: str) -> tuple[str, str]:
    path = base / rel.replace("/", "-")
    path.write_text(text)
    path.chmod(0o644)
    return rel, str(path)


def _empty_dir(base: Path) -> Path:
    """The lower dir of an image with no layers (FROM scratch): an empty root, mode 0755."""
    empty = base / "empty"
    empty.mkdir(exist_ok=True)
    empty.chmod(0o755)
    return empty


def _wire_mount(
    m: object, index: int, base: Path, locks: contextlib.ExitStack, exclusive: bool = False
) -> dict[str, Any]:
    target = getattr(m, "path", None) or getattr(m, "target", "")
    if not str(target).startswith("/"):
        raise SandboxError(f"mount target {target!r}: must be an absolute path")
    out: dict[str, Any] = {"target": str(target).lstrip("/"), "is_dir": True}
    if isinstance(m, BindMount):
        source = m.source.absolute()
        if not source.exists():
            raise SandboxError(f"bind mount {target}: source {source} does not exist")
        out.update(kind="bind", source=str(source), readonly=m.readonly, discard=False)
        out["is_dir"] = source.is_dir()
        if m.discard_writes and not m.readonly:
            scratch = base / f"bind-{index}"
            if out["is_dir"]:
                (scratch / "upper").mkdir(parents=True)
                (scratch / "work").mkdir()
                out.update(discard=True, upper=str(scratch / "upper"), work=str(scratch / "work"))
            else:
                scratch.mkdir()
                copy = scratch / source.name
                copy.write_bytes(source.read_bytes())
                out["source"] = str(copy)
    elif isinstance(m, CacheMount):
        if exclusive and m.sharing is Sharing.SHARED:
            m = dataclasses.replace(m, sharing=Sharing.LOCKED)
        out.update(_cache_source(m, index, base, locks), kind="cache", uid=m.uid, gid=m.gid, mode=m.mode)
        out["readonly"] = m.readonly
    elif isinstance(m, TmpfsMount):
        out.update(kind="tmpfs", size=m.size, readonly=m.readonly)
    elif isinstance(m, SecretMount):
        if not m.source.is_file():
            raise SandboxError(f"secret {m.id}: {m.source} is not a readable file")
        stage = base / f"secret-{index}"
        stage.mkdir()
        out.update(
            kind="secret",
            source=str(m.source.absolute()),
            stage=str(stage),
            uid=m.uid,
            gid=m.gid,
            mode=m.mode,
            is_dir=False,
        )
    else:
        raise SandboxError(f"unsupported mount {m!r}")
    return out


def _cache_source(m: CacheMount, index: int, base: Path, locks: contextlib.ExitStack) -> dict[str, Any]:
    fresh = not m.source.exists()
    m.source.mkdir(parents=True, exist_ok=True)
    lock_file = locks.enter_context(open(str(m.source) + ".lock", "a+b"))  # noqa: SIM115
    if m.sharing is Sharing.SHARED:
        fcntl.flock(lock_file, fcntl.LOCK_SH)
    elif m.sharing is Sharing.LOCKED:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    else:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Busy: this run gets its own empty directory, discarded afterwards.
            private = base / f"cache-{index}"
            private.mkdir()
            return {"source": str(private), "fresh": True}
    return {"source": str(m.source.absolute()), "fresh": fresh}


def _helper(
    wire: dict[str, Any],
    ids: IdMap,
    spec: SandboxSpec | None = None,
    results: list[str] | None = None,
    sink: BinaryIO | None = None,
    on_started: Callable[[Started], None] | None = None,
) -> tuple[int, list[str]]:
    """Start the helper with `wire`, map its ids, wait; (exit code, error messages).

    `results` receives the helper's result lines; `sink` its stdout, copied
    by a thread while the helper runs.
    """
    import marshal

    proc, request_w, report_r = _start_helper(spec, sink)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    pump = _Pump(proc.stdout, sink) if sink is not None else None
    try:
        with open(request_w, "wb", buffering=0) as request, open(report_r, "rb", buffering=0) as report:
            payload = marshal.dumps(wire)
            request.write(len(payload).to_bytes(4, "big") + payload)
            first = report.read(1)
            started = first == b"U"
            with contextlib.ExitStack() as net:
                if started:
                    if wire.get("isolation", "userns") == "userns":
                        write_maps(proc.pid, ids)
                    if spec is not None and (spec.cgroup_parent or spec.memory):
                        from lamina.engine.sandbox import cgroups

                        # Before it goes on: the helper's cgroup namespace is rooted where it is then.
                        rootless = os.geteuid() != 0
                        net.enter_context(cgroups.placed(proc.pid, spec.cgroup_parent, spec.memory, rootless))
                    if wire.get("network") == "default":
                        from lamina.engine.sandbox import network

                        net.enter_context(network.attached(proc.pid, spec.publish if spec else ()))
                    if on_started is not None:
                        # Before the helper goes on: what it sets up (a peer's relay
                        # listener) is there before the command runs.
                        on_started(Started(proc.pid, lambda: _stop(proc), spec))
                    request.write(b"G")
                    first = b""
                request.close()
                messages = (first + report.read()).decode(errors="replace")
                code = proc.wait()
        if pump is not None:
            pump.finish()
    except BaseException:
        _stop(proc)
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    return _outcome(messages, started, code, results)


def _start_helper(
    spec: SandboxSpec | None, sink: BinaryIO | None
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start the helper process; (it, the fd to write its request to, the fd to read its report from)."""
    request_r, request_w = os.pipe()
    report_r, report_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", _HELPER, str(request_r), str(report_w)],
            pass_fds=(request_r, report_w),
            # Nothing of ours reaches a step: the helper, PID 1's parent, starts with no environment.
            env={},
            stdin=spec.stdin if spec else subprocess.DEVNULL,
            stdout=spec.stdout if spec else (subprocess.PIPE if sink else subprocess.DEVNULL),
            stderr=spec.stderr if spec else None,
            # A step that reads no terminal runs in a process group of its own: Ctrl-C reaches
            # lamina alone, which stops the sandbox and says "interrupted" (in lamina's group
            # the step could die of the SIGINT first and be reported as a failed step). An
            # interactive `lamina run -it` stays in the terminal's foreground group.
            process_group=None if _reads_terminal(spec) else 0,
        )
    except OSError as err:
        for fd in (request_r, request_w, report_r, report_w):
            os.close(fd)
        raise SandboxError(f"start the sandbox helper: {err}") from err
    os.close(request_r)
    os.close(report_w)
    return proc, request_w, report_r


def _reads_terminal(spec: SandboxSpec | None) -> bool:
    stdin = spec.stdin if spec else subprocess.DEVNULL
    if stdin is None:
        stdin = 0
    if isinstance(stdin, int) and stdin >= 0:
        return os.isatty(stdin)
    fileno = getattr(stdin, "fileno", None)
    try:
        return fileno is not None and os.isatty(fileno())
    except (OSError, ValueError):
        return False


def _outcome(messages: str, started: bool, code: int, results: list[str] | None) -> tuple[int, list[str]]:
    """(exit code, error messages) from the helper's report and exit status; result lines to `results`."""
    lines = messages.splitlines()
    errors = [line[1:] for line in lines if line.startswith("E")]
    if not started and not errors:
        # It died before making the namespaces (its traceback went to stderr).
        errors = [f"the sandbox helper failed before starting anything (exit status {code})"]
    if results is not None:
        results.extend(line[1:] for line in lines if line.startswith("R"))
    return (128 - code if code < 0 else code), errors


class _Pump:
    """Copies a pipe into a file object on a thread, so neither side can fill up and block."""

    def __init__(self, source: IO[bytes] | None, sink: BinaryIO) -> None:
        assert source is not None
        self._source, self._sink = source, sink
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lamina-sandbox-pump", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while chunk := self._source.read(1 << 20):
                self._sink.write(chunk)
        except BaseException as err:  # re-raised on the caller's thread by finish()
            self._error = err
            while self._source.read(1 << 20):
                pass
        finally:
            self._source.close()

    def finish(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt the sandbox, then kill it: the helper's death takes PID 1 and its tree along."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=_KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()


def remove_tree(path: Path, ids: IdMap | None = None, *, keep_root: bool = False) -> None:
    """rm -rf `path`; what subordinate ids own is removed from inside a user namespace."""
    ids = ids or detect_ids()
    if not os.path.lexists(path):
        return
    paths = [str(p) for p in Path(path).iterdir()] if keep_root else [str(path)]
    try:
        for p in paths:
            _rootfs.remove_tree(p)
        return
    except PermissionError:
        if ids.mode is not IdMode.SUBORDINATE:
            raise SandboxError(f"remove {path}: permission denied") from None
    except OSError as err:
        raise SandboxError(f"remove {err.filename or path}: {err.strerror}") from err
    # Usually everything is the caller's and the loop above is enough; a
    # directory of another container user needs that user's namespace.
    paths = [p for p in paths if os.path.lexists(p)]
    _, errors = _helper({"mode": "remove", "parent": os.getpid(), "paths": paths}, ids)
    if errors:
        raise SandboxError(errors[0])


def set_owners(owners: Sequence[tuple[Path, int, int]], ids: IdMap | None = None) -> None:
    """lchown each path to a container (uid, gid), as the sandbox will show it.

    For files the caller wrote outside any sandbox (COPY --chown, WORKDIR
    as USER): as root the ids are the host's; with subordinate ids the
    chown runs inside a user namespace; with a single-id map only 0:0
    exists, so other owners are left as they are (IdMap.warning says so).
    """
    ids = ids or detect_ids()
    if not owners or ids.mode is IdMode.SINGLE:
        return
    if ids.mode is IdMode.RECORDED:
        from lamina.oci import recorded

        for path, uid, gid in owners:
            try:
                recorded.set_owner(os.fspath(path), uid, gid)
            except OSError as err:
                raise SandboxError(f"chown {path} to {uid}:{gid}: {err.strerror}") from err
        return
    if ids.mode is IdMode.ROOT:
        from lamina.oci.xattrs import lchown_keeping

        for path, uid, gid in owners:
            try:
                lchown_keeping(os.fspath(path), uid, gid)  # setuid bits and capabilities stay
            except OSError as err:
                raise SandboxError(f"chown {path} to {uid}:{gid}: {err.strerror}") from err
        return
    wire = {
        "mode": "chown",
        "parent": os.getpid(),
        "owners": [(str(Path(p).absolute()), uid, gid) for p, uid, gid in owners],
    }
    _, errors = _helper(wire, ids)
    if errors:
        raise SandboxError(errors[0])


def set_xattrs_inside(items: Sequence[tuple[Path, str, bytes]], ids: IdMap) -> list[tuple[Path, str]]:
    """setxattr each (path, name, value), not followed, inside a user namespace whose root is
    the caller: there `security.capability` may be set (the kernel stores it as v3, naming
    the caller). For files the caller owns; returns (path, why) for each one not set."""
    wire = {
        "mode": "xattrs",
        "parent": os.getpid(),
        "xattrs": [(str(Path(p).absolute()), name, value) for p, name, value in items],
    }
    _, errors = _helper(wire, ids)
    failed = []
    for error in errors:
        path, nul, why = error.partition("\0")
        if not nul:  # the helper did not start: none was set
            return [(Path(p), error) for p, _, _ in items]
        failed.append((Path(path), why))
    return failed


def write_layer_inside(
    upper: Path,
    out: BinaryIO,
    compression: str,
    lowers: Sequence[Path],
    source_date_epoch: int | None,
    ids: IdMap,
) -> dict[str, Any]:
    """`snapshot.write_upper` run inside a user namespace: files of subordinate
    ids that the caller may not read are read there. Returns LayerInfo fields."""
    wire = {
        "mode": "layer",
        "upper": str(Path(upper).absolute()),
        "lowers": [str(Path(p).absolute()) for p in lowers],
        "compression": compression,
        "epoch": source_date_epoch,
    }
    return _helper_result(wire, ids, f"write the layer of {upper}", sink=out)


def write_layers_inside(
    jobs: Sequence[tuple[Path, Sequence[Path]]],
    outs: Sequence[BinaryIO],
    compression: str,
    source_date_epoch: int | None,
    ids: IdMap,
) -> list[dict[str, Any]]:
    """`write_layer_inside` for several (upper, lowers) at once: one helper, each blob to its `outs`."""
    from lamina.engine.sandbox._frames import FrameReader

    wire = {
        "mode": "layers",
        "jobs": [
            {"upper": str(Path(upper).absolute()), "lowers": [str(Path(p).absolute()) for p in lowers]}
            for upper, lowers in jobs
        ],
        "compression": compression,
        "epoch": source_date_epoch,
    }
    frames = FrameReader(outs)
    what = f"write the layers of {', '.join(str(upper) for upper, _ in jobs)}"
    answers: list[dict[str, Any]] = _helper_result(wire, ids, what, sink=frames)  # type: ignore[assignment,arg-type]
    if len(answers) != len(jobs) or frames.finished != len(jobs):
        raise SandboxError(f"{what}: the helper sent {frames.finished} of {len(jobs)} layers")
    return answers


def extract_layer(
    blob: Path, dest: Path, ids: IdMap | None = None, digest: Digest | None = None
) -> ExtractResult:
    """Unpack the layer blob at `blob` into `dest` in overlay form, for use as a lower dir.

    Rootless, it runs inside a user namespace with the sandbox's id map, so
    the layer's owners become the ids the sandbox shows; with a single-id
    map every file is the caller's (owners cannot be kept).
    """
    from lamina.oci.extract import ExtractResult, Whiteouts
    from lamina.oci.extract import extract_layer as unpack

    ids = ids or detect_ids()
    if ids.mode in (IdMode.ROOT, IdMode.RECORDED):
        # Recorded: no namespace to unpack in; owners and device nodes go to xattrs.
        with open(blob, "rb") as stream:
            return unpack(
                stream,
                dest,
                whiteouts=Whiteouts.OVERLAY,
                userxattr=True,
                digest=digest,
                record_owners=ids.mode is IdMode.RECORDED,
                # Root's too: overlayfs copies a real node up by mknod, which a step's user
                # namespace refuses; a placeholder it copies up, so RUN can chmod it.
                device_placeholders=True,
            )
    wire = {
        "mode": "extract",
        "blob": str(Path(blob).absolute()),
        "dest": str(Path(dest).absolute()),
        "digest": str(digest) if digest else "",
        "ignore_owners": ids.mode is IdMode.SINGLE,
    }
    fields = _helper_result(wire, ids, f"unpack {blob}")
    from lamina.oci.digest import Digest

    return ExtractResult(
        digest=Digest.parse(fields["digest"]),
        diff_id=Digest.parse(fields["diff_id"]),
        size=fields["size"],
        entries=fields["entries"],
        warnings=tuple(fields["warnings"]),
    )


def _helper_result(
    wire: dict[str, Any], ids: IdMap, what: str, sink: BinaryIO | None = None
) -> dict[str, Any]:
    """Run a helper mode that imports lamina's dependencies (the caller's
    sys.path) and answers with one JSON line; its first error is raised."""
    import json

    wire = {**wire, "parent": os.getpid(), "sys_path": [p for p in sys.path if p]}
    results: list[str] = []
    _, errors = _helper(wire, ids, results=results, sink=sink)
    if errors or not results:
        raise SandboxError(errors[0] if errors else f"{what}: the helper gave no result")
    fields: dict[str, Any] = json.loads(results[0])
    return fields


@contextlib.contextmanager
def scratch_upper(parent: Path | None = None, ids: IdMap | None = None) -> Iterator[Path]:
    """A fresh empty upper dir, removed on exit (even on Ctrl-C)."""
    path = Path(tempfile.mkdtemp(prefix="lamina-upper-", dir=parent))
    try:
        yield path
    finally:
        remove_tree(path, ids)
