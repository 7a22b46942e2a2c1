"""A step's default network: a namespace of its own, outbound access through slirp4netns.

As rootless podman and BuildKit's default: the step gets an interface, eth0
(10.0.2.100/24, gateway 10.0.2.2, DNS forwarder 10.0.2.3) whose traffic
slirp4netns turns into ordinary sockets of the caller. The host's loopback
is not reachable (`--disable-host-loopback`: 10.0.2.2 does not lead to the
host's 127.0.0.1), nor are the host's interfaces or abstract unix sockets,
which belong to the host's network namespace.

Why slirp4netns rather than pasta: Debian 12's pasta (2023-03) maps the
gateway to the host's loopback unless told otherwise and forwards ports
automatically; slirp4netns 1.2 says both in two flags, starts in ~4 ms,
and is what podman 4 on Debian 12 uses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence

from lamina.engine.sandbox.spec import PublishedPort
from lamina.errors import SandboxError

SLIRP_DNS = "10.0.2.3"
_READY_TIMEOUT_SECONDS = 10.0  # slirp4netns said no: how long to wait for its message


def slirp4netns() -> str | None:
    return shutil.which("slirp4netns") or shutil.which("slirp4netns", path="/usr/bin:/usr/local/bin")


_TUN = "/dev/net/tun"


def unavailable() -> str:
    """Why the default network cannot be given here, or "" when it can."""
    if slirp4netns() is None:
        return "the default network needs slirp4netns, which is not installed (apt-get install slirp4netns)"
    if not os.access(_TUN, os.R_OK | os.W_OK):
        return (
            f"the default network needs {_TUN}, which you cannot open "
            "(Debian's udev makes it mode 0666; this host has it closed)"
        )
    return ""


def fallback_warning(why: str) -> str:
    return (
        f"{why}: RUN steps get a network namespace with loopback only, as --network=none; "
        "--network=host shares the host's network instead"
    )


@contextlib.contextmanager
def attached(pid: int, publish: Sequence[PublishedPort] = ()) -> Iterator[None]:
    """Give the (just unshared, mapped) network namespace of `pid` an outbound interface while inside,
    and forward each published port of the host to it."""
    binary = slirp4netns()
    if binary is None:
        raise SandboxError(unavailable())
    api_dir = tempfile.mkdtemp(prefix="lamina-slirp-") if publish else ""  # a socket path: short
    api = [f"--api-socket={api_dir}/api.sock"] if publish else []
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [
                binary,
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                *api,
                f"--ready-fd={ready_w}",
                f"--exit-fd={exit_r}",  # our end closing (even if we are killed) stops it
                str(pid),
                "eth0",  # the name a RUN sees in BuildKit (its bridge) and docker: scripts look for it
            ],
            pass_fds=(ready_w, exit_r),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={},
        )
    except OSError as err:
        for fd in (ready_r, ready_w, exit_r, exit_w):
            os.close(fd)
        raise SandboxError(f"start slirp4netns: {err.strerror or err}") from err
    os.close(ready_w)
    os.close(exit_r)
    try:
        ready = _read_ready(ready_r)
        if not ready:
            proc.wait(timeout=_READY_TIMEOUT_SECONDS)
            why = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
            last = why.splitlines()[-1] if why else f"exit status {proc.returncode}"
            raise SandboxError(f"set up the default network (slirp4netns): {last}")
        try:
            for port in publish:
                _forward(f"{api_dir}/api.sock", port)
        finally:
            # Its API is needed for the forwards alone: gone now, a kill (SIGTERM to a long
            # `lamina run -p`) cannot leave the directory behind in /tmp.
            if api_dir:
                shutil.rmtree(api_dir, ignore_errors=True)
        yield
    finally:
        os.close(exit_w)
        # The namespace is gone with the step: nothing to flush. Killed, and
        # reaped on a thread: its poll loop takes ~30 ms to notice the exit
        # fd, and the kernel ~15 ms to tear its tap device down.
        proc.kill()
        if proc.stderr is not None:
            proc.stderr.close()
        threading.Thread(target=proc.wait, name="lamina-slirp-reaper", daemon=True).start()


def _forward(api_socket: str, port: PublishedPort) -> None:
    """Ask slirp4netns (its API socket) to listen on the host side and forward to the sandbox."""
    import json
    import socket

    request = {
        "execute": "add_hostfwd",
        "arguments": {
            "proto": "tcp",
            "host_addr": port.host_addr,
            "host_port": port.host_port,
            "guest_port": port.guest_port,
        },
    }
    where = f"publish {port.host_addr}:{port.host_port} -> {port.guest_port}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(_READY_TIMEOUT_SECONDS)
            s.connect(api_socket)
            s.sendall(json.dumps(request).encode())
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < 65536 and (chunk := s.recv(4096)):
                reply += chunk
        answer = json.loads(reply)
    except (OSError, ValueError) as err:
        raise SandboxError(f"{where}: slirp4netns's API: {err}") from None
    if not isinstance(answer, dict) or "error" in answer:
        error = answer.get("error") if isinstance(answer, dict) else answer
        desc = error.get("desc", error) if isinstance(error, dict) else error
        raise SandboxError(f"{where}: {desc}")


def _read_ready(fd: int) -> bool:
    try:
        return os.read(fd, 1) == b"1"
    finally:
        os.close(fd)


def resolv_conf(host_text: str) -> str:
    """The host's resolv.conf as a step sees it: its loopback resolvers are out of reach, so
    they go (and slirp4netns's forwarder, which asks them from the host, stands in when none is left)."""
    lines = []
    servers = 0
    for line in host_text.splitlines():
        words = line.split()
        if words[:1] == ["nameserver"] and len(words) > 1:
            if words[1].startswith("127.") or words[1] == "::1":
                continue
            servers += 1
        lines.append(line)
    if not servers:
        lines.append(f"nameserver {SLIRP_DNS}")
    return "".join(line + "\n" for line in lines)


def hosts(hostname: str) -> str:
    """The /etc/hosts a step with a network of its own sees, as BuildKit writes it."""
    return f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
