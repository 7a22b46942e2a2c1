"""A command in a sandbox that runs already, as `docker exec` runs one: enter its namespaces.

Caller's side: `exec_in(pid, argv, ...)`, where `pid` is the sandbox
helper's (what `on_started` is given). It starts this file as a fresh
interpreter (`python -I -S exec.py REQUEST_FD REPORT_FD`: setns of a user
namespace needs a single-threaded process, so never a fork of the caller),
which enters the sandbox and runs the command; the command's exit status is
the interpreter's.

Entering side, in order (each step needs the one before):

1. the target: the sandbox's command (PID 1's child), once it has called
   exec (before that it may not be in the sandbox's root yet), else the
   first of its descendants this process may open. PID 1 never: it is not
   dumpable, so an unprivileged caller may not open its /proc entries;
2. open its user, mount, PID, network, UTS and IPC namespaces and its root
   directory, and build the seccomp filter, while the host's files (libc,
   libseccomp) are still in reach;
3. setns into each (the user namespace first: it grants the rest), then
   fchdir to the root and chroot there;
4. fork (a setns into a PID namespace holds for children only): the child
   takes the command's confinement as PID 1's command does (default
   signals, umask, the bounding set, seccomp, user and groups, cwd) and
   execs; this process reports its pid (a `P` line: a timeout kills its
   process group by it), forwards signals to it and exits with its status.

The command is a member of the sandbox's PID namespace, so it dies with it:
when the sandbox's PID 1 exits, the kernel kills every process left there.
Failures before exec come back as `E` lines on the report pipe.

Helper-side imports only (os, sys, marshal and the sandbox's helper-side
modules) at module level: this file is the entering interpreter's script.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not imported: this file is the entering interpreter's script too
if TYPE_CHECKING:
    import subprocess

_START_WAIT = 10.0  # seconds an exec waits for a starting sandbox's command to be exec'd
_NAMESPACES = ("user", "mnt", "pid", "net", "uts", "ipc")  # user first: it grants the others
_CLONE_FLAGS = {
    "user": 0x10000000,
    "mnt": 0x00020000,
    "pid": 0x20000000,
    "net": 0x40000000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
}


def exec_in(
    pid: int,
    argv: list[str] | tuple[str, ...],
    *,
    env: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
    cwd: str = "/",
    user: str = "",
    hostname: str = "lamina",
    insecure: bool = False,
    stdin: object = None,
    stdout: object = None,
    stderr: object = None,
    timeout: float | None = None,
) -> int:
    """Run `argv` in the running sandbox whose helper is `pid`; return its exit code.

    `env`, `cwd` and `user` are the process's (as `docker exec -e -w -u`,
    the caller merges them with the sandbox's own).
    `stdin`/`stdout`/`stderr` are as subprocess takes them (None: ours).
    Raises SandboxError when the sandbox cannot be entered or the command
    cannot be started, and TimeoutError (the command killed) after `timeout`.
    """
    from lamina.engine.sandbox.idmap import IdMode, detect_ids
    from lamina.errors import SandboxError

    if not argv:
        raise SandboxError("exec: no command given")
    request = {
        "targets": _running_targets(pid, timeout),
        "argv": list(argv),
        "env": [f"{k}={v}" for k, v in env],
        "cwd": cwd or "/",
        "user": user or "",
        "hostname": hostname,
        "single_id": detect_ids().mode is IdMode.SINGLE,  # as the sandbox's own map: no setgroups
        "insecure": insecure,
        "parent": os.getpid(),
    }
    code, messages = _run_helper(request, argv, stdin, stdout, stderr, timeout)
    errors = [line[1:] for line in messages.splitlines() if line.startswith("E")]
    if errors:
        raise SandboxError(f"exec {argv[0]}: {errors[0]}")
    return 128 - code if code < 0 else code


def _running_targets(pid: int, timeout: float | None) -> list[int]:
    """The namespaces' target pids of the sandbox whose helper is `pid`, once its command runs."""
    import time

    from lamina.errors import SandboxError

    try:
        entered = os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        raise SandboxError(f"exec: the sandbox of helper {pid} is not running") from None
    if not entered:
        # chroot isolation: no namespace to enter, and a chroot alone is not the command's confinement.
        raise SandboxError("exec: the sandbox has no namespaces to enter (chroot isolation makes none)")
    # A sandbox that is starting has no command yet: wait for it (as long as the helper lives).
    deadline = time.monotonic() + (_START_WAIT if timeout is None else min(timeout, _START_WAIT))
    while not (targets := _targets(pid)):
        if not os.path.exists(f"/proc/{pid}") or time.monotonic() > deadline:
            raise SandboxError(f"exec: the sandbox of helper {pid} is not running")
        time.sleep(0.005)
    return targets


def _run_helper(
    request: dict[str, object],
    argv: list[str] | tuple[str, ...],
    stdin: object,
    stdout: object,
    stderr: object,
    timeout: float | None,
) -> tuple[int, str]:
    """Run this file as the entering helper with `request`; (its exit code, its report)."""
    import marshal
    import subprocess

    from lamina.errors import SandboxError

    request_r, request_w = os.pipe()
    report_r, report_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), str(request_r), str(report_w)],
            pass_fds=(request_r, report_w),
            env={},  # nothing of ours reaches the command
            stdin=stdin if stdin is not None else None,  # type: ignore[arg-type]
            stdout=stdout,  # type: ignore[arg-type]
            stderr=stderr,  # type: ignore[arg-type]
        )
    except OSError as err:
        for fd in (request_r, request_w, report_r, report_w):
            os.close(fd)
        raise SandboxError(f"exec: start the helper: {err}") from err
    os.close(request_r)
    os.close(report_w)
    try:
        with open(request_w, "wb", buffering=0) as out:
            payload = marshal.dumps(request)
            out.write(len(payload).to_bytes(4, "big") + payload)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(proc, report_r)
            raise TimeoutError(f"exec {' '.join(argv)}: timed out after {timeout:g} s") from None
        with open(report_r, "rb", buffering=0, closefd=False) as report:
            messages = report.read().decode(errors="replace")
    except BaseException:
        if proc.poll() is None:
            _kill(proc, report_r)
        raise
    finally:
        os.close(report_r)
    return code, messages


def _kill(proc: subprocess.Popen[bytes], report_r: int) -> None:
    """Kill the command's process group (its pid is on the report pipe once forked), then the helper.

    In that order: until the helper is gone, the command's pid cannot be
    reused (the helper has not reaped it). Killing the helper alone would not
    do: the command's parent-death signal is cleared when it changes user.
    """
    import contextlib
    import signal

    os.set_blocking(report_r, False)
    try:
        seen = os.read(report_r, 1 << 16).decode(errors="replace")
    except (BlockingIOError, OSError):
        seen = ""
    for line in seen.splitlines():
        if line.startswith("P") and line[1:].isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(line[1:]), signal.SIGKILL)
    proc.kill()
    proc.wait()


def _targets(helper: int) -> list[int]:
    """The processes of the sandbox of `helper` that run its image's programs (host pids).

    Those are PID 1's descendants that have called exec: before that, the
    command is a fork of PID 1, which may not have entered the root yet (so
    its root and mounts are not the sandbox's). PID 1 itself runs the host's
    Python and is never one. Breadth first: the command before its children.
    """
    found: list[int] = []
    ours = os.stat(sys.executable)
    level = [c for init in _children(helper) for c in _children(init)]
    while level and len(found) < 64:
        for pid in level:
            try:
                exe = os.stat(f"/proc/{pid}/exe")
            except OSError:
                continue  # gone, or not dumpable yet (a fork of PID 1 before its exec)
            if (exe.st_dev, exe.st_ino) != (ours.st_dev, ours.st_ino):
                found.append(pid)
        level = [c for p in level for c in _children(p)]
    return found


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


# --- the entering side (a fresh interpreter) ------------------------------------------


def _install_package_stubs() -> None:
    # As helper.py: sibling imports without running the real package __init__ files.
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    sys.path.insert(0, root)
    for name in ("lamina", "lamina.engine", "lamina.engine.sandbox", "lamina.oci"):
        module = type(sys)(name)
        module.__path__ = [os.path.join(root, *name.split("."))]  # type: ignore[attr-defined]
        sys.modules[name] = module


def _open_target(targets: list[int]) -> tuple[dict[str, int], int]:
    """Namespace fds and a root fd of the first target this process may open."""
    last: OSError | None = None
    for pid in targets:
        opened: dict[str, int] = {}
        try:
            for kind in _NAMESPACES:
                opened[kind] = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return opened, root
        except OSError as err:
            last = err
            for fd in opened.values():
                os.close(fd)
    why = last.strerror if last is not None and last.strerror else "no process"
    raise OSError(last.errno if last else 3, f"open the namespaces of the sandbox's processes: {why}")


def _main() -> int:
    import marshal

    request_fd, report_fd = int(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(report_fd, False)
    _install_package_stubs()
    import _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    from lamina.engine.sandbox import _confine, _inside, _libc

    with open(request_fd, "rb", buffering=0) as f:
        head = f.read(4)
        spec = marshal.loads(f.read(int.from_bytes(head, "big")))
    _libc.set_parent_death_signal(_signal.SIGKILL)
    if os.getppid() != spec["parent"]:
        return _inside.SETUP_FAILED
    import ctypes  # before the chroot: nothing of the host's can be imported after it

    libc = _libc._libc
    try:
        namespaces, root = _open_target(spec["targets"])
        seccomp = None if spec["insecure"] else _confine.Filter()
        for kind in _NAMESPACES:
            if libc.setns(namespaces[kind], _CLONE_FLAGS[kind]) != 0:
                errno = ctypes.get_errno()
                # EINVAL for the user namespace: it is ours already (root, no user namespace made).
                if not (kind == "user" and errno == 22):
                    raise OSError(errno, f"enter the {kind} namespace: {os.strerror(errno)}")
            os.close(namespaces[kind])
        os.fchdir(root)
        os.chroot(".")
        os.close(root)
        os.chdir("/")
    except OSError as err:
        _inside.report(report_fd, f"enter the sandbox: {err.strerror or err}")
        return _inside.SETUP_FAILED
    child = os.fork()
    if child == 0:
        try:
            os.setpgid(0, 0)  # a group of its own: a timeout kills it and what it started
            _inside._command(spec, report_fd, seccomp)
        finally:
            os._exit(_inside.EXEC_FAILED)
    os.write(report_fd, f"P{child}\n".encode())  # its pid here, the host's: for a kill on timeout
    os.close(report_fd)
    _inside.forward_signals(child)
    _, status = os.waitpid(child, 0)
    return _inside.exit_code(status)


if __name__ == "__main__":
    sys.exit(_main())
