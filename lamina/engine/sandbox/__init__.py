"""Rootless sandbox: Linux namespaces, overlay mounts, process execution.

Knows nothing of Dockerfiles or of the cache index; it is given lower
directories, an upper directory and a process spec. It must not import
lamina.engine.dockerfile, lamina.cache or lamina.api.

Public surface (re-exported here, loaded on first use):

    run(spec: SandboxSpec, *, ids: IdMap | None = None,
        on_warning: Callable[[str], None] | None = None,
        on_started: Callable[[Started], None] | None = None) -> int
        Run spec.argv over spec.lower_dirs (unpacked layers in overlay
        form, top-most first); changes land in spec.upper_dir in overlay
        form whichever the snapshotter; returns the exit code (128+N if
        killed by signal N); SandboxError if it cannot start or exec.
    SandboxSpec(argv, lower_dirs, upper_dir, env, cwd, user, hostname,
        network, insecure, publish, mounts, snapshotter, stdin, stdout, stderr, scratch_dir)
    PublishedPort(host_port, guest_port, host_addr); parse_publish("8080:80") as -p
    Started(pid, stop): what on_started is given, to stop that sandbox alone
    Network.DEFAULT (own namespace, slirp4netns) | HOST | NONE;
        Snapshotter.OVERLAY | Snapshotter.COPY
    BindMount, CacheMount (+ Sharing), TmpfsMount, SecretMount;
        parse_mount("type=bind,source=S,target=T[,ro]") as `docker run --mount`
    detect_ids() -> IdMap: the id map sandboxes will use; IdMap.warning
        is the one-time "only your own id is mapped" message, if any.
    remove_tree(path, ids=None, keep_root=False): rm -rf from inside a user
        namespace, for trees holding files of subordinate ids.
    extract_layer(blob, dest, ids=None, digest=None) -> ExtractResult: unpack
        a layer blob in overlay form inside the user namespace (owners kept
        as the sandbox will show them), for use as a lower dir.
    set_owners([(path, uid, gid), ...], ids=None): lchown to container ids
        from inside the user namespace (no-op with a single-id map).
    lamina.engine.snapshot.capture(upper_dir, ids=None, lowers=()) -> Iterator[LayerEntry]
    lamina.engine.snapshot.write_upper(upper_dir, out, compression, *, lowers=(),
        source_date_epoch=None, ids=None) -> LayerInfo: capture + write, inside
        the user namespace when subordinate ids may own files the caller cannot read.

Confinement (`_confine`): runc's masked and read-only paths, Docker's 14
capabilities as the bounding set, Docker's seccomp denials; `insecure`
lifts all three. PID 1 is the helper's Python with no environment, blanked
arguments and not dumpable (a step cannot open its /proc entries); BuildKit
runs the command itself as PID 1. /sys is read-only (the host's, with the
host network). There is no pseudo-terminal allocation: the command gets the
caller's stdin/stdout/stderr as they are.

How it runs: `runner` starts `helper.py` in a fresh interpreter (never a
fork of a threaded one), with an empty environment, which unshares user,
mount, PID, UTS, IPC (and network, unless Network.HOST) namespaces; the
caller writes its id maps and, for Network.DEFAULT, attaches slirp4netns
(`network`) before it lets the helper go on; the helper forks PID 1
(`_inside.init`), which mounts the rootfs and forks the command.
Helper-side modules (`helper`, `_inside`, `_rootfs`, `_libc`, `_confine`
and `lamina.oci.overlay`) import only the stdlib's cheapest modules: their
import time is the sandbox's start-up time.

apt without subordinate ids: a single-id map has no `_apt` user, so the
sandbox bind-mounts `APT::Sandbox::User "root";` at
/etc/apt/apt.conf.d/zz-lamina-sandbox-user when that directory exists. It
is a mount over a file in the mount-point lower dir, so it never reaches a
layer.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "run": "runner",
    "remove_tree": "runner",
    "scratch_upper": "runner",
    "extract_layer": "runner",
    "set_owners": "runner",
    "default_snapshotter": "runner",
    "SandboxSpec": "spec",
    "parse_mount": "spec",
    "parse_publish": "spec",
    "PublishedPort": "spec",
    "Started": "spec",
    "Network": "spec",
    "Snapshotter": "spec",
    "Sharing": "spec",
    "BindMount": "spec",
    "CacheMount": "spec",
    "TmpfsMount": "spec",
    "SecretMount": "spec",
    "IdMap": "idmap",
    "IdMode": "idmap",
    "detect_ids": "idmap",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: the helper process imports this package's private modules and
    # must not pay for dataclasses, enum and subprocess.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lamina.engine.sandbox' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"lamina.engine.sandbox.{module}"), name)
