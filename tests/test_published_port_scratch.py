"""A sandbox with a published port leaves no slirp4netns API directory behind while it serves
(lamina.engine.sandbox.network): killed then, as a long `lamina run -p` is, it left one in
/tmp each time."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lamina.engine.sandbox import PublishedPort, SandboxSpec, Started, network, run
from lamina.engine.sandbox.runner import remove_tree
from lamina.engine.sandbox.spec import BindMount
from tests.support.busybox import BUSYBOX, make_busybox_rootfs
from tests.support.sandbox import userns_available

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(not BUSYBOX.exists(), reason=f"{BUSYBOX} is missing (apt-get install busybox-static)"),
    pytest.mark.skipif(not userns_available(), reason="user namespaces are not available here"),
    pytest.mark.skipif(bool(network.unavailable()), reason=network.unavailable() or "ready"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(port: int, want: bytes) -> bytes:
    body = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and want not in body:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                body = b"".join(iter(lambda: conn.recv(4096), b""))
        except OSError:
            time.sleep(0.05)
    return body


def test_a_serving_sandbox_keeps_no_slirp_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the API socket's dir is made
    rootfs = make_busybox_rootfs(tmp_path / "rootfs")
    (tmp_path / "www").mkdir()
    (tmp_path / "www/index.html").write_text("served\n")
    port = _free_port()
    spec = SandboxSpec(
        argv=("/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"),
        lower_dirs=(rootfs,),
        mounts=(BindMount(tmp_path / "www", "/www"),),
        publish=(PublishedPort(port, 8080),),
        scratch_dir=tmp_path / "scratch",
    )
    started: list[Started] = []
    runner = threading.Thread(target=lambda: run(spec, on_started=started.append))
    runner.start()
    try:
        assert b"served" in _get(port, b"served")  # forwarded through slirp4netns's API
        assert list(scratch.glob("lamina-slirp-*")) == []  # while it serves
    finally:
        if started:
            started[0].stop()
        runner.join(20)
        remove_tree(tmp_path, keep_root=True)  # the rootfs a user namespace wrote into
    assert not runner.is_alive()
