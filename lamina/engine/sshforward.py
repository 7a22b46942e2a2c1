"""`--ssh`: an ssh-agent forwarded into `RUN --mount=type=ssh`, as buildx and BuildKit do it.

`--ssh default|ID[=SOCKET|KEY[,KEY...]]` names an agent per id: a socket
(`$SSH_AUTH_SOCK` when none is given), or private key files that an agent
of lamina's own (`ssh-agent`, loaded with `ssh-add`) holds for the build,
as BuildKit's sshprovider keeps them in a keyring of its own.

A RUN step never sees the agent's socket itself: each ssh mount gets a
fresh socket of the step's own (owner, group and mode as the mount asks),
and a relay passes requests to the agent one by one. As BuildKit's
readOnlyAgent, the relay answers only "list keys" and "sign"; adding,
removing, locking and extensions get SSH_AGENT_FAILURE. The socket lives
in the step's scratch directory, bind-mounted read-only: never in a layer,
and no path of it is in a cache key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from lamina.errors import PlanError

DEFAULT_ID = "default"
DEFAULT_TARGET = "/run/buildkit/ssh_agent.{}"  # llb.AddSSHSocket's, numbered per ssh mount
DEFAULT_MODE = 0o600

# The agent protocol (draft-miller-ssh-agent): the requests a build may make.
_REQUEST_IDENTITIES = 11
_SIGN_REQUEST = 13
_FAILURE = b"\x00\x00\x00\x01\x05"  # SSH_AGENT_FAILURE
_MAX_MESSAGE = 256 * 1024  # OpenSSH's AGENT_MAX_LEN


@dataclasses.dataclass(frozen=True, slots=True)
class SshSpec:
    """One `--ssh` value: an id and the paths it names (empty: $SSH_AUTH_SOCK)."""

    id: str
    paths: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class SshAgent:
    """A forwarded agent: the socket the relay talks to."""

    id: str
    socket: Path


def parse_ssh(text: str) -> SshSpec:
    """`default`, `ID`, `ID=SOCKET` or `ID=KEY[,KEY...]`, as buildx's ParseSSHSpecs."""
    name, sep, rest = text.partition("=")
    name = name.strip() or DEFAULT_ID
    paths = tuple(p for p in rest.split(",")) if sep else ()
    if paths == ("",):
        paths = ()
    return SshSpec(name, paths)


@contextlib.contextmanager
def agents(specs: Iterable[SshSpec], environ: Mapping[str, str]) -> Iterator[tuple[SshAgent, ...]]:
    """The agents `specs` name, checked before the build; key files get an agent for the build."""
    with contextlib.ExitStack() as stack:
        out: dict[str, SshAgent] = {}
        for spec in specs:
            if spec.id in out:
                raise PlanError(f"--ssh {spec.id}: invalid duplicate ID {spec.id}")
            paths = spec.paths or (environ.get("SSH_AUTH_SOCK", ""),)
            if not paths[0]:
                raise PlanError(
                    f"--ssh {spec.id}: invalid empty ssh agent socket: make sure SSH_AUTH_SOCK is set"
                )
            out[spec.id] = SshAgent(spec.id, _agent_for(spec.id, paths, stack))
        yield tuple(out.values())


def _agent_for(name: str, paths: tuple[str, ...], stack: contextlib.ExitStack) -> Path:
    sockets, keys = [], []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as err:
            raise PlanError(f"--ssh {name}: {path}: {err.strerror}") from None
        (sockets if stat.S_ISSOCK(st.st_mode) else keys).append(path)
    if len(sockets) > 1:
        raise PlanError(f"--ssh {name}: only single socket allowed")
    if sockets and keys:
        raise PlanError(f"--ssh {name}: invalid combination of keys and sockets")
    if sockets:
        return Path(sockets[0])
    return stack.enter_context(_key_agent(name, keys))


@contextlib.contextmanager
def _key_agent(name: str, keys: list[str]) -> Iterator[Path]:
    """An `ssh-agent` holding `keys` for the length of the build."""
    agent, add = shutil.which("ssh-agent"), shutil.which("ssh-add")
    if agent is None or add is None:
        raise PlanError(f"--ssh {name}=KEY needs ssh-agent and ssh-add (Debian: openssh-client)")
    home = Path(tempfile.mkdtemp(prefix="lamina-ssh-"))
    sock = home / "agent"
    proc = subprocess.Popen(
        [agent, "-D", "-a", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(sock, proc)
        env = {"SSH_AUTH_SOCK": str(sock), "PATH": os.environ.get("PATH", ""), "SSH_ASKPASS_REQUIRE": "never"}
        for key in keys:
            done = subprocess.run(
                [add, "-q", key], env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False
            )
            if done.returncode != 0:
                why = done.stderr.decode(errors="replace").strip().splitlines()
                raise PlanError(
                    f"--ssh {name}: failed to parse {key}: {why[-1] if why else 'ssh-add failed'}"
                )
        yield sock
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def _wait_for(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    import time

    for _ in range(500):  # the file appears at bind(), before listen(): wait for a connection
        if sock.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(str(sock)) == 0:
                    return
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    err = (
        proc.stderr.read().decode(errors="replace").strip() if proc.stderr and proc.poll() is not None else ""
    )
    raise PlanError(f"ssh-agent did not start: {err or 'no socket after 5 s'}")


# --- the relay a RUN step talks to ------------------------------------------------------------


class Relay:
    """A unix socket at `path` whose every connection is relayed to `upstream`, read-only."""

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self._dir_fds: list[int] = []
        self._upstream_address = self._address(upstream)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._address(path))
        self._listener.listen(16)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)
        for fd in self._dir_fds:
            os.close(fd)
        self._dir_fds.clear()

    def _address(self, path: Path) -> str:
        """`path` as a socket address: a unix socket's path holds at most 107 bytes, so a
        longer one goes through its directory's /proc/self/fd link."""
        if len(os.fsencode(path)) < 100:
            return str(path)
        fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dir_fds.append(fd)
        return f"/proc/self/fd/{fd}/{path.name}"

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            with conn:
                while True:
                    request = _read_message(conn)
                    if request is None:
                        return
                    if request[4] not in (_REQUEST_IDENTITIES, _SIGN_REQUEST):
                        conn.sendall(_FAILURE)  # as BuildKit's readOnlyAgent: "not allowed by buildkit"
                        continue
                    if upstream is None:
                        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        upstream.settimeout(30)
                        upstream.connect(self._upstream_address)
                    upstream.sendall(request)
                    answer = _read_message(upstream)
                    if answer is None:
                        return
                    conn.sendall(answer)
        except OSError:
            return
        finally:
            if upstream is not None:
                upstream.close()


def _read_message(sock: socket.socket) -> bytes | None:
    """One length-prefixed agent message (with its length), or None at EOF or when malformed."""
    head = _read_exact(sock, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if not 0 < size <= _MAX_MESSAGE:
        return None
    body = _read_exact(sock, size)
    return None if body is None else head + body


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 65536))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
