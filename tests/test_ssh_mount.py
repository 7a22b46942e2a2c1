"""`--ssh` and `RUN --mount=type=ssh`: an ssh-agent reached from a RUN step, as BuildKit forwards it.

The RUN steps use the host's own `ssh-add` (copied into the busybox image
with the libraries `ldd` names) against a real `ssh-agent` holding a key
made by `ssh-keygen`: what the step lists is what the agent holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.build import BASE, cached_steps, make_cache, rootfs, run_cli, write_context

pytestmark = pytest.mark.sandbox

TOOLS = ("ssh-agent", "ssh-add", "ssh-keygen")


@pytest.fixture
def cache(tmp_path: Path, busybox_image: Path) -> Path:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing (apt-get install openssh-client)")
    return make_cache(tmp_path, busybox_image)


def _key(directory: Path, name: str = "id") -> tuple[Path, str]:
    """A fresh ed25519 key without passphrase, and its SHA256 fingerprint."""
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], check=True, capture_output=True, text=True)
    return key, out.stdout.split()[1]


@contextlib.contextmanager
def _agent(*keys: Path) -> Iterator[Path]:
    """An ssh-agent on a socket of its own, holding `keys`."""
    home = Path(tempfile.mkdtemp(prefix="agent-"))
    sock = home / "sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(500):  # the file appears at bind(), before listen()
            with socket.socket(socket.AF_UNIX) as probe:
                if sock.exists() and probe.connect_ex(str(sock)) == 0:
                    break
            time.sleep(0.01)
        for key in keys:
            subprocess.run(
                ["ssh-add", "-q", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)}, check=True
            )
        yield sock
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def _build(
    cache: Path, ctx: Path, out: Path | None = None, agent: Path | None = None, **kwargs: object
) -> object:
    """A build whose environment has SSH_AUTH_SOCK=`agent` (or none)."""
    from lamina import api

    env = {k: v for k, v in os.environ.items() if k not in ("SOURCE_DATE_EPOCH", "SSH_AUTH_SOCK")}
    if agent is not None:
        env["SSH_AUTH_SOCK"] = str(agent)
    outputs = [f"type=local,dest={out}"] if out is not None else []
    return api.build(ctx, cache_dir=cache, environ=env, outputs=outputs, **kwargs)  # type: ignore[arg-type]


def _with_ssh_add(ctx: Path) -> None:
    """Put the host's ssh-add and the libraries it loads under ctx/sshroot, as the image will hold them."""
    tool = Path(shutil.which("ssh-add") or "ssh-add").resolve()
    out = subprocess.run(["ldd", str(tool)], check=True, capture_output=True, text=True).stdout
    files = [str(tool), *re.findall(r"(/\S+) \(0x", out)]
    for name in files:
        dest = ctx / "sshroot" / name.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(name), dest)
    (ctx / "sshroot/usr/bin").mkdir(parents=True, exist_ok=True)
    if not (ctx / "sshroot/usr/bin/ssh-add").exists():
        shutil.copy(tool, ctx / "sshroot/usr/bin/ssh-add")


DOCKERFILE = f"""\
FROM {BASE}
COPY sshroot/ /
RUN --mount=type=ssh ssh-add -l > /keys; echo "$SSH_AUTH_SOCK" > /sock; ls -ln "$SSH_AUTH_SOCK" > /ls
RUN --mount=type=ssh,id=work,target=/tmp/agent,uid=7,gid=8,mode=0640 sh -c \\
    'SSH_AUTH_SOCK=/tmp/agent ssh-add -l > /work-keys; ls -ln /tmp/agent > /work-ls'
RUN --mount=type=ssh sh -c 'ssh-add -D; echo $? > /delete-status; ssh-add -l > /keys-after'
"""


@pytest.mark.parametrize("isolation", ["auto", "chroot"])
def test_ssh_agent_reaches_run_mounts(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str
) -> None:
    if isolation == "chroot":
        if os.geteuid() != 0:
            pytest.skip("chroot isolation needs uid 0 (CAP_SYS_CHROOT)")
        # No mount namespace: the relay socket is staged into the copied root, and must
        # still be the listening socket there (a copy would be a new, dead one).
        monkeypatch.setenv("LAMINA_ISOLATION", "chroot")
    key, fingerprint = _key(tmp_path)
    other, other_fingerprint = _key(tmp_path, "other")
    ctx = write_context(tmp_path / "ctx", DOCKERFILE)
    _with_ssh_add(ctx)
    out = tmp_path / "out"
    with _agent(key) as sock:
        result = _build(cache, ctx, out, sock, ssh=["default", f"work={other}"])
    assert fingerprint in (out / "keys").read_text(), "the RUN listed the agent's key"
    assert (out / "sock").read_text() == "/run/buildkit/ssh_agent.0\n", "SSH_AUTH_SOCK is BuildKit's default"
    mode, _, uid, gid = (out / "ls").read_text().split()[:4]
    assert (mode, uid, gid) == ("srw-------", "0", "0")
    # id=work is key files: an agent of lamina's own holds them for the build.
    assert other_fingerprint in (out / "work-keys").read_text()
    assert fingerprint not in (out / "work-keys").read_text()
    mode, _, uid, gid = (out / "work-ls").read_text().split()[:4]
    if uid != "0":  # a single-id map has only root
        assert (mode, uid, gid) == ("srw-r-----", "7", "8")
    # Read-only, as BuildKit's readOnlyAgent: a step cannot remove the caller's keys.
    assert (out / "delete-status").read_text().strip() != "0"
    assert fingerprint in (out / "keys-after").read_text()
    for path in ("run/buildkit/ssh_agent.0", "tmp/agent"):
        assert not (out / path).exists(), "the socket never lands in a layer"
    assert not any(cached_steps(result))


def test_ssh_socket_is_not_in_the_cache_key(cache: Path, tmp_path: Path) -> None:
    key, _ = _key(tmp_path)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN --mount=type=ssh test -S $SSH_AUTH_SOCK\n")
    with _agent(key) as first:
        _build(cache, ctx, agent=first, ssh=["default"])
    with _agent(key) as second:
        result = _build(cache, ctx, ssh=[f"default={second}"])
    assert cached_steps(result) == [True], "another socket path, the same key"


def test_optional_ssh_mount_without_ssh_is_skipped(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "ctx", f"FROM {BASE}\nRUN --mount=type=ssh sh -c 'test -e $SSH_AUTH_SOCK; echo $? > /r'\n"
    )
    out = tmp_path / "out"
    rootfs(cache, ctx, out)
    assert (out / "r").read_text() == "1\n", "nothing forwarded: no socket, as BuildKit skips the mount"


def test_required_ssh_mount_without_ssh_fails_in_one_line(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN --mount=type=ssh,required=true true\n")
    proc = run_cli("build", "-o", f"type=local,dest={tmp_path / 'out'}", str(ctx), cache=cache, check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f'error: {ctx / "Dockerfile"}:2: no SSH key "default" forwarded from the client '
        "(lamina build --ssh default=...)"
    )


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("default", "--ssh default: invalid empty ssh agent socket: make sure SSH_AUTH_SOCK is set"),
        ("x=/nonexistent/agent", "--ssh x: /nonexistent/agent: No such file or directory"),
    ],
)
def test_ssh_flag_errors(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, message: str
) -> None:
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\n")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    proc = run_cli("build", "--ssh", flag, str(ctx), cache=cache, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {message}"


def test_relay_answers_only_list_and_sign_and_takes_long_paths(tmp_path: Path) -> None:
    """BuildKit's readOnlyAgent: add, remove, lock and extensions fail; socket paths past
    the 107 bytes a sockaddr_un holds still work (a deep cache directory)."""
    import threading

    from lamina.engine.sshforward import Relay

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    seen: list[bytes] = []
    agent = socket.socket(socket.AF_UNIX)
    agent.bind(str(tmp_path / "agent"))
    agent.listen(1)

    def serve() -> None:
        conn, _ = agent.accept()
        with conn:
            while request := conn.recv(64):
                seen.append(request)
                conn.sendall(b"\x00\x00\x00\x05\x0c\x00\x00\x00\x00")  # IDENTITIES_ANSWER, no keys

    threading.Thread(target=serve, daemon=True).start()
    with Relay(tmp_path / "agent", deep / "relay"), socket.socket(socket.AF_UNIX) as client:
        client.connect(f"/proc/self/fd/{os.open(deep, os.O_PATH)}/relay")
        for kind in (17, 18, 19, 22, 27):  # add, remove, remove all, lock, extension
            client.sendall(b"\x00\x00\x00\x01" + bytes([kind]))
            assert client.recv(16) == b"\x00\x00\x00\x01\x05", kind  # SSH_AGENT_FAILURE
        client.sendall(b"\x00\x00\x00\x01\x0b")  # REQUEST_IDENTITIES
        assert client.recv(16) == b"\x00\x00\x00\x05\x0c\x00\x00\x00\x00"
    assert seen == [b"\x00\x00\x00\x01\x0b"], "only the list request reached the agent"
    agent.close()
