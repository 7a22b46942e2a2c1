"""Entry point of the sandbox helper: `python -I -S helper.py REQUEST_FD REPORT_FD`.

A fresh interpreter, never a fork of the caller (which may have threads).
Its start-up is the sandbox's start-up, so it runs with -I -S and imports
only os, marshal, ctypes and its sibling helper-side modules, reached through
stub package modules rather than by running `lamina/__init__.py`.

Protocol, over two pipes:
    caller -> helper   4-byte length + marshal'd request dict (`runner._wire`)
    helper -> caller   b"U" once the namespaces exist
    caller -> helper   b"G" once the id maps are written (anything else: give up)
    helper -> caller   b"E" + message + b"\\n" for each failure, then EOF
The exit status is the command's (run), or 0 / 125.

Modes: "run" (a command in a sandbox), "remove" (rm -rf paths inside the user
namespace, for trees owned by subordinate ids), "extract" (unpack a layer
inside the user namespace so its owners are the namespace's ids), "chown"
(set container owners on files the caller wrote, e.g. COPY --chown), "xattrs"
(set xattrs only a namespace's root may, e.g. file capabilities), "layer"
(capture an upper dir and write its layer tar to stdout), "layers" (several,
framed by `_frames`: one helper for every layer of an image).
"""

from __future__ import annotations

import marshal
import os
import sys


def _install_package_stubs() -> None:
    # Empty package modules with the right __path__: sibling imports work
    # without paying for the real package __init__ files.
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    sys.path.insert(0, root)
    packages = ("lamina", "lamina.engine", "lamina.engine.sandbox", "lamina.oci")
    for name in packages:
        module = type(sys)(name)
        module.__path__ = [os.path.join(root, *name.split("."))]  # type: ignore[attr-defined]
        sys.modules[name] = module


def _read_request(fd: int) -> dict:
    head = _read_exact(fd, 4)
    return marshal.loads(_read_exact(fd, int.from_bytes(head, "big")))


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("request pipe closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _probe() -> int:
    """`helper.py --probe`: one line per attempt, "" if it worked, else why not.

    Each attempt is a forked child (this interpreter has no threads), so
    this process's namespaces stay as they are.
    """
    from lamina.engine.sandbox import _libc

    others = (
        _libc.CLONE_NEWNS | _libc.CLONE_NEWPID | _libc.CLONE_NEWUTS | _libc.CLONE_NEWIPC | _libc.CLONE_NEWNET
    )
    for flags in (_libc.CLONE_NEWUSER | others, others):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _libc.unshare(flags)
                message = b""
            except OSError as err:
                message = f"unshare: {os.strerror(err.errno)}".encode()
            os.write(w, message)
            os._exit(0)
        os.close(w)
        answer = b""
        while chunk := os.read(r, 4096):
            answer += chunk
        os.close(r)
        os.waitpid(pid, 0)
        os.write(1, answer.replace(b"\n", b" ") + b"\n")
    return 0


def main() -> int:
    if sys.argv[1] == "--probe":
        _install_package_stubs()
        return _probe()
    request_fd, report_fd = int(sys.argv[1]), int(sys.argv[2])
    # Forked children keep it; the command's exec closes it.
    os.set_inheritable(report_fd, False)
    _install_package_stubs()
    import _signal

    # Until it forwards signals (_inside.forward_signals), an interrupt ends the
    # helper quietly: a KeyboardInterrupt traceback would land in the command's stderr.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    from lamina.engine.sandbox import _inside, _libc

    try:
        spec = _read_request(request_fd)
    except (EOFError, ValueError):
        return _inside.SETUP_FAILED
    _libc.set_parent_death_signal(_signal.SIGKILL)
    if os.getppid() != spec["parent"]:
        return _inside.SETUP_FAILED  # the caller died before we could arm the death signal
    isolation = spec.get("isolation", "userns")
    flags = _namespace_flags(spec, isolation)
    try:
        if flags:
            _libc.unshare(flags)
    except OSError as err:
        _inside.report(
            report_fd, f"create namespaces: {err.strerror} (are user namespaces enabled? `lamina info` says)"
        )
        return _inside.SETUP_FAILED
    os.write(report_fd, b"U")
    if os.read(request_fd, 1) != b"G":
        return _inside.SETUP_FAILED
    os.close(request_fd)
    if spec.get("cgroups"):  # the caller moved us into the step's cgroup: our view is rooted there
        try:
            _libc.unshare(_libc.CLONE_NEWCGROUP)
        except OSError as err:
            _inside.report(report_fd, f"create the cgroup namespace: {err.strerror}")
            return _inside.SETUP_FAILED
    return _in_namespaces(spec, isolation, report_fd)


def _namespace_flags(spec: dict, isolation: str) -> int:
    """The CLONE_NEW* flags the helper unshares for `spec` under `isolation`."""
    from lamina.engine.sandbox import _libc

    # rootns: root where user namespaces are off makes the others without one;
    # chroot and proot: none at all (the caller has nothing to map either way).
    flags = 0 if isolation in ("chroot", "proot") else _libc.CLONE_NEWNS
    if isolation == "userns":
        flags |= _libc.CLONE_NEWUSER
    if spec["mode"] == "run" and flags:
        flags |= _libc.CLONE_NEWPID | _libc.CLONE_NEWUTS | _libc.CLONE_NEWIPC
        if spec["network"] != "host":
            flags |= _libc.CLONE_NEWNET
    return flags


def _in_namespaces(spec: dict, isolation: str, report_fd: int) -> int:
    """Once the caller said go: do `spec`'s mode (chroot and proot hand the whole request on)."""
    from lamina.engine.sandbox import _inside, _libc

    if isolation == "chroot":
        from lamina.engine.sandbox import _chroot

        return _chroot.run(spec, report_fd)
    if isolation == "proot":
        from lamina.engine.sandbox import _proot

        return _proot.run(spec, report_fd)
    try:
        _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_PRIVATE)
    except OSError as err:
        _inside.report(report_fd, f"make mounts private: {err.strerror}")
        return _inside.SETUP_FAILED
    if spec["mode"] == "remove":
        return _remove(spec, report_fd)
    if spec["mode"] == "extract":
        return _answer(spec, report_fd, _extract)
    if spec["mode"] == "chown":
        return _chown(spec, report_fd)
    if spec["mode"] == "xattrs":
        return _xattrs(spec, report_fd)
    if spec["mode"] == "layer":
        return _answer(spec, report_fd, _layer)
    if spec["mode"] == "layers":
        return _answer(spec, report_fd, _layers)
    return _run_command(spec, report_fd)


def _run_command(spec: dict, report_fd: int) -> int:
    """Mode "run": set the sandbox up, fork its init (which runs the command), tidy up; the exit status."""
    from lamina.engine.sandbox import _inside

    try:
        baseline = _inside.prepare(spec)
    except _inside.SetupError as err:
        _inside.report(report_fd, str(err))
        return _inside.SETUP_FAILED
    # PID 1 writes what it made here (the placeholders of a device mknod), read once it is gone.
    spec["made_fd"] = os.memfd_create("lamina-made", os.MFD_CLOEXEC)
    child = os.fork()
    if child == 0:
        code = _inside.SETUP_FAILED
        try:
            code = _inside.init(spec, report_fd)
        finally:
            os._exit(code)
    _inside.forward_signals(child)
    _, status = os.waitpid(child, 0)
    made = os.pread(spec["made_fd"], os.fstat(spec["made_fd"]).st_size, 0)
    os.close(spec["made_fd"])
    try:  # a failed step's layer is thrown away: its records are not checked
        _inside.finish(spec, baseline, made if _inside.exit_code(status) == 0 else None)
    except _inside.SetupError as err:
        _inside.report(report_fd, str(err))
        return _inside.SETUP_FAILED
    return _inside.exit_code(status)


def _remove(spec: dict, report_fd: int) -> int:
    from lamina.engine.sandbox import _rootfs
    from lamina.engine.sandbox._inside import report

    failed = 0
    for path in spec["paths"]:
        try:
            _rootfs.remove_tree(path)
        except OSError as err:
            report(report_fd, f"remove {path}: {err.strerror} {err.filename or ''}".rstrip())
            failed = 1
    return failed


def _chown(spec: dict, report_fd: int) -> int:
    from lamina.engine.sandbox._inside import report
    from lamina.oci.xattrs import lchown_keeping

    for path, uid, gid in spec["owners"]:
        try:
            lchown_keeping(path, uid, gid)  # setuid bits and capabilities stay, as BuildKit's copier
        except OSError as err:
            report(report_fd, f"chown {path} to {uid}:{gid}: {err.strerror}")
            return 1
    return 0


def _xattrs(spec: dict, report_fd: int) -> int:
    """Mode "xattrs": set each (path, name, value); a failure is reported as PATH NUL why."""
    from lamina.engine.sandbox._inside import report

    failed = 0
    for path, name, value in spec["xattrs"]:
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as err:
            report(report_fd, f"{path}\0{name}: {err.strerror}")
            failed = 1
    return failed


def _answer(spec: dict, report_fd: int, work) -> int:  # type: ignore[no-untyped-def]
    """Run `work(spec) -> str`, a mode that needs lamina's dependencies; its result goes back as one line."""
    # The caller's site-packages (isal, zstandard); start-up time does not matter here.
    sys.path.extend(p for p in spec["sys_path"] if p not in sys.path)
    from lamina.engine.sandbox._inside import report

    try:
        result = work(spec)
    except Exception as err:  # reported to the caller, which raises it as a LaminaError
        report(report_fd, str(err))
        return 1
    os.write(report_fd, b"R" + result.encode() + b"\n")
    return 0


def _layer(spec: dict) -> str:
    import json

    from lamina.engine.snapshot import capture
    from lamina.oci.layer import Compression, write_layer

    # Inside, stat shows the container's ids: no translation needed.
    entries = capture(spec["upper"], None, spec["lowers"])
    with open(1, "wb", closefd=False) as out:
        info = write_layer(entries, out, Compression(spec["compression"]), source_date_epoch=spec["epoch"])
    fields = {"digest": str(info.digest), "diff_id": str(info.diff_id), "size": info.size}
    fields["media_type"] = info.media_type
    return json.dumps(fields)


def _layers(spec: dict) -> str:
    """Several uppers' layer blobs, framed on stdout (`_frames`), written on threads (as
    root: snapshot.write_uppers), one stream each; the answers in the order asked."""
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lamina.engine.sandbox._frames import FrameWriter
    from lamina.engine.snapshot import capture
    from lamina.oci.layer import Compression, write_layer

    lock = threading.Lock()

    def one(i: int) -> dict:
        job = spec["jobs"][i]
        out = FrameWriter(1, i, lock)
        entries = capture(job["upper"], None, job["lowers"])
        info = write_layer(entries, out, Compression(spec["compression"]), source_date_epoch=spec["epoch"])  # type: ignore[arg-type]
        out.next()
        fields = {"digest": str(info.digest), "diff_id": str(info.diff_id), "size": info.size}
        fields["media_type"] = info.media_type
        return fields

    workers = max(1, min(len(spec["jobs"]), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="lamina-layer") as pool:
        return json.dumps(list(pool.map(one, range(len(spec["jobs"])))))


def _extract(spec: dict) -> str:
    from lamina.engine.sandbox._extract import extract

    return extract(spec)


if __name__ == "__main__":
    sys.exit(main())
